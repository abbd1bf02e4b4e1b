"""Configuration: the shipped preset equals the embedded default; every bad key fails up front."""

from pathlib import Path

import pytest

from gradprobe.config import DEFAULTS, load_config
from gradprobe.errors import GradprobeError

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "tiny.yaml") == load_config() == DEFAULTS


def test_seed_preset_loads():
    cfg = load_config(ROOT / "configs" / "qwen2.5-1.5b-qlora.yaml")
    assert cfg["lora"]["r"] == 64 and cfg["quant"]["mode"] == "nf4"


def test_overrides_are_typed():
    cfg = load_config(overrides=["probe.microbatch_size=3", "lora.target_modules=q_proj,v_proj",
                                 "autocast=off", "probe.learning_rate=2e-6"], seed=7)
    assert cfg["probe"]["microbatch_size"] == 3
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["autocast"] == "off" and cfg["probe"]["learning_rate"] == 2e-6 and cfg["seed"] == 7


@pytest.mark.parametrize("override, message", [
    ("probe.microbach_size=2", "did you mean 'probe.microbatch_size'"),
    ("checkpoint=off", "did you mean 'checkpointing'"),
    ("probe.schedule=fast", "must be one of packed, fused, literal"),
    ("batch.group_size=1", "G) must be >= 2"),
    ("lora.r=two", "wants int"),
    ("probe.learning_rate=-1", "must be > 0"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(GradprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("probe:\n  shedule: fused\n")
    with pytest.raises(GradprobeError, match="unknown config key 'probe.shedule'.*probe.schedule"):
        load_config(f)
    f.write_text("lora: 3\n")
    with pytest.raises(GradprobeError, match="'lora' is a section"):
        load_config(f)
    with pytest.raises(GradprobeError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")

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
    ("probe.loss_type=drgrpo", "must be one of group_lmax, per_token, grpo, bnpo, dr_grpo, dapo"),
    ("probe.loss_type=dr_grpo", "set probe.max_completion_length"),
    ("probe.scale_rewards=std", "must be one of none, group, batch"),
    ("probe.max_grad_norm=0", "probe.max_grad_norm must be > 0"),
    ("probe.max_completion_length=0", "probe.max_completion_length must be >= 1"),
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


def test_loss_type_and_the_older_normalization_key():
    probe = load_config()["probe"]
    assert (probe["loss_type"], probe["normalization"], probe["scale_rewards"]) == ("group_lmax", "dr_grpo", "none")
    assert probe["max_grad_norm"] is None and probe["max_completion_length"] is None
    assert load_config(overrides=["probe.normalization=per_token"])["probe"]["loss_type"] == "per_token"
    assert load_config(overrides=["probe.loss_type=per_token"])["probe"]["normalization"] == "per_token"
    probe = load_config(overrides=["probe.loss_type=dr_grpo", "probe.max_completion_length=256",
                                   "probe.scale_rewards=group", "probe.max_grad_norm=1.0"])["probe"]
    assert (probe["loss_type"], probe["max_completion_length"], probe["scale_rewards"], probe["max_grad_norm"]) == \
        ("dr_grpo", 256, "group", 1.0)
    with pytest.raises(GradprobeError, match="probe.normalization=per_token .* contradicts probe.loss_type=dapo"):
        load_config(overrides=["probe.normalization=per_token", "probe.loss_type=dapo"])

"""Configuration: the shipped preset equals the embedded default; every bad key fails up front."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from gradprobe.config import SPECS, Config, ProbeSection, load_config
from gradprobe.errors import GradprobeError

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "tiny.yaml") == load_config() == Config()
    shipped, default = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), Config().to_dict()
    del default["probe"]["normalization"]  # the older key: a file that names it and loss_type must agree
    assert shipped == default  # every other key is in the file


def test_seed_preset_loads():
    cfg = load_config(ROOT / "configs" / "qwen2.5-1.5b-qlora.yaml")
    assert cfg.lora.r == 64 and cfg.quant.mode == "nf4"


def test_overrides_are_typed():
    cfg = load_config(overrides=["probe.microbatch_size=3", "lora.target_modules=q_proj,v_proj",
                                 "autocast=off", "probe.learning_rate=2e-6"], seed=7)
    assert cfg.probe.microbatch_size == 3
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.autocast == "off" and cfg.probe.learning_rate == 2e-6 and cfg.seed == 7


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
    probe = load_config().probe
    assert (probe.loss_type, probe.normalization, probe.scale_rewards) == ("group_lmax", "dr_grpo", "none")
    assert probe.max_grad_norm is None and probe.max_completion_length is None
    assert load_config(overrides=["probe.normalization=per_token"]).probe.loss_type == "per_token"
    assert load_config(overrides=["probe.loss_type=per_token"]).probe.normalization == "per_token"
    probe = load_config(overrides=["probe.loss_type=dr_grpo", "probe.max_completion_length=256",
                                   "probe.scale_rewards=group", "probe.max_grad_norm=1.0"]).probe
    assert (probe.loss_type, probe.max_completion_length, probe.scale_rewards, probe.max_grad_norm) == \
        ("dr_grpo", 256, "group", 1.0)
    with pytest.raises(GradprobeError, match="probe.normalization=per_token .* contradicts probe.loss_type=dapo"):
        load_config(overrides=["probe.normalization=per_token", "probe.loss_type=dapo"])


def test_sections_are_typed_and_a_changed_copy_is_checked_again():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probe.schedule = "literal"  # type: ignore[misc]
    lit = cfg.with_values({"probe.schedule": "literal", "lora.target_modules": "q_proj"})
    assert (lit.probe.schedule, lit.lora.target_modules, cfg.probe.schedule) == ("literal", ("q_proj",), "packed")
    with pytest.raises(GradprobeError, match="must be one of packed"):
        cfg.with_values({"probe.schedule": "fast"})
    with pytest.raises(GradprobeError, match="unknown config key 'probe.shedule'"):
        cfg.with_values({"probe.shedule": "fused"})
    with pytest.raises(GradprobeError, match="set one of them"):  # a rule across keys, not one key alone
        cfg.with_values({"probe.warmup_steps": 2, "probe.optimizer_state": "o.pt"})
    # a section built in code is checked when its Config is made
    with pytest.raises(GradprobeError, match="'probe.microbatch_size' wants int, got '4'"):
        Config(probe=ProbeSection(microbatch_size="4"))  # type: ignore[arg-type]
    with pytest.raises(GradprobeError, match="'probe.microbatch_size' must be >= 1"):
        Config(probe=ProbeSection(microbatch_size=0))
    assert cfg.with_values({"probe.loss_type": "per_token"}).probe.normalization == "per_token"


def test_a_stored_config_reads_back_equal():
    """--resume rebuilds the run's config from the result file's JSON."""
    cfg = load_config(overrides=["probe.loss_type=dapo", "lora.target_modules=q_proj,v_proj",
                                 "probe.learning_rate=3e-6"])
    assert Config.from_dict(cfg.to_dict(), "meta.json") == cfg
    with pytest.raises(GradprobeError, match="unknown config key 'probe.color'"):
        Config.from_dict({"probe": {"color": 1}}, "meta.json")


def test_every_key_is_declared_once_with_its_type():
    flat = Config().flat()
    assert list(flat) == list(SPECS)
    assert {k: s.default for k, s in SPECS.items()} == flat
    assert SPECS["probe.learning_rate"].optional and SPECS["probe.learning_rate"].type is float
    assert SPECS["probe.schedule"].choices[0] == "packed" and SPECS["lora.r"].positive


def test_the_readme_table_names_every_key():
    text = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert [k for k in SPECS if f"`{k}`" not in text] == []

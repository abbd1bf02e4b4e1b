"""What the run loaded for its base (gradprobe/run_model.py): read from the records a run leaves, never guessed
silently. Real GRPOTrainer runs on the CPU: the callback's record beside each checkpoint (an fp32 base reads as
none, an nf4 base as nf4 with its compute dtype), TRL loading the base by name with model_init_kwargs, and a run
that recorded nothing (assumed, and the headline says so)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.rollouts import BUILTIN_PROMPTS
from gradprobe.run_model import RUN_RECORD, from_quantization_config, model_record, quant_settings
from gradprobe.stack import load_stack
from gradprobe.trainer_checkpoint import load_checkpoint, read_training_args
from tests.support.trl_run import base_model, train_grpo

RUN = dict(max_completion_length=4)  # 3 steps, a checkpoint at 2 (a last checkpoint has lr 0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):  # ~25 s on 2 idle cores
    """Three short runs on one base: fp32 and nf4 with the callback (which writes the record at each save, and
    forecasts nothing here: every_n_steps beyond the run), and nf4 loaded by TRL itself from model_init_kwargs."""
    root = tmp_path_factory.mktemp("loaded")
    base = base_model(root / "base")

    def callback():
        return gp.GradprobeCallback(BUILTIN_PROMPTS[:2], every_n_steps=1000, group_size=2)

    runs = {}
    for name, kwargs in (("fp32", {}), ("nf4", {"quant": "nf4"})):
        cb = callback()
        train_grpo(root / name, base_dir=base, trainer_class=_attaching(cb), **kwargs, **RUN)
        runs[name] = root / name / "checkpoint-2"
    train_grpo(root / "by_path", base_dir=base, quant="nf4", by_path=True, **RUN)
    runs["by_path"] = root / "by_path" / "checkpoint-2"
    return runs


def _attaching(cb):
    from trl import GRPOTrainer

    class Attaching(GRPOTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            cb.attach(self)

    return Attaching


def _quant(checkpoint):
    _, info = load_checkpoint(checkpoint, load_config())
    return {k: info.settings[k] for k in ("quant.mode", "quant.compute_dtype", "quant.double_quant")}, info


@pytest.mark.slow
def test_an_fp32_base_is_read_as_unquantised(recorded):
    quant, info = _quant(recorded["fp32"])
    assert quant["quant.mode"] == {"value": "none", "source": f"read: {RUN_RECORD} (the live model's 4-bit layers)"}
    assert info.assumed_stack() == {}
    cfg, _ = load_checkpoint(recorded["fp32"], load_config())
    assert cfg.quant.mode == "none"
    assert model_record(load_stack(cfg).model)["quant"] == {"mode": "none"}  # the probe builds that stack


@pytest.mark.slow
def test_an_nf4_base_reads_its_mode_and_compute_dtype(recorded):
    quant, info = _quant(recorded["nf4"])
    assert {k: v["value"] for k, v in quant.items()} == {"quant.mode": "nf4", "quant.compute_dtype": "bfloat16",
                                                         "quant.double_quant": False}
    assert all(v["source"].startswith(f"read: {RUN_RECORD}") for v in quant.values())
    assert json.loads((recorded["nf4"] / RUN_RECORD).read_text())["lora_dtypes"] == ["bfloat16"]


@pytest.mark.slow
def test_trl_loading_the_base_by_name_records_it_in_training_args(recorded):
    d = recorded["by_path"]
    assert not (d / RUN_RECORD).exists()
    _, args, notes = read_training_args(d)
    assert notes == [] and args["model_init_kwargs"]["quantization_config"] is not None
    quant, info = _quant(d)
    assert {k: v["value"] for k, v in quant.items()} == {"quant.mode": "nf4", "quant.compute_dtype": "bfloat16",
                                                         "quant.double_quant": False}
    assert all(v["source"] == "read: training_args.bin (model_init_kwargs quantization_config)"
               for v in quant.values())


@pytest.mark.slow
def test_an_unrecorded_stack_is_assumed_in_the_headline(recorded, tmp_path):
    """The nf4 run's checkpoint without its record: nothing says how the base was loaded, so the delta-h1
    headline and the diagnose verdict say the stack is assumed, and the JSON lists it."""
    import shutil

    d = tmp_path / "checkpoint-2"
    shutil.copytree(recorded["nf4"], d)
    (d / RUN_RECORD).unlink()
    _, info = _quant(d)
    assert set(info.assumed_stack()) == {"quant.mode", "quant.compute_dtype", "quant.double_quant"}
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["diagnose", "--checkpoint", str(d), "--json", str(out), "--exit-zero"])
    assert res.exit_code == 0, res.output
    assert "verdict on an assumed stack: ASSUMED, not read from the run: quant.mode nf4" in " ".join(res.stdout.split())
    assert json.loads(out.read_text())["checkpoint"]["assumed_stack"]["quant.mode"] == "nf4"


def test_bitsandbytes_configs_in_their_saved_forms():
    """A BitsAndBytesConfig as training_args.bin keeps it (private _load_in_4bit) and as config.json writes it."""
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16,
                           bnb_4bit_use_double_quant=True)
    want = {"quant.mode": "fp4", "quant.compute_dtype": "float16", "quant.double_quant": True}
    as_json = json.loads(json.dumps(q.to_dict(), default=str))
    # as the stand-ins give it: an enum member as its value, a dtype as its name
    state = {k: str(v) if isinstance(v, torch.dtype) else getattr(v, "value", v) for k, v in vars(q).items()}
    assert from_quantization_config(as_json) == (want, None)
    assert from_quantization_config(state) == (want, None)
    eight = BitsAndBytesConfig(load_in_8bit=True).to_dict()
    assert from_quantization_config(eight)[1].startswith("an 8-bit")
    assert from_quantization_config({"quant_method": "gptq", "bits": 4})[0] == {}


def test_model_init_kwargs_and_a_quantised_base_config(tmp_path):
    """GRPOConfig.model_init_kwargs as TRL's scripts fill it (a BitsAndBytesConfig object and a dtype) is read
    through the stand-ins, nothing of transformers run; a base saved quantised says so in its config.json."""
    from transformers import BitsAndBytesConfig
    from trl import GRPOConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                      model_init_kwargs={"quantization_config": q, "dtype": torch.bfloat16})
    torch.save(args, tmp_path / "training_args.bin")
    _, fields, notes = read_training_args(tmp_path)
    assert notes == []
    read, _ = quant_settings(tmp_path, fields, None)
    assert {k: v for k, (v, _) in read.items()} == {"quant.mode": "nf4", "quant.compute_dtype": "float32",
                                                   "quant.double_quant": False}
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True}}))
    read, _ = quant_settings(None, {}, str(base))
    assert read["quant.double_quant"] == (True, f"read: {base}/config.json (quantization_config)")
    assert quant_settings(None, {}, str(tmp_path / "missing")) == ({}, [])

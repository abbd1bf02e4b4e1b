"""A real TRL GRPOTrainer run, probed from its checkpoint: gradprobe reads the run's loss and stack settings
from training_args.bin (and the adapter's dtype from its weights) and, on the batch the trainer used for the
step after the checkpoint, reproduces the gradient the trainer computed for that step."""

from __future__ import annotations

import json
import math
import pickle
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from gradprobe.api import build_batch
from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.objective import batch_advantages
from gradprobe.optim.precondition import Preconditioner
from gradprobe.probe import unit_gradients
from gradprobe.stack import load_stack
from gradprobe.trainer_checkpoint import STAND_INS, load_checkpoint, read_training_args
from tests.support.trl_run import base_model, train_grpo, vowel_reward

SAVE_AT = 2  # train_grpo saves every 2 steps of 3: the third step is the one after the checkpoint


def _recording(record: dict):
    """A GRPOTrainer that keeps the batch of the step after the checkpoint (in generation order, groups
    contiguous, with the rewards its reward function gave), and a callback that keeps that step's gradient
    as the optimizer receives it (after clipping, which the assertions rule out)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class Recording(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.state.global_step == SAVE_AT:
                record["batch"] = {k: out[k].detach().clone() for k in
                                   ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
                record["rewards"] = record["calls"][-1]
            return out

    class Gradient(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            if state.global_step == SAVE_AT:
                record["saved"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step == SAVE_AT:
                record["grads"] = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}

    def reward(completions, **kw):
        values = vowel_reward(completions)
        record.setdefault("calls", []).append(values)
        return values

    return Recording, Gradient(), reward


def _rollouts(record: dict, group_size: int, path) -> None:
    """The recorded batch as a gradprobe rollouts file: token ids, one line per prompt, the rewards."""
    b = record["batch"]
    rows = []
    for i in range(b["prompt_ids"].shape[0]):
        prompt = b["prompt_ids"][i][b["prompt_mask"][i].bool()].tolist()
        response = b["completion_ids"][i][b["completion_mask"][i].bool()].tolist()
        rows.append((prompt, response, float(record["rewards"][i])))
    lines = []
    for a in range(0, len(rows), group_size):
        group = rows[a:a + group_size]
        assert len({tuple(p) for p, _, _ in group}) == 1  # generation order: a prompt's completions together
        lines.append(json.dumps({"prompt": group[0][0], "responses": [r for _, r, _ in group],
                                 "rewards": [x for _, _, x in group]}))
    path.write_text("\n".join(lines) + "\n")


def _run(root, name: str, **config) -> dict:
    """A run whose completions may reach 16 tokens: then their lengths differ (a random policy stops at EOS
    with probability ~1/49 per token), which is what tells the loss types apart."""
    config.setdefault("max_completion_length", 16)
    record: dict = {}
    cls, callback, reward = _recording(record)
    out = root / name
    trainer = train_grpo(out, callbacks=[callback], base_dir=root / "base", trainer_class=cls, reward=reward,
                         **config)
    record["checkpoint"] = out / f"checkpoint-{SAVE_AT}"
    record["rollouts"] = out / "step3.jsonl"
    record["args"] = trainer.args
    _rollouts(record, trainer.args.num_generations, record["rollouts"])
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # ~30 s on 2 idle cores: the tests that use it are marked slow
    """Three runs on one base: QLoRA with all of TRL's defaults (nf4 base, dapo, scale_rewards group, beta 0,
    bf16 autocast, gradient checkpointing); the same loss in fp32 on the fp32 base; TRL's grpo loss with
    batch reward scaling, in fp32, without checkpointing."""
    root = tmp_path_factory.mktemp("trl")
    base_model(root / "base")
    return {"defaults": _run(root, "defaults", quant="nf4"),
            "dapo_fp32": _run(root, "dapo_fp32", bf16=False),
            "grpo": _run(root, "grpo", bf16=False, loss_type="grpo", scale_rewards="batch",
                         gradient_checkpointing=False)}


def _probe_gradient(checkpoint, rollouts, *sets: str):
    """gradprobe's g = mean over units of Y[u] (the gradient of the run's objective) on the checkpoint."""
    overrides = [f"batch.rollouts={rollouts}", *sets]
    cfg, info = load_checkpoint(checkpoint, load_config(overrides=overrides),
                                given={s.split("=")[0] for s in overrides})
    stack = load_stack(cfg)
    batch = build_batch(stack, cfg)
    rows = unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"]
    return cfg, info, stack, batch, rows.double().mean(0)


def _relative_error(record, stack, g) -> float:
    trainer = torch.cat([record["grads"][n].reshape(-1) for n in stack.names])
    return float((g + trainer).norm() / trainer.norm())  # the trainer descends the loss: its gradient is -g


@pytest.mark.slow
def test_training_args_are_read_with_stand_ins_only(runs):
    cls, args, notes = read_training_args(runs["defaults"]["checkpoint"])
    assert cls == "GRPOConfig" and notes == []
    live = runs["defaults"]["args"]
    for key in ("loss_type", "scale_rewards", "num_generations", "temperature", "max_completion_length", "beta",
                "max_grad_norm", "bf16", "fp16", "learning_rate", "seed"):
        assert args[key] == getattr(live, key), key
    assert args["lr_scheduler_type"] == live.lr_scheduler_type.value  # an enum member as its value
    assert (args["loss_type"], args["scale_rewards"], args["beta"]) == ("dapo", "group", 0.0)  # TRL's defaults
    # nothing of transformers, TRL or accelerate ran: every object in the file is one of our stand-ins
    assert all(cls.__module__ == "gradprobe.trainer_checkpoint" for cls in STAND_INS.values())


@pytest.mark.slow
def test_trl_defaults_are_read_and_the_gradient_reproduced(runs):
    """QLoRA with TRL's defaults: dapo over the batch's tokens, rewards scaled by the group's std, bf16
    autocast, non-reentrant checkpointing (use_reentrant unset on transformers 5) and the LoRA weights in
    bf16, all read from the checkpoint; the 4-bit base, which no file records, is the config's (assumed)."""
    rec = runs["defaults"]
    cfg, info, stack, batch, g = _probe_gradient(rec["checkpoint"], rec["rollouts"])
    want = {"probe.loss_type": "dapo", "probe.scale_rewards": "group", "batch.group_size": 4,
            "batch.temperature": 1.0, "probe.max_completion_length": 16, "probe.max_grad_norm": 1.0,
            "autocast": "bf16", "checkpointing": "non_reentrant", "lora.dtype": "bfloat16"}
    for key, value in want.items():
        assert info.settings[key]["value"] == value, key
        assert info.settings[key]["source"].startswith("read: "), info.settings[key]
        assert cfg.flat()[key] == value
    assert info.settings["quant.mode"]["value"] == "nf4"
    assert info.settings["quant.mode"]["source"].startswith("assumed: the config's; nothing the run saved records")
    assert set(info.assumed_stack()) == {"quant.mode", "quant.compute_dtype", "quant.double_quant"}
    assert info.training_args == "GRPOConfig" and stack.checkpointing == "non_reentrant"
    assert {p.dtype for p in stack.params} == {torch.bfloat16}
    # the advantages gradprobe forms from the rewards are the ones the trainer used (group-std scaling)
    ours = torch.cat(batch_advantages(batch, cfg.probe.scale_rewards))
    torch.testing.assert_close(ours, rec["batch"]["advantages"].double(), rtol=1e-5, atol=1e-6)
    trainer = torch.cat([rec["grads"][n].reshape(-1) for n in stack.names])
    assert 0 < trainer.norm() < 1.0  # below max_grad_norm: the gradient the callback saw was not clipped
    # bf16 on both sides (autocast, bf16 LoRA weights and gradients), but not the same kernels' rounding
    # (TRL takes the log-softmax of bf16 logits, gradprobe of fp32 ones): agreement to a few bf16 ulps
    # (2^-8 = 0.4%) of the gradient's norm (measured: 0.5%); in fp32 the test below asks for 1e-4
    assert _relative_error(rec, stack, g) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dapo_fp32", "grpo"])
def test_fp32_runs_reproduce_the_trainers_gradient(runs, name):
    """In fp32 the probe's gradient is the trainer's to float rounding: same model, batch, advantages and
    loss normalisation (dapo: all completion tokens of the batch; grpo: each completion's own length, mean
    over completions), only the order of the sums differs."""
    rec = runs[name]
    cfg, info, stack, batch, g = _probe_gradient(rec["checkpoint"], rec["rollouts"], "quant.mode=none")
    assert info.settings["autocast"]["value"] == "off" and stack.autocast_dtype is None
    assert len({n for lengths in batch.lengths() for n in lengths}) > 1  # so that dapo and grpo differ
    if name == "grpo":
        assert (cfg.probe.loss_type, cfg.probe.scale_rewards, cfg.checkpointing) == \
            ("grpo", "batch", "off")
    err = _relative_error(rec, stack, g)
    assert err < 1e-4, err  # measured: 4e-7
    # the loss normalisation is really tested: another loss type's gradient is far from the trainer's
    other = "grpo" if name == "dapo_fp32" else "dapo"
    _, _, stack2, _, g2 = _probe_gradient(rec["checkpoint"], rec["rollouts"], "quant.mode=none",
                                          f"probe.loss_type={other}")
    assert _relative_error(rec, stack2, g2) > 100 * err


@pytest.mark.slow
def test_delta_h1_and_diagnose_cli_on_the_trl_checkpoint(runs, tmp_path):
    """The CLI reads the same settings and reports where each came from; the max_grad_norm of the real step
    is the run's; diagnose probes the run's non-reentrant checkpointing and finds nothing wrong."""
    rec = runs["defaults"]
    args = ["--checkpoint", str(rec["checkpoint"]), "--rollouts", str(rec["rollouts"]), "--quiet",
            "--set", "batch.temperature=0.7"]
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["delta-h1", *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    settings = payload["checkpoint"]["settings"]
    assert settings["probe.loss_type"] == {"value": "dapo", "source": "read: training_args.bin (GRPOConfig loss_type)"}
    assert settings["batch.temperature"] == {"value": 0.7, "source": "given: --set; the run used 1.0"}
    assert payload["config"]["batch"]["temperature"] == 0.7 and payload["config"]["probe"]["scale_rewards"] == "group"
    step = payload["result"]["step"]
    assert step["max_grad_norm"] == 1.0 and step["sources"]["max_grad_norm"].startswith("read: training_args.bin")
    assert math.isfinite(payload["result"]["deltaH"])
    diagnose_args = [a for a in args[:-2] if a != "--quiet"]
    res = CliRunner().invoke(app, ["diagnose", *diagnose_args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    # the report says where each setting came from
    assert "read from training_args.bin: probe.loss_type dapo, probe.scale_rewards group" in res.stdout
    assert "read from adapter_model.safetensors: lora.dtype bfloat16" in res.stdout
    assert "assumed: quant.mode nf4 (the config's; nothing the run saved records how its base was loaded" \
        in res.stdout
    assert "verdict on an assumed stack" in res.stdout  # the verdict is about a stack no file of the run gave
    payload = json.loads(out.read_text())
    assert (payload["config"]["checkpointing"], payload["config"]["autocast"], payload["config"]["lora"]["dtype"]) \
        == ("non_reentrant", "bf16", "bfloat16")
    assert payload["verdict"]["root_cause"] == "healthy", payload["verdict"]


@pytest.mark.slow
def test_qlora_adapter_is_loaded_as_the_trainer_held_it(runs):
    """TRL on a 4-bit base trains the LoRA weights in bf16: gradprobe loads the checkpoint's adapter in bf16
    (lora.dtype, read from the adapter's weights) with exactly the values the trainer held after the save."""
    rec = runs["defaults"]
    cfg, info = load_checkpoint(rec["checkpoint"], load_config())
    assert info.settings["lora.dtype"] == {"value": "bfloat16", "source": "read: adapter_model.safetensors (the "
                                                                          "dtype the run kept the adapter in)"}
    stack = load_stack(cfg)
    assert {p.dtype for p in stack.params} == {torch.bfloat16} and set(stack.names) == set(rec["saved"])
    for name, p in zip(stack.names, stack.params):
        torch.testing.assert_close(p.detach(), rec["saved"][name], rtol=0, atol=0)


def _saved_args(tmp_path, cls=None, **fields):
    """A config as the Trainer saves it (torch.save(self.args) in training_args.bin), without training."""
    from trl import GRPOConfig

    args = (cls or GRPOConfig)(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **fields)
    torch.save(args, tmp_path / "training_args.bin")
    return args


@pytest.mark.parametrize("fields, want", [
    ({}, {"probe.loss_type": "dapo", "probe.scale_rewards": "group", "batch.group_size": 8, "autocast": "bf16",
          "checkpointing": "non_reentrant", "probe.max_completion_length": 512, "probe.max_grad_norm": 1.0}),
    (dict(loss_type="dr_grpo", scale_rewards="none", num_generations=6, per_device_train_batch_size=6,
          temperature=0.7, max_completion_length=64, bf16=False, fp16=False,
          gradient_checkpointing_kwargs={"use_reentrant": True}, max_grad_norm=0.0),
     {"probe.loss_type": "dr_grpo", "probe.scale_rewards": "none", "batch.group_size": 6, "batch.temperature": 0.7,
      "probe.max_completion_length": 64, "autocast": "off", "checkpointing": "reentrant", "probe.max_grad_norm": None}),
    (dict(gradient_checkpointing=False, loss_type="bnpo", scale_rewards="batch"),
     {"checkpointing": "off", "probe.loss_type": "bnpo", "probe.scale_rewards": "batch"}),
])
def test_grpo_config_fields_become_config_keys(tmp_path, fields, want):
    from gradprobe.trainer_checkpoint import run_settings

    _saved_args(tmp_path, **fields)
    cls, args, notes = read_training_args(tmp_path)
    assert cls == "GRPOConfig" and notes == []
    settings, notes = run_settings(cls, args)
    assert {k: settings[k][0] for k in want} == want
    assert all(certain for _, _, certain in settings.values()) and notes == []


def test_what_the_probe_does_not_model_is_a_note(tmp_path):
    from gradprobe.trainer_checkpoint import run_settings

    _saved_args(tmp_path, beta=0.04, loss_type="cispo", mask_truncated_completions=True)
    settings, notes = run_settings(*read_training_args(tmp_path)[:2])
    assert "probe.loss_type" not in settings
    assert any("KL term (beta 0.04)" in n for n in notes) and any("'cispo'" in n for n in notes)
    assert any("mask_truncated_completions=True" in n for n in notes)


def test_plain_training_arguments_give_the_stack_settings_only(tmp_path):
    from transformers import TrainingArguments

    from gradprobe.trainer_checkpoint import run_settings

    _saved_args(tmp_path, TrainingArguments, fp16=False, bf16=False, gradient_checkpointing=True, max_grad_norm=0.3)
    cls, args, _ = read_training_args(tmp_path)
    settings, _ = run_settings(cls, args)
    assert cls == "TrainingArguments"
    assert {k: v[0] for k, v in settings.items()} == {"probe.max_grad_norm": 0.3, "autocast": "off",
                                                      "checkpointing": "non_reentrant"}


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo owned > /dev/null",))


def test_a_file_with_another_global_is_not_unpickled(tmp_path):
    """An allowed config beside one other global (a callable here) is not loaded at all, and nothing runs."""
    from trl import GRPOConfig

    marker = tmp_path / "ran"

    class Marker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    args.extra = Marker()
    torch.save(args, tmp_path / "training_args.bin")
    cls, args, notes = read_training_args(tmp_path)
    assert (cls, args, marker.exists()) == (None, {}, False)
    assert len(notes) == 1 and "open, not loaded" in notes[0] and "settings are the config's" in notes[0]
    (tmp_path / "training_args.bin").write_bytes(pickle.dumps(_Payload()))
    cls, _, notes = read_training_args(tmp_path)
    assert cls is None and "not a torch.save file" in notes[0]


@pytest.mark.slow
def test_unknown_or_malicious_training_args_are_not_executed(runs, tmp_path, capsys):
    """A training_args.bin that names anything outside the allowlist is not unpickled: a note, and the
    settings stay the config's (assumed); nothing in it runs."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(runs["dapo_fp32"]["checkpoint"], bad)
    marker = tmp_path / "ran"

    class Marker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"args": Marker()}, bad / "training_args.bin")
    with zipfile.ZipFile(bad / "training_args.bin") as z:  # the archive names the callable to run
        assert any(b"open" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    cfg, info = load_checkpoint(bad, load_config())
    assert not marker.exists()
    assert info.training_args is None
    assert any("training_args.bin" in n and "open, not loaded" in n for n in info.notes), info.notes
    assert info.settings["probe.loss_type"]["source"].startswith("assumed: ")
    assert cfg.probe.loss_type == load_config().probe.loss_type
    # a plain pickle (not torch.save's archive) is refused too, as is an allowed class's unknown neighbour
    (bad / "training_args.bin").write_bytes(pickle.dumps(_Payload()))
    _, info = load_checkpoint(bad, load_config())
    assert any("not a torch.save file" in n for n in info.notes), info.notes
    res = CliRunner().invoke(app, ["delta-h1", "--checkpoint", str(bad), "--quiet", "--set", "quant.mode=none",
                                   "--rollouts", str(runs["dapo_fp32"]["rollouts"]), "--json", "-"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert any("not a torch.save file" in n for n in payload["checkpoint"]["notes"])

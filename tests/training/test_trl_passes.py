"""The passes TRL's GRPOTrainer really takes, probed from its checkpoints with the batches gradprobe.capture wrote:
num_iterations = 2 (the second pass steps with TRL's clipped ratio on rollouts sampled one step earlier) and a
KL term (beta 0.04, TRL's bias-corrected k3). Each checkpoint K is probed with the captured batch of step K+1;
the probe's loss gradient is compared with the gradient TRL accumulated for that step, and the step rebuilt
from checkpoint K's optimizer state with it is compared with checkpoint K+1 minus checkpoint K."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradprobe.api import build_batch
from gradprobe.capture import INITIAL, BatchCapture, batch_name
from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.errors import GradprobeError
from gradprobe.optim.precondition import Preconditioner
from gradprobe.optim.state import no_decay_names
from gradprobe.optim.update import real_update
from gradprobe.probe import unit_gradients
from gradprobe.rollouts import read_rollouts, write_rollouts
from gradprobe.stack import load_stack
from tests.support.trl_run import base_model, train_grpo

MU2 = dict(num_iterations=2, learning_rate=2e-2, bf16=False, max_steps=4, save_steps=1, max_completion_length=16)
KL = dict(beta=0.04, learning_rate=1e-2, bf16=False, max_steps=3, save_steps=1, max_completion_length=16)


def _recorder(record: dict):
    """TRL's accumulated gradient before each optimizer step, and the trainable weights at each save."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            record.setdefault("grads", {})[state.global_step + 1] = {
                n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.on_save(args, state, control, model=model)

        def on_save(self, args, state, control, model=None, **kw):
            record.setdefault("saved", {})[state.global_step] = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Recorder()


def _run(root, name: str, capture: bool = True, **config) -> dict:
    record: dict = {"out": root / name, "batches": root / name / "batches"}

    class Capturing:  # a trainer_class hook: attach the capture to the trainer before train()
        pass

    from trl import GRPOTrainer

    class Trainer(GRPOTrainer):
        def train(self, *a, **kw):
            if capture:
                record["capture"] = BatchCapture(record["batches"]).attach(self)
            return super().train(*a, **kw)

    trainer = train_grpo(record["out"], callbacks=[_recorder(record)], base_dir=root / "base", trainer_class=Trainer,
                         **config)
    record["eos_token_ids"] = list(trainer.eos_token_ids)  # the tokens TRL's generation stops on
    record["log"] = [{k: v for k, v in row.items() if k in ("loss", "grad_norm")} for row in trainer.state.log_history]
    record["final"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    del Capturing
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # ~40 s on 2 idle cores
    root = tmp_path_factory.mktemp("passes")
    base_model(root / "base")
    return {"mu2": _run(root, "mu2", **MU2), "mu2_plain": _run(root, "mu2_plain", capture=False, **MU2),
            "kl": _run(root, "kl", **KL)}


def _probe(rec: dict, step: int, *sets: str, rollouts=None):
    """From checkpoint step-1 with the captured batch of `step`: the probe's gradient of the run's objective,
    TRL's, and the step rebuilt from the checkpoint's optimizer state with the probe's gradient."""
    ckpt = rec["out"] / f"checkpoint-{step - 1}" if step > 1 else rec["batches"] / INITIAL
    rollouts = rollouts or next(rec["batches"].glob(f"step-{step:06d}-pass-*.jsonl"))
    overrides = [f"batch.rollouts={rollouts}", "quant.mode=none", *sets]
    cfg, info = load_checkpoint_cfg(ckpt, overrides)
    stack = load_stack(cfg)
    batch = build_batch(stack, cfg)
    g = unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"].double().mean(0)
    trl = torch.cat([rec["grads"][step][n].reshape(-1) for n in stack.names])
    grads, offset = [], 0
    for p in stack.params:
        grads.append(-g[offset:offset + p.numel()].view_as(p).float())
        offset += p.numel()
    delta = real_update(ckpt / "optimizer.pt", stack.params, grads, names=stack.names,
                        no_decay=no_decay_names(stack.model), max_grad_norm=cfg.probe.max_grad_norm)
    ours = torch.cat([d.reshape(-1).double() for d in delta])
    real = torch.cat([(rec["saved"][step][n].double() - rec["saved"][step - 1][n].double())
                      .reshape(-1) for n in stack.names])
    return dict(cfg=cfg, info=info, batch=batch, grad_err=float((g + trl).norm() / trl.norm()),
                step_err=float((ours - real).norm() / real.norm()), stack=stack)


def load_checkpoint_cfg(ckpt, overrides):
    from gradprobe.trainer_checkpoint import load_checkpoint

    return load_checkpoint(ckpt, load_config(overrides=overrides), given={s.split("=")[0] for s in overrides})


@pytest.mark.slow
def test_capture_writes_every_step_and_pass_and_leaves_the_trajectory_alone(runs):
    rec = runs["mu2"]
    names = sorted(p.name for p in rec["batches"].glob("step-*.jsonl"))
    assert names == [batch_name(1, 1), batch_name(2, 2), batch_name(3, 1), batch_name(4, 2)]
    assert (rec["batches"] / INITIAL / "adapter_model.safetensors").is_file()
    # beside every checkpoint, checkpoint-0 included, how the run loaded its base: read, not assumed
    from gradprobe.run_model import RUN_RECORD

    for ckpt in (rec["batches"] / INITIAL, *rec["out"].glob("checkpoint-*")):
        assert (ckpt / RUN_RECORD).is_file(), ckpt
        _, info = load_checkpoint_cfg(ckpt, ["probe.learning_rate=1e-3"])  # the last one's scheduler says 0
        assert info.settings["quant.mode"]["value"] == "none" and info.assumed_stack() == {}, ckpt
    # the same losses, gradient norms and final weights as the run without the capture
    assert rec["log"] == runs["mu2_plain"]["log"]
    for n, p in rec["final"].items():
        torch.testing.assert_close(p, runs["mu2_plain"]["final"][n], rtol=0, atol=0)
    # the file is TRL's batch: completion padding stripped, per-token log-probs one per token, a pass's
    # two files the same batch (the second pass re-uses the first's samples and old log-probs)
    a = read_rollouts(rec["batches"] / batch_name(3, 1), _tokenizer(rec))
    b = read_rollouts(rec["batches"] / batch_name(4, 2), _tokenizer(rec))
    assert [g.responses for g in a.groups] == [g.responses for g in b.groups]
    assert [g.old_logprobs for g in a.groups] == [g.old_logprobs for g in b.groups]
    assert all(len(o) == len(r) for g in a.groups for o, r in zip(g.old_logprobs, g.responses))
    assert all(g.ref_logprobs is None for g in a.groups)
    first = read_rollouts(rec["batches"] / batch_name(1, 1), _tokenizer(rec))
    assert len({len(r) for g in [*first.groups, *a.groups] for r in g.responses}) > 1  # padding really stripped


@pytest.mark.slow
def test_captured_completions_are_whole_and_unpadded(runs):
    """What X assumes of a response: the tokens the sampler generated, up to and including the first token of
    TRL's EOS set, or max_completion_length tokens without one; nothing after, no padding (issue 23, item 5:
    padding inside completion_ids and the EOS set, ruled out on TRL's own batches)."""
    rec = runs["mu2"]
    tok = _tokenizer(rec)
    eos = set(rec["eos_token_ids"])  # TRL stops on the tokenizer's EOS plus generation_config's
    assert tok.eos_token_id in eos
    n = 0
    for path in sorted(rec["batches"].glob("step-*.jsonl")):
        for g in read_rollouts(path, tok).groups:
            for r, old in zip(g.responses, g.old_logprobs):
                n += 1
                assert 1 <= len(r) <= MU2["max_completion_length"] and len(old) == len(r)
                assert not eos & set(r[:-1])  # no token after an EOS
                assert r[-1] in eos or len(r) == MU2["max_completion_length"]  # stopped, or cut at the limit
    assert n == 4 * 8


def _tokenizer(rec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(rec["out"].parent / "base"))


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 3, 4])
def test_num_iterations_2_both_passes_are_trls_step(runs, step):
    """Pass 1 (step 3, ratio 1 at its own samples) and pass 2 (steps 2 and 4, the ratio to the samples of
    one step earlier, clipped on >= 10% of the tokens): the probe's gradient is TRL's, the step rebuilt from
    it is TRL's update to < 1%."""
    res = _probe(runs["mu2"], step)
    p = res["cfg"].probe
    assert (p.num_iterations, p.epsilon, p.beta) == (2, 0.2, 0.0)
    assert res["info"].settings["probe.num_iterations"]["source"] == "read: training_args.bin (GRPOConfig " \
                                                                    "num_iterations)"
    print(f"step {step}: gradient {res['grad_err']:.2e}, step {res['step_err']:.2e}")
    assert res["grad_err"] < 1e-4, res
    assert res["step_err"] < 0.01, res


@pytest.mark.slow
def test_the_second_pass_is_clipped_and_the_report_says_so(runs):
    from gradprobe.api import delta_h1

    rec = runs["mu2"]
    rollouts = rec["batches"] / batch_name(4, 2)
    cfg, _ = load_checkpoint_cfg(rec["out"] / "checkpoint-3", [f"batch.rollouts={rollouts}", "quant.mode=none"])
    stack = load_stack(cfg)
    result = delta_h1(stack, build_batch(stack, cfg), cfg)
    tp = result.trl_pass
    assert tp["per_token"] and tp["ratio"] == "old_logprobs" and tp["num_iterations"] == 2
    assert (tp["captured_step"], tp["captured_pass"]) == (4, 2)
    assert tp["clipped_share"] >= 0.10, tp
    assert tp["max_abs_log_ratio"] > 0.1
    assert result.schedule == "packed" and any("per-token" in n for n in result.notes)
    # the headline's step (packed, two backwards per forward, the checkpoint's optimizer state) is TRL's
    real = torch.cat([(rec["saved"][4][n].double() - rec["saved"][3][n].double()).reshape(-1) for n in stack.names])
    assert abs(result.update_norm - float(real.norm())) < 0.01 * float(real.norm())
    assert any("sampled by an earlier policy" in n for n in result.notes)
    # on a pass-1 batch, probed where it was sampled, the ratio is 1 to rounding: no off-policy note
    rollouts = rec["batches"] / batch_name(3, 1)
    cfg, _ = load_checkpoint_cfg(rec["out"] / "checkpoint-2", [f"batch.rollouts={rollouts}", "quant.mode=none"])
    stack = load_stack(cfg)
    one = delta_h1(stack, build_batch(stack, cfg), cfg)
    assert one.trl_pass["max_abs_log_ratio"] < 1e-4 and one.trl_pass["clipped_share"] == 0.0
    assert not any("sampled by an earlier policy" in n for n in one.notes)


@pytest.mark.slow
def test_a_second_pass_without_old_logprobs_is_refused(runs, tmp_path):
    rec = runs["mu2"]
    batch = read_rollouts(rec["batches"] / batch_name(4, 2), _tokenizer(rec))
    for g in batch.groups:
        g.old_logprobs = None
    stripped = tmp_path / "stripped.jsonl"
    write_rollouts(batch, stripped)
    with pytest.raises(GradprobeError, match="num_iterations=2 passes .* no 'old_logprobs'"):
        _probe(rec, 4, rollouts=stripped)
    res = CliRunner().invoke(app, ["delta-h1", "--checkpoint", str(rec["out"] / "checkpoint-3"), "--quiet",
                                   "--set", "quant.mode=none", "--rollouts", str(stripped)])
    assert res.exit_code == 2 and "old_logprobs" in res.output and "Traceback" not in res.output
    # said explicitly, the batch is probed as an on-policy first pass: far from TRL's second pass
    res = _probe(rec, 4, "probe.num_iterations=1", rollouts=stripped)
    assert res["step_err"] > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 3])
def test_kl_term_with_reference_logprobs_is_trls_step(runs, step):
    """beta 0.04 with TRL's bias-corrected k3 KL (use_bias_correction_kl, its default): within 0.5%."""
    res = _probe(runs["kl"], step)
    p = res["cfg"].probe
    assert (p.beta, p.kl_bias_correction, p.num_iterations) == (0.04, True, 1)
    assert all(g.ref_logprobs is not None and g.old_logprobs is None for g in res["batch"].groups)
    print(f"kl step {step}: gradient {res['grad_err']:.2e}, step {res['step_err']:.2e}")
    assert res["grad_err"] < 1e-4, res
    assert res["step_err"] < 0.005, res
    # the KL term is really in: without it the gradient is off by far more
    off = _probe(runs["kl"], step, "probe.beta=0")
    assert off["grad_err"] > 100 * max(res["grad_err"], 1e-7)


@pytest.mark.slow
def test_step_1_from_the_saved_initial_checkpoint(runs):
    """checkpoint-0 (BatchCapture's save_initial) probes step 1 like any other step."""
    rec = runs["kl"]
    ckpt = rec["batches"] / INITIAL
    out = CliRunner().invoke(app, ["delta-h1", "--checkpoint", str(ckpt), "--quiet", "--set", "quant.mode=none",
                                   "--rollouts", str(rec["batches"] / batch_name(1, 1)), "--json", "-"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["result"]["trl_pass"]["beta"] == 0.04 and "no Adam moments" in payload["result"]["precondition"]
    res = _probe(rec, 1)  # Adam's first step, from zero moments
    print(f"kl step 1: gradient {res['grad_err']:.2e}, step {res['step_err']:.2e}")
    assert res["grad_err"] < 1e-4 and res["step_err"] < 0.005, res


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):  # ~25 s on 2 idle cores
    """TRL on an nf4 base keeps the LoRA weights in bf16 (QLoRA): 5 steps, a checkpoint after each."""
    root = tmp_path_factory.mktemp("qlora")
    base_model(root / "base")
    return _run(root, "qlora", quant="nf4", bf16=False, max_steps=5, save_steps=1, max_completion_length=8)


@pytest.mark.slow
def test_bf16_lora_steps_are_the_rounded_checkpoint_differences(qlora_run):
    """Over 4 consecutive steps of a QLoRA run: the step rebuilt from checkpoint K's optimizer state with TRL's
    own bf16 gradient is checkpoint K+1 minus K bit for bit (the rounding is the optimizer's own, on bf16
    copies); the headline step gradprobe forms from its own gradient (fp32 inside the backward, 0.3-0.5% from
    TRL's bf16 .grad) lands within a few percent of it, because bf16 rounding turns that difference into whole
    grid steps on the coordinates near a boundary (docs/real_step.md). The parts sum to the headline step."""
    import gradprobe as gp
    from gradprobe.trainer_checkpoint import load_checkpoint

    rec = qlora_run
    for k in range(1, 5):
        ckpt = rec["out"] / f"checkpoint-{k}"
        rollouts = next(rec["batches"].glob(f"step-{k + 1:06d}-pass-*.jsonl"))
        cfg, info = load_checkpoint(ckpt, load_config(overrides=[f"batch.rollouts={rollouts}"]),
                                    given={"batch.rollouts"})
        assert (cfg.quant.mode, cfg.lora.dtype) == ("nf4", "bfloat16")  # read: the run record, the adapter
        stack = load_stack(cfg)
        r = gp.delta_h1(stack, build_batch(stack, cfg), cfg, keep_update=True)
        real = torch.cat([(rec["saved"][k + 1][n].double() - rec["saved"][k][n].double()).reshape(-1)
                          for n in stack.names])
        trl_grad = [rec["grads"][k + 1][n].float() for n in stack.names]
        rebuilt = real_update(ckpt / "optimizer.pt", stack.params, trl_grad, names=stack.names,
                              no_decay=no_decay_names(stack.model), max_grad_norm=cfg.probe.max_grad_norm)
        assert torch.equal(torch.cat([d.reshape(-1).double() for d in rebuilt]), real), k
        ours = torch.cat([r.update[n].reshape(-1).double() for n in stack.names])
        grad_err = float((torch.cat([r.gradient[n].reshape(-1).double() for n in stack.names])
                          - torch.cat([g.reshape(-1).double() for g in trl_grad])).norm()
                         / torch.cat([g.reshape(-1).double() for g in trl_grad]).norm())
        step_err = float((ours - real).norm() / real.norm())
        print(f"qlora step {k + 1}: gradient {grad_err:.2e}, headline step {step_err:.3f}, "
              f"rounded away {r.rounded_away:.3f}")
        assert grad_err < 1e-2 and step_err < 0.08, (k, grad_err, step_err)  # measured: 0.3-0.5%, 3-4%
        assert "rounding" in r.parts and r.update_norm == pytest.approx(float(ours.norm()), rel=1e-5)

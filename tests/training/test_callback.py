"""GradprobeCallback inside real training runs: a transformers Trainer on the micro model (exact entropy)
and TRL's GRPOTrainer on the tiny model (importance-sampled entropy).

Each run is trained twice from the same seed, with and without the callback: the losses and the final
trainable weights must be identical (the callback leaves no trace). On the micro model the entropy of the
evaluation prompts is enumerated exactly, so the forecast's step (the live optimizer's own arithmetic) is
checked against the change the trainer's optimizer.step() really made.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import gradprobe as gp
from gradprobe.errors import GradprobeError
from gradprobe.rollouts import BUILTIN_PROMPTS, MICRO_PROMPTS
from tests.support.trainer_run import micro_trainer
from tests.support.trl_run import train_grpo

EVAL = MICRO_PROMPTS[:3]


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared 2-core machine
    out = tmp_path_factory.mktemp("plain")
    bare, _ = micro_trainer(out / "bare")
    bare.train()
    probed, tok = micro_trainer(out / "probed")
    # responses of at most 3 tokens: 820 per prompt, enumerated for the exact entropy and its gradient
    cb = gp.GradprobeCallback(EVAL, every_n_steps=2, tokenizer=tok, group_size=8, max_new_tokens=3,
                              exact_first_order=True, jsonl=out / "gradprobe.jsonl").attach(probed)
    probed.train()
    yield bare, probed, cb, out / "gradprobe.jsonl"
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_plain_trainer_unchanged_by_the_callback(plain_runs):
    bare, probed, cb, _ = plain_runs
    assert losses(bare) and losses(bare) == losses(probed)
    assert [h["grad_norm"] for h in bare.state.log_history if "loss" in h] == \
        [h["grad_norm"] for h in probed.state.log_history if "loss" in h]
    assert same_weights(trainable(bare), trainable(probed))


@pytest.mark.slow
def test_plain_trainer_logs_forecast_and_realised(plain_runs):
    _, probed, cb, path = plain_runs
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] == [r["step"] for r in cb.records]
    logged = [h for h in probed.state.log_history if "gradprobe/deltaH" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for rec, log in zip(lines, logged):
        for key in ("deltaH", "se_deltaH", "realised", "realised_se", "seconds"):
            assert log[f"gradprobe/{key}"] == pytest.approx(rec[key], rel=1e-12, abs=0)
        assert set(rec["parts"]) >= {"fresh", "momentum", "weight_decay", "clip_factor"}
        assert rec["method"] == "exact" and rec["realised_se"] == 0.0 and rec["eval_prompts"] == len(EVAL)
        assert rec["optimizer"] == "AdamW" and rec["optimizer_step"] == rec["step"]
        # decompose's parts add up to the optimizer's own step, up to the fp32 rounding of theta + Delta theta
        # at a relative step of ~1e-4 (2**-24 / 1e-4 ~ 1e-4 per element)
        assert rec["parts_residual"] < 1e-3
        assert rec["seconds"] > 0 and rec["cost_ratio"] > 0
        parts = rec["parts"]
        assert rec["deltaH"] == pytest.approx(sum(parts[k]["value"] for k in ("fresh", "momentum", "weight_decay")))
        assert parts["momentum"]["value"] != 0 and parts["weight_decay"]["value"] != 0  # step 2: AdamW has m


@pytest.mark.slow
def test_plain_trainer_forecast_agrees_with_the_truth(plain_runs):
    """Small steps (lr 1e-4) on exact entropy: grad H . Delta theta of the forecast's step is the realised
    change to first order (so Delta theta is the step the trainer took), and the sampled forecast lies
    within its SE band of it."""
    _, _, cb, _ = plain_runs
    for rec in cb.records:
        assert abs(rec["realised"]) > 0
        assert rec["deltaH_exact"] == pytest.approx(rec["realised"], rel=0.02)
        assert abs(rec["deltaH"] - rec["realised"]) < 4 * rec["se_deltaH"]


def test_bad_settings_fail_at_construction():
    for kwargs, words in [(dict(every_n_steps=0), "every_n_steps"), (dict(every_n_steps=1.5), "every_n_steps"),
                          (dict(group_size=1), "group_size"), (dict(method="guess"), "method")]:
        with pytest.raises(GradprobeError, match=words):
            gp.GradprobeCallback(EVAL, **kwargs)
    for prompts in ([], ["abc"], "abc", ["abc", ""]):
        with pytest.raises(GradprobeError, match="eval_prompts"):
            gp.GradprobeCallback(prompts)


@pytest.mark.slow
def test_train_begin_refuses_what_it_cannot_model(tmp_path):
    trainer, tok = micro_trainer(tmp_path / "adagrad", optim="adagrad", steps=1)
    gp.GradprobeCallback(EVAL, tokenizer=tok).attach(trainer)
    with pytest.raises(GradprobeError, match="Adagrad is not supported"):
        trainer.train()
    trainer, tok = micro_trainer(tmp_path / "unattached", steps=1)
    trainer.add_callback(gp.GradprobeCallback(EVAL, tokenizer=tok))
    with pytest.raises(GradprobeError, match="attach"):
        trainer.train()
    trainer, tok = micro_trainer(tmp_path / "no-directory", steps=1)
    gp.GradprobeCallback(EVAL, tokenizer=tok, jsonl=tmp_path / "missing" / "g.jsonl").attach(trainer)
    with pytest.raises(GradprobeError, match="cannot write"):
        trainer.train()
    trainer, _ = micro_trainer(tmp_path / "no-tokenizer", steps=1)
    gp.GradprobeCallback(EVAL).attach(trainer)
    with pytest.raises(GradprobeError, match="tokenizer"):
        trainer.train()


def probed_grpo(cb):
    """GRPOTrainer that attaches the callback as it is built (train_grpo builds and trains in one call)."""
    from trl import GRPOTrainer

    class Probed(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cb.attach(self)

    return Probed


@pytest.mark.slow
def test_grpo_trainer_with_the_callback(tmp_path_factory):
    """TRL's GRPOTrainer with its defaults (dapo loss, bf16 autocast, gradient checkpointing) on an nf4 base
    (QLoRA: TRL trains the LoRA weights in bf16): the same losses and weights with and without the callback;
    forecast and realised logged at the configured steps."""
    out = tmp_path_factory.mktemp("grpo")
    base = out / "base"
    bare = train_grpo(out / "bare", base_dir=base, quant="nf4")
    cb = gp.GradprobeCallback(BUILTIN_PROMPTS[:2], every_n_steps=2, group_size=4, is_samples=32,
                              jsonl=out / "gradprobe.jsonl")
    probed = train_grpo(out / "probed", base_dir=base, quant="nf4", trainer_class=probed_grpo(cb))
    assert losses(bare) and losses(bare) == losses(probed)
    assert same_weights(trainable(bare), trainable(probed))
    lines = [json.loads(line) for line in (out / "gradprobe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2]
    rec = lines[0]
    assert rec["method"] == "importance" and rec["max_new_tokens"] == 8  # TRL's max_completion_length
    step2 = next(h for h in probed.state.log_history if "loss" in h and h["step"] == 2)
    assert rec["lr"] == pytest.approx(step2["learning_rate"])  # the rate this step used
    for key in ("deltaH", "se_deltaH", "realised", "realised_se"):
        assert math.isfinite(rec[key])
    assert rec["se_deltaH"] > 0 and rec["realised_se"] > 0
    # the real step lands on bf16 LoRA weights (rounded to bf16's grid); decompose's parts are the unrounded step
    assert any(p.dtype == torch.bfloat16 for p in probed.model.parameters() if p.requires_grad)
    assert rec["parts_residual"] < 0.1
    logged = [h for h in probed.state.log_history if "gradprobe/deltaH" in h]
    assert [h["step"] for h in logged] == [2] and logged[0]["gradprobe/realised"] == rec["realised"]
    # TRL's own metrics still reach its log (the callback logs through Trainer.log, not TRL's override)
    assert [("reward" in h) for h in probed.state.log_history if "loss" in h] == [True] * 3

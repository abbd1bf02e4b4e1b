"""Regressions of diagnose against the probe: bitsandbytes optimizers after real steps, and the Y loss's lengths.

A healthy QLoRA run once read as broken (the checks knew only torch's `exp_avg_sq`, not bitsandbytes'
`state2`), and diagnose's Y loss once divided by the token count where the probe divides by the
rollout's `lengths`. Both are pinned here with real optimizers and an independent computation.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import gradprobe as gp
from gradprobe.diagnose.subject import batch_loss_fn
from gradprobe.objective import pack, sequence_logprobs
from gradprobe.probe.engine import _Engine
from gradprobe.rollouts import Batch, Group

bnb = pytest.importorskip("bitsandbytes")

SMALL = ["batch.num_prompts=4", "batch.group_size=4", "batch.max_new_tokens=8", "probe.microbatch_size=8",
         "checkpointing=non_reentrant"]


@pytest.fixture(scope="module")
def nr():
    cfg = gp.load_config(overrides=SMALL)
    stack = gp.load_stack(cfg)
    return stack, gp.build_batch(stack, cfg), cfg


@contextlib.contextmanager
def restored(stack):
    saved = [(p, p.detach().clone()) for p in stack.params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.copy_(data)
        stack.model.zero_grad(set_to_none=True)


def s_fn(stack, batch):
    pairs = [(batch.groups[p].prompt, r) for p in (0, 1) for r in batch.groups[p].responses]
    tb = pack(pairs, stack.tokenizer.pad_token_id, stack.device)
    return lambda: sequence_logprobs(stack.model, tb, batch.temperature, stack.autocast())


@pytest.mark.parametrize("name", [pytest.param("PagedAdamW8bit", marks=pytest.mark.slow), "AdamW8bit",
                                  pytest.param("AdamW32bit", marks=pytest.mark.slow)])
def test_live_bitsandbytes_optimizer_after_real_steps_is_healthy(nr, name, tmp_path):
    """On a CPU the paged variant falls back to unpaged memory (bitsandbytes warns); its state layout is the same."""
    stack, batch, cfg = nr
    loss_fn = s_fn(stack, batch)
    n = len(stack.params)
    with restored(stack), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        opt = getattr(bnb.optim, name)(stack.params, lr=1e-4)
        for _ in range(2):  # real steps on real gradients of the loss
            stack.model.zero_grad(set_to_none=True)
            (-loss_fn().sum()).backward()
            opt.step()
        stack.model.zero_grad(set_to_none=True)
        assert all("state2" in opt.state[p] for p in stack.params)  # bitsandbytes' second moment, not exp_avg_sq
        result = gp.diagnose(stack.model, stack.params, loss_fn, optimizer=opt)
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        from_file = gp.diagnose(stack.model, stack.params, loss_fn, optimizer_state=torch.load(tmp_path / "opt.pt"))
    for r in (result, from_file):
        cov = r.check("optimizer_state")
        assert cov.status == "pass" and cov.evidence["covered"] == f"{n}/{n}", cov.evidence
        assert r.verdict.root_cause == "healthy" and r.exit_code() == 0


def test_fresh_adapter_with_a_fresh_optimizer_is_healthy(nr):
    """lora_B = 0 (a fresh adapter) gives exactly zero lora_A gradients, and an optimizer before step 1 has no
    moments: both are expected, neither is a fault."""
    stack, batch, _ = nr
    with restored(stack):
        with torch.no_grad():
            for name, p in zip(stack.names, stack.params):
                if ".lora_B." in name:
                    p.zero_()
        opt = bnb.optim.AdamW8bit(stack.params, lr=1e-4)
        result = gp.diagnose(stack.model, stack.params, s_fn(stack, batch), optimizer=opt)
    n = len(stack.params)
    assert result.verdict.root_cause == "healthy" and result.exit_code() == 0
    assert result.check("coverage").evidence["S backward"] == f"{n}/{n} (non-zero {n // 2})"
    assert result.check("optimizer_state").status == "warn"  # no moments before step 1: said, not failed
    assert result.verdict.expected_zeros


@pytest.mark.parametrize("normalization", ["dr_grpo", "per_token"])
def test_diagnose_y_loss_equals_the_probes_on_a_rollouts_file_with_lengths(nr, tmp_path, normalization):
    stack, batch, _ = nr
    # the trainer normalised by lengths that are not the token counts (e.g. a padded or capped length)
    with_lengths = Batch([Group(g.prompt, g.responses, g.rewards, lengths=[len(r) + 3 + k for k, r in
                                                                           enumerate(g.responses)])
                          for g in batch.groups], temperature=batch.temperature)
    path = tmp_path / "r.jsonl"
    gp.write_rollouts(with_lengths, path)
    read = gp.read_rollouts(path, stack.tokenizer)
    groups = [0, 2]
    ly = float(batch_loss_fn(stack, read, groups, normalization)()["LY"])

    pairs = [(read.groups[p].prompt, r) for p in groups for r in read.groups[p].responses]
    with torch.no_grad():
        s = sequence_logprobs(stack.model, pack(pairs, stack.tokenizer.pad_token_id, stack.device),
                              read.temperature, stack.autocast()).double()
    # the probe's own weights (one unit per group, so no unit scaling)
    engine = _Engine(stack, read, gp.load_config(overrides=[f"probe.normalization={normalization}"]).probe,
                     {p: p for p in range(read.B)}, [1] * read.B)
    probe = float((s * torch.cat([engine.y_w[p] for p in groups])).sum())
    # and by hand: A = R - mean R, divided by G and by the loss lengths (the group's longest for dr_grpo)
    by_hand = 0.0
    k = 0
    for p in groups:
        g = read.groups[p]
        mean = sum(g.rewards) / len(g.rewards)
        for r, length in zip(g.rewards, g.lengths):
            denom = max(g.lengths) if normalization == "dr_grpo" else length
            by_hand += float(s[k]) * (r - mean) / len(g.rewards) / denom
            k += 1
    assert ly == pytest.approx(probe, rel=1e-4, abs=1e-6) and ly == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    tokens_only = float(batch_loss_fn(stack, Batch([Group(g.prompt, g.responses, g.rewards) for g in read.groups],
                                                   temperature=read.temperature), groups, normalization)()["LY"])
    assert abs(tokens_only - ly) > 1e-3 * abs(ly)  # the lengths matter: dividing by token counts differs

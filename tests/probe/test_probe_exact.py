"""The probe against brute force: per-unit gradients materialised one sequence at a time.

The reference computes every S[u,g] from an unpadded single-row forward, takes its gradient with its
own backward, forms X[u] and P grad LY[u] with the formulas of DESIGN.md written out here, and sums
X[u].Y[v] over u != v. Nothing of the probe's packing, chunking, weighting or reduction is reused.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe as gp
from gradprobe.optim.precondition import from_adam_state
from gradprobe.probe import ustat
from tests.conftest import FP32, make_cfg
from tests.support.optimizers import random_steps

LR = 3e-4


def adam_state(stack, path) -> dict:
    """A real AdamW state after three steps on random gradients, saved as a trainer would."""
    opt = torch.optim.AdamW(stack.params, lr=LR, betas=(0.9, 0.95), eps=1e-6)
    saved = [p.detach().clone() for p in stack.params]
    random_steps(opt, stack.params, steps=3, scale=1e-2, seed=5)
    with torch.no_grad():
        for p, s in zip(stack.params, saved):
            p.copy_(s)
    torch.save(opt.state_dict(), path)
    return opt.state_dict()


def sequence_grad(stack, prompt: list[int], response: list[int]) -> tuple[float, torch.Tensor]:
    ids = torch.tensor([prompt + response])
    stack.model.zero_grad(set_to_none=True)
    logits = stack.model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    s = sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)) if response else logits.sum() * 0
    s.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in stack.params])
    stack.model.zero_grad(set_to_none=True)
    return float(s.detach()), grad


def brute_force(stack, batch, scales, mode: str, block: int):
    xs, ys = [], []
    for grp in batch.groups:
        s, grads = zip(*(sequence_grad(stack, grp.prompt, r) for r in grp.responses))
        g = len(s)
        s = torch.tensor(s, dtype=torch.float64)
        grads = torch.stack(grads)
        c = torch.stack([s[i] - (s.sum() - s[i]) / (g - 1) for i in range(g)])
        rewards = torch.tensor(grp.rewards, dtype=torch.float64)
        adv = rewards - rewards.mean()
        lmax = max(max(len(r) for r in grp.responses), 1)
        xs.append((c[:, None] * grads).sum(0) / g)
        ys.append(scales * ((adv / lmax)[:, None] * grads).sum(0) / g)
    if mode == "blocks":
        idx = [list(range(i, min(i + block, len(xs)))) for i in range(0, len(xs), block)]
        xs = [torch.stack([xs[i] for i in k]).mean(0) for k in idx]
        ys = [torch.stack([ys[i] for i in k]).mean(0) for k in idx]
    b = len(xs)
    u = sum(float(xs[i] @ ys[j]) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    return u, torch.stack(xs), torch.stack(ys)


@pytest.fixture(scope="module")
def setup(fp32_stacks, rollouts_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("opt") / "optimizer.pt"
    state = adam_state(fp32_stacks["reentrant"], path)
    return path, state


@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("mode", ["exact", "blocks"])
def test_literal_and_fused_equal_brute_force(fp32_stacks, rollouts_file, setup, ckpt, mode):
    path, state = setup
    stack = fp32_stacks[ckpt]
    cfg = make_cfg(*FP32, f"checkpointing={ckpt}", f"batch.rollouts={rollouts_file}", f"probe.mode={mode}",
                   "probe.block_size=2", "probe.microbatch_size=4", "probe.precondition=adam",
                   f"probe.optimizer_state={path}")
    batch = gp.build_batch(stack, cfg)
    # P written out from the optimizer's own state, not through gradprobe's mapping.
    scales = []
    for i in range(len(stack.params)):
        st, grp = state["state"][i], state["param_groups"][0]
        v_hat = st["exp_avg_sq"].double() / (1 - grp["betas"][1] ** float(st["step"]))
        scales.append((1 / (v_hat.sqrt() + grp["eps"])).reshape(-1))
    ref_u, xs, ys = brute_force(stack, batch, torch.cat(scales), mode, 2)
    assert math.isfinite(ref_u) and abs(ref_u) > 0
    ref = ustat.summarize_cross(xs @ ys.T)  # every SE from the brute-force per-unit gradients
    assert math.isfinite(ref.se_unbiased) == (mode == "exact")  # 6 units, or 3 blocks (< 4: no estimate)
    for schedule in ("literal", "fused"):
        cfg = cfg.with_values({"probe.schedule": schedule})
        res = gp.delta_h1(stack, batch, cfg)
        assert res.learning_rate == LR  # taken from the optimizer state
        assert res.U_cross == pytest.approx(ref_u, rel=1e-4), schedule
        assert res.deltaH1 == pytest.approx(-LR * ref_u, rel=1e-4), schedule
        assert res.bars_dot == pytest.approx(float(xs.mean(0) @ ys.mean(0)), rel=1e-4)
        assert res.diag_sum == pytest.approx(float((xs * ys).sum()), rel=1e-4)
        assert res.x_sum_norm == pytest.approx(float(xs.sum(0).norm()), rel=1e-4)
        assert res.y_sum_norm == pytest.approx(float(ys.sum(0).norm()), rel=1e-4)
        assert res.x_nonnull == res.y_nonnull == res.n_tensors
        assert sum(res.row_means) / len(res.row_means) == pytest.approx(res.U_cross, rel=1e-5)
        assert res.U_cross_se == pytest.approx(ref.se, rel=1e-4)
        assert res.U_cross_se_jackknife == pytest.approx(ref.se_jackknife, rel=1e-4, nan_ok=True)
        if schedule == "literal" or mode == "blocks":  # literal keeps no bank of per-unit gradients
            assert math.isnan(res.se_unbiased) and math.isnan(res.U_cross_var_unbiased)
        else:
            assert res.U_cross_se_unbiased == pytest.approx(ref.se_unbiased, rel=1e-4)
            assert res.se_unbiased == pytest.approx(LR * ref.se_unbiased, rel=1e-4)
            assert res.U_cross_var_unbiased == pytest.approx(ref.var_unbiased, rel=1e-3, abs=1e-4 * ref_u ** 2)
        assert sum(m["deltaH1"] for m in res.modules) == pytest.approx(res.deltaH1, rel=1e-6)


def test_fused_costs_one_forward_and_two_backwards_per_unit(fp32_stacks, rollouts_file):
    stack = fp32_stacks["non_reentrant"]
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", "probe.microbatch_size=8", "probe.schedule=fused")
    batch = gp.build_batch(stack, cfg)
    fused = gp.delta_h1(stack, batch, cfg)
    assert (fused.forwards, fused.backwards) == (batch.B, 2 * batch.B)
    cfg = cfg.with_values({"probe.schedule": "literal"})
    literal = gp.delta_h1(stack, batch, cfg)
    packed = math.ceil(batch.B * batch.G / 8)  # the X-pass and Y-pass pack two groups per forward
    assert literal.forwards == literal.backwards == 2 * packed + 2 * batch.B


@pytest.mark.parametrize("schedule", ["fused", "literal"])
def test_microbatch_size_changes_nothing(fp32_stacks, rollouts_file, schedule):
    stack = fp32_stacks["reentrant"]
    results = []
    for mb in (1, 3, 4, 16):
        cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", f"probe.microbatch_size={mb}",
                       f"probe.schedule={schedule}")
        results.append(gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg))
    for r in results[1:]:
        assert r.U_cross == pytest.approx(results[0].U_cross, rel=1e-5)
        assert r.se == pytest.approx(results[0].se, rel=1e-4)
        assert r.x_sum_norm == pytest.approx(results[0].x_sum_norm, rel=1e-5)


@pytest.mark.parametrize("schedule", ["fused", "packed"])
def test_accumulating_on_cpu_matches_device(fp32_stacks, rollouts_file, schedule, monkeypatch):
    """With the bank on the host, P, the dots and the sums run where the gradients are formed (device) or in
    the host step after the bank copy (cpu): two code paths, on a CPU too, that must agree."""
    from gradprobe.probe.sink import UnitSink

    stack = fp32_stacks["reentrant"]
    host_steps = []
    original = UnitSink._host
    monkeypatch.setattr(UnitSink, "_host", lambda self, *a: host_steps.append(self.on_device) or original(self, *a))
    out = []
    for where in ("device", "cpu"):
        cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", f"probe.accumulate_on={where}",
                       f"probe.schedule={schedule}", "probe.bank=host")
        host_steps.clear()
        res = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
        assert host_steps and set(host_steps) == {where == "device"}  # sums formed before or after the copy
        out.append(res)
    assert out[0].U_cross == pytest.approx(out[1].U_cross, rel=1e-6)
    assert out[0].se_unbiased == pytest.approx(out[1].se_unbiased, rel=1e-6)
    assert out[0].diag_sum == pytest.approx(out[1].diag_sum, rel=1e-6)


def test_optimizer_state_by_name_matches_by_index(fp32_stacks):
    stack = fp32_stacks["reentrant"]
    # lr 0 leaves the shared stack's weights as they are
    opt = torch.optim.AdamW(list(zip(stack.names, stack.params)), lr=0.0, weight_decay=0.0)
    for p in stack.params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in stack.params:
        p.grad = None
    named = opt.state_dict()
    assert "param_names" in named["param_groups"][0]
    reversed_state = {"state": {len(stack.params) - 1 - k: v for k, v in named["state"].items()},
                      "param_groups": [{**named["param_groups"][0],
                                        "param_names": named["param_groups"][0]["param_names"][::-1],
                                        "params": list(range(len(stack.params)))}]}
    a = from_adam_state(named, stack.names, stack.params)
    b = from_adam_state(reversed_state, stack.names, stack.params)
    assert all(torch.equal(x, y) for x, y in zip(a.scales, b.scales))

"""The packed schedule (k units per forward, one backward) against brute force and the literal schedule:
k = 1, 2, 3 and a k that does not divide B, a unit split across forwards, exact and blocks mode, both
checkpointing modes, on rollouts with unequal response lengths and left padding (fp32 compute)."""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe as gp
from gradprobe.probe import unit_directions, unit_gradients, ustat
from tests.conftest import FP32, make_cfg
from tests.probe.test_probe_exact import LR, adam_state, brute_force

# microbatch in sequences (G = 4, B = 6): k = 1, 2, 3, 4 (4 does not divide 6), and 3 < G (a unit split)
MICROBATCHES = {4: "k=1", 8: "k=2", 12: "k=3", 16: "k=4", 3: "split"}


@pytest.fixture(scope="module")
def reference(fp32_stacks, rollouts_file, tmp_path_factory):
    """Per (checkpointing, mode): the brute-force per-unit gradients with P from the optimizer's own state."""
    path = tmp_path_factory.mktemp("opt") / "optimizer.pt"
    state = adam_state(fp32_stacks["reentrant"], path)
    grp = state["param_groups"][0]
    moments = [state["state"][i] for i in range(len(state["state"]))]
    scales = torch.cat([(1 / ((st["exp_avg_sq"].double() / (1 - grp["betas"][1] ** float(st["step"]))).sqrt()
                              + grp["eps"])).reshape(-1) for st in moments])
    cache: dict = {}

    def get(ckpt: str, mode: str):
        if (ckpt, mode) not in cache:
            stack = fp32_stacks[ckpt]
            cfg = make_cfg(*FP32, f"checkpointing={ckpt}", f"batch.rollouts={rollouts_file}", f"probe.mode={mode}",
                           "probe.block_size=2", "probe.precondition=adam", f"probe.optimizer_state={path}")
            batch = gp.build_batch(stack, cfg)
            cache[ckpt, mode] = (cfg, batch, brute_force(stack, batch, scales, mode, 2))
        return cache[ckpt, mode]
    return get


def test_rollouts_have_unequal_lengths_and_left_padding(fp32_stacks, rollouts_file):
    batch = gp.build_batch(fp32_stacks["reentrant"], make_cfg(*FP32, f"batch.rollouts={rollouts_file}"))
    assert len({len(r) for g in batch.groups for r in g.responses}) > 1
    assert len({len(g.prompt) for g in batch.groups}) > 1  # rows of one forward are left-padded


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("mode", ["exact", "blocks"])
def test_packed_equals_brute_force_and_literal(fp32_stacks, reference, ckpt, mode):
    stack = fp32_stacks[ckpt]
    cfg, batch, (ref_u, xs, ys) = reference(ckpt, mode)
    ref = ustat.summarize_cross(xs @ ys.T)
    cfg = cfg.with_values({"probe.schedule": "literal"})
    literal = gp.delta_h1(stack, batch, cfg)
    cfg = cfg.with_values({"probe.schedule": "packed"})
    for mb, label in MICROBATCHES.items():
        cfg = cfg.with_values({"probe.microbatch_size": mb})
        res = gp.delta_h1(stack, batch, cfg)
        assert res.schedule == "packed", label
        # one backward per forward; a split unit adds no-grad forwards for its whole-group baseline
        assert res.backwards == res.forwards if label != "split" else res.backwards < res.forwards, label
        assert res.U_cross == pytest.approx(ref_u, rel=1e-5), label
        assert res.U_cross == pytest.approx(literal.U_cross, rel=1e-5), label
        assert res.deltaH1 == pytest.approx(-LR * ref_u, rel=1e-5), label
        assert res.bars_dot == pytest.approx(float(xs.mean(0) @ ys.mean(0)), rel=1e-5), label
        assert res.diag_sum == pytest.approx(float((xs * ys).sum()), rel=1e-5), label
        assert res.x_sum_norm == pytest.approx(float(xs.sum(0).norm()), rel=1e-5), label
        assert res.y_sum_norm == pytest.approx(float(ys.sum(0).norm()), rel=1e-5), label
        assert res.U_cross_se == pytest.approx(ref.se, rel=1e-5), label
        assert res.se == pytest.approx(literal.se, rel=1e-5), label
        if mode == "exact":  # 3 blocks are too few for the unbiased variance
            assert res.U_cross_se_unbiased == pytest.approx(ref.se_unbiased, rel=1e-4), label
        assert res.x_nonnull == res.y_nonnull == res.n_tensors
        assert sum(m["deltaH1"] for m in res.modules) == pytest.approx(res.deltaH1, rel=1e-6)
    assert all(p.grad is None for p in stack.params)
    assert all("forward" not in vars(m) for m in stack.model.modules())


def test_packing_counts_and_the_bank_on_either_side(fp32_stacks, rollouts_file):
    """k units share one forward and one backward; a bank on the device or the host gives the same numbers."""
    stack = fp32_stacks["non_reentrant"]
    cfg = make_cfg(*FP32, "checkpointing=non_reentrant", f"batch.rollouts={rollouts_file}",
                   "probe.schedule=packed", "probe.microbatch_size=12")
    batch = gp.build_batch(stack, cfg)
    out = {}
    for bank in ("device", "host"):
        cfg = cfg.with_values({"probe.bank": bank})
        out[bank] = gp.delta_h1(stack, batch, cfg)
    dev, host = out["device"], out["host"]
    assert dev.forwards == dev.backwards == math.ceil(batch.B / 3)
    assert any("on cpu" in n for n in dev.notes) and any("on the host" in n for n in host.notes)
    assert host.U_cross == pytest.approx(dev.U_cross, rel=1e-9)
    assert host.se_unbiased == pytest.approx(dev.se_unbiased, rel=1e-9)
    assert host.row_means == pytest.approx(dev.row_means, rel=1e-9)


@pytest.mark.slow
def test_without_room_for_a_bank_sums_stream_and_a_named_bank_is_refused(fp32_stacks, rollouts_file, monkeypatch):
    """auto: no bank fits, so the row means come from a second pass of directional derivatives (no K, no
    pairwise SE) and the result says so; a bank asked for by name is refused with the settings that fit."""
    import gradprobe.probe.sink as sink

    stack = fp32_stacks["reentrant"]
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", "probe.schedule=packed", "probe.microbatch_size=8")
    batch = gp.build_batch(stack, cfg)
    banked = gp.delta_h1(stack, batch, cfg)
    n = gp.probe.engine.FlatLayout(stack.params).n
    monkeypatch.setattr(sink, "available_host_memory", lambda: int(3 * 8 * n / 0.9) + 1)  # 3 units fit
    streamed = gp.delta_h1(stack, batch, cfg)
    assert any(note.startswith("no bank") for note in streamed.notes)
    assert streamed.forwards == streamed.backwards == 2 * banked.forwards  # the second pass
    assert streamed.U_cross == pytest.approx(banked.U_cross, rel=1e-9)
    assert streamed.row_means == pytest.approx(banked.row_means, rel=1e-5, abs=1e-9 * max(map(abs, banked.row_means)))
    assert streamed.se == pytest.approx(banked.se, rel=1e-5)
    assert math.isnan(streamed.se_unbiased) and not math.isnan(banked.se_unbiased)
    cfg = cfg.with_values({"probe.bank": "host"})
    with pytest.raises(gp.GradprobeError, match=r"needs .* for 6 units .*probe\.block_size=2 \(3 units fit\)"
                                                r".*probe\.bank=none"):
        gp.delta_h1(stack, batch, cfg)
    cfg = cfg.with_values({"probe.mode": "blocks", "probe.block_size": 2})
    assert gp.delta_h1(stack, batch, cfg).B == 3  # the suggested setting runs with a bank


def test_packed_says_when_a_tensor_is_not_a_lora_weight_and_takes_two_backwards(fp32_stacks, rollouts_file):
    """Never a silent fallback: the result names the schedule that ran and why; the numbers stay exact."""
    stack = fp32_stacks["reentrant"]
    name, norm = next((n, p) for n, p in stack.model.named_parameters() if n.endswith("norm.weight"))
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", "probe.schedule=packed")
    batch = gp.build_batch(stack, cfg)
    norm.requires_grad_(True)
    stack.refresh_params()
    try:
        res = gp.delta_h1(stack, batch, cfg)
        cfg = cfg.with_values({"probe.schedule": "literal"})
        literal = gp.delta_h1(stack, batch, cfg)
    finally:
        norm.requires_grad_(False)
        stack.refresh_params()
    assert res.schedule == "fused" and res.backwards == 2 * batch.B
    assert any(f"1 tensor(s) are not (first: '{name}'): ran fused" in note for note in res.notes)
    assert res.x_nonnull == res.n_tensors == len(stack.params) + 1
    assert res.U_cross == pytest.approx(literal.U_cross, rel=1e-5)


@pytest.mark.parametrize("mb", [pytest.param(3, marks=pytest.mark.slow), 12])
def test_directional_derivatives_match_per_unit_gradients(fp32_stacks, rollouts_file, tmp_path, mb):
    """X[u].v and Y[u].v from one packed backward against the per-unit gradients of two backwards each."""
    stack = fp32_stacks["reentrant"]
    path = tmp_path / "optimizer.pt"
    adam_state(stack, path)
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", f"probe.microbatch_size={mb}",
                   "probe.precondition=adam", f"probe.optimizer_state={path}")
    batch = gp.build_batch(stack, cfg)
    precond = gp.api.preconditioner(stack, cfg)
    v = torch.randn(stack.n_params, generator=torch.Generator().manual_seed(3))
    got = unit_directions(stack, batch, cfg.probe, precond, v)
    want = unit_gradients(stack, batch, cfg.probe, precond)
    for k in ("x", "y"):
        ref = want[k].double() @ v.double()
        assert torch.allclose(got[k], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), k
    with pytest.raises(gp.GradprobeError, match="one per trainable parameter"):
        unit_directions(stack, batch, cfg.probe, precond, v[:-1])

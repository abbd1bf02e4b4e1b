"""The fast plumbing of the probe against plain computations: blocked per-tensor dots, in-place gradient
buffers under both checkpointing modes, and the one_backward schedule against the literal schedule."""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe as gp
from gradprobe.params import FlatGrads, FlatLayout, GradReader

FP32 = ["autocast='off'", "quant.compute_dtype=float32"]


def test_layout_dots_match_float64():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(3, 5), (1,), (2048, 3), (7, 1030)]]
    layout = FlatLayout(params, block=1024)
    assert all(o % 1024 == 0 for o in layout.offsets) and layout.n % 1024 == 0
    a = layout.gather([torch.randn(p.shape, generator=g) for p in params], torch.device("cpu"))
    b = layout.gather([torch.randn(p.shape, generator=g) for p in params], torch.device("cpu"))
    want = torch.stack([(x.double() * y.double()).sum() for x, y in zip(layout.views(a), layout.views(b))])
    assert torch.allclose(layout.dots(a, b), want, rtol=1e-6, atol=1e-9)
    rows = torch.stack([a, b, a - 3 * b])
    scale = float(rows.norm(dim=1).max()) ** 2  # fp32 inside 8192-column slabs, fp64 across them
    want = rows.double() @ rows[:2].double().T
    assert torch.allclose(layout.cross_dots(rows, rows[:2]), want, rtol=0, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def stacks():
    return {mode: gp.load_stack(gp.load_config(overrides=[*FP32, f"checkpointing={mode}"]))
            for mode in ("reentrant", "non_reentrant")}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_flat_grads_accumulate_in_place(stacks, mode):
    """backward() must add into the buffer behind .grad, not swap in a fresh tensor."""
    stack = stacks[mode]
    cfg = gp.load_config(overrides=[*FP32, f"checkpointing={mode}", "batch.num_prompts=2", "batch.group_size=2"])
    batch = gp.build_batch(stack, cfg)
    ids = torch.tensor([batch.groups[0].prompt + batch.groups[0].responses[0]])

    def loss() -> torch.Tensor:
        return stack.model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum()

    stack.model.zero_grad(set_to_none=True)
    loss().backward()
    layout = FlatLayout(stack.params)
    want = torch.zeros(layout.n)
    GradReader(stack.params, layout).add(want)
    stack.model.zero_grad(set_to_none=True)

    flat = torch.full((layout.n,), 0.0)
    grads = FlatGrads(stack.params, layout)
    try:
        grads.point(flat)
        ptrs = [p.grad.data_ptr() for p in stack.params]
        loss().backward()
        loss().backward()
        assert [p.grad.data_ptr() for p in stack.params] == ptrs
        assert grads.take() == len(stack.params)
    finally:
        grads.close()
    assert all(p.grad is None for p in stack.params)
    assert torch.allclose(flat, 2 * want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_one_backward_equals_literal(stacks, mode):
    stack = stacks[mode]
    cfg = gp.load_config(overrides=[*FP32, f"checkpointing={mode}", "batch.num_prompts=4", "batch.group_size=3",
                                    "batch.max_new_tokens=8", "probe.microbatch_size=2"])
    batch = gp.build_batch(stack, cfg)  # microbatch 2 < G 3: groups split across forwards
    out = {}
    for schedule in ("literal", "one_backward", "fused"):
        cfg = cfg.with_values({"probe.schedule": schedule})
        out[schedule] = gp.delta_h1(stack, batch, cfg)
    lit, one = out["literal"], out["one_backward"]
    assert math.isnan(lit.se_unbiased) and one.se_unbiased > 0  # the bank gives K; literal has none
    assert one.se_unbiased == pytest.approx(out["fused"].se_unbiased, rel=1e-5)
    assert one.schedule == "one_backward"
    assert one.backwards == 2 * batch.B  # two chunks per unit, one backward each
    assert lit.backwards == 4 * one.backwards  # X-pass, Y-pass, and two per chunk in the diagonal loop
    assert one.x_nonnull == one.y_nonnull == one.n_tensors
    assert one.U_cross == pytest.approx(lit.U_cross, rel=1e-5)
    assert one.diag_sum == pytest.approx(lit.diag_sum, rel=1e-5)
    assert one.se == pytest.approx(lit.se, rel=1e-5)
    assert one.x_sum_norm == pytest.approx(lit.x_sum_norm, rel=1e-5)
    assert all(p.grad is None for p in stack.params)
    # forwards are left as they were: the layers are no longer routed through the probe
    assert all("forward" not in vars(m) for m in stack.model.modules())


def test_one_backward_refuses_when_a_tensor_is_not_a_lora_weight(stacks):
    """No silent fallback: the schedule names the tensor and the schedule that can run."""
    stack = stacks["reentrant"]
    norm_name, norm = next((n, p) for n, p in stack.model.named_parameters() if n.endswith("norm.weight"))
    cfg = gp.load_config(overrides=[*FP32, "batch.num_prompts=3", "batch.group_size=2", "batch.max_new_tokens=6",
                                    "probe.microbatch_size=2"])
    batch = gp.build_batch(stack, cfg)
    norm.requires_grad_(True)
    stack.refresh_params()
    try:
        cfg = cfg.with_values({"probe.schedule": "one_backward"})
        with pytest.raises(gp.GradprobeError, match=rf"'{norm_name}' is not the weight of one.*schedule=fused"):
            gp.delta_h1(stack, batch, cfg)
        cfg = cfg.with_values({"probe.schedule": "fused"})
        assert gp.delta_h1(stack, batch, cfg).x_nonnull == len(stack.params)  # the norm weight is counted
    finally:
        norm.requires_grad_(False)
        stack.refresh_params()
    assert all("forward" not in vars(m) for m in stack.model.modules())


def test_host_bank_that_cannot_fit_is_refused_before_any_unit(stacks, monkeypatch):
    """fused keeps its bank on the host (packed's bank choice: tests/probe/test_probe_packed.py)."""
    import gradprobe.probe.sink as probe

    stack = stacks["non_reentrant"]
    cfg = gp.load_config(overrides=[*FP32, "checkpointing=non_reentrant", "batch.num_prompts=4", "batch.group_size=2",
                                    "probe.schedule=fused"])
    batch = gp.build_batch(stack, cfg)
    need = 2 * 4 * probe.FlatLayout(stack.params).n * 4
    monkeypatch.setattr(probe, "available_host_memory", lambda: need)  # 10% short of the 90% margin
    with pytest.raises(gp.GradprobeError, match=r"GiB for 4 units .* probe\.mode=blocks"):
        gp.delta_h1(stack, batch, cfg)
    monkeypatch.setattr(probe, "available_host_memory", lambda: 2 * need)
    assert gp.delta_h1(stack, batch, cfg).B == 4


def test_cudnn_attention_is_off_in_every_forward_and_put_back(stacks):
    """Forwards, and recomputation inside backward under reentrant checkpointing, run without cuDNN attention
    (it plans per sequence shape); the user's setting is restored afterwards."""
    stack = stacks["reentrant"]
    cfg = gp.load_config(overrides=[*FP32, "batch.num_prompts=3", "batch.group_size=2"])
    batch = gp.build_batch(stack, cfg)
    seen: list[tuple[bool, bool]] = []
    layer = stack.model.get_base_model().model.layers[0]
    hook = layer.register_forward_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled())))
    try:
        assert torch.backends.cuda.cudnn_sdp_enabled()
        gp.delta_h1(stack, batch, cfg)
    finally:
        hook.remove()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert seen and not any(enabled for _, enabled in seen)
    assert any(grad for grad, _ in seen)  # recomputation in backward (grad on) was seen too

"""The GPU paths on a GPU: schedules, host transfers, diagnose, validate and env, with the real CUDA
bitsandbytes kernels. Skipped unless GRADPROBE_TEST_CUDA=1 and a GPU is visible (CI has none)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.cli import app
from tests.optim.test_update import _make, loss_grads, real_step, trained  # at the top: a CPU run collects it

pytestmark = pytest.mark.skipif(os.environ.get("GRADPROBE_TEST_CUDA") != "1" or not torch.cuda.is_available(),
                                reason="GPU tests: set GRADPROBE_TEST_CUDA=1 on a machine with a GPU")

CUDA = ["device=cuda"]
FP32 = ["autocast=off", "quant.compute_dtype=float32"]


def _cfg(*overrides: str) -> dict:
    return gp.load_config(overrides=[*CUDA, *overrides])


@pytest.fixture(scope="module", params=["reentrant", "non_reentrant"])
def bf16(request):
    """The embedded default (nf4, bf16 autocast) on the GPU, one batch per checkpointing mode."""
    cfg = _cfg(f"checkpointing={request.param}")
    stack = gp.load_stack(cfg)
    assert stack.device.type == "cuda" and all(p.device.type == "cuda" for p in stack.params)
    return stack, gp.build_batch(stack, cfg), cfg


def test_schedules_agree_on_the_gpu(bf16):
    stack, batch, cfg = bf16
    mode = cfg.checkpointing
    run = {name: gp.delta_h1(stack, batch, _cfg(f"checkpointing={mode}", *sets)) for name, sets in {
        "fused": ["probe.schedule=fused"], "literal": ["probe.schedule=literal"],
        "one_backward": ["probe.schedule=one_backward"],
        "host": ["probe.schedule=fused", "probe.accumulate_on=cpu"],
        "mb2": ["probe.schedule=fused", "probe.microbatch_size=2"],
        "packed": ["probe.schedule=packed"], "packed_host": ["probe.schedule=packed", "probe.bank=host"],
        "packed_mb12": ["probe.schedule=packed", "probe.microbatch_size=12"]}.items()}
    fused = run["fused"]
    assert fused.x_nonnull == fused.y_nonnull == fused.n_tensors and fused.peak_memory_kind == "cuda_max_allocated"
    assert fused.deltaH1 != 0 and fused.se > 0
    # the same microbatching and the same kernels: the 1e-3 relative target, by a wide margin
    assert abs(run["literal"].deltaH1 / fused.deltaH1 - 1) < 1e-3
    # sums on the host instead of the device: the same dots of the same gradients
    assert run["host"].deltaH1 == pytest.approx(fused.deltaH1, rel=1e-6)
    assert run["host"].se == pytest.approx(fused.se, rel=1e-6)
    # other microbatches or one backward round differently in bf16: far inside the standard error
    for name in ("one_backward", "mb2", "packed", "packed_mb12"):
        assert abs(run[name].deltaH1 - fused.deltaH1) < 0.05 * fused.se, name
    # the bank on the device or on the host: the same per-unit products
    assert any("on cuda" in note for note in run["packed"].notes)
    assert any("on the host" in note for note in run["packed_host"].notes)
    assert run["packed_host"].deltaH1 == pytest.approx(run["packed"].deltaH1, rel=1e-6)
    assert run["packed_host"].se_unbiased == pytest.approx(run["packed"].se_unbiased, rel=1e-5)
    assert run["packed"].backwards < batch.B  # several units per backward


def test_fp32_fused_equals_literal_on_the_gpu():
    cfg = _cfg(*FP32, "checkpointing=reentrant", "batch.num_prompts=6", "probe.schedule=fused")
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    fused = gp.delta_h1(stack, batch, cfg)
    literal = gp.delta_h1(stack, batch, _cfg(*FP32, "checkpointing=reentrant", "probe.schedule=literal"))
    assert fused.deltaH1 == pytest.approx(literal.deltaH1, rel=1e-5)
    assert fused.se == pytest.approx(literal.se, rel=1e-5)
    assert fused.row_means == pytest.approx(literal.row_means, rel=1e-4, abs=1e-12)
    for mb in (8, 12):  # 2 and 3 units per backward
        packed = gp.delta_h1(stack, batch, _cfg(*FP32, "checkpointing=reentrant", "probe.schedule=packed",
                                                f"probe.microbatch_size={mb}"))
        assert packed.deltaH1 == pytest.approx(literal.deltaH1, rel=1e-5)
        assert packed.se_unbiased == pytest.approx(fused.se_unbiased, rel=1e-5)


def test_diagnose_on_the_gpu(tmp_path):
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["diagnose", *("--set", "device=cuda"), "--quiet", "--json", str(out)])
    assert res.exit_code == 1, res.output
    verdict = json.loads(out.read_text())["verdict"]
    assert verdict["root_cause"] == "reentrant_checkpointing_hides_params" and verdict["probe_path_healthy"]
    res = CliRunner().invoke(app, ["diagnose", *("--set", "device=cuda"), "--set", "checkpointing=non_reentrant",
                                   "--quiet", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["verdict"]["root_cause"] == "healthy"


def test_validate_on_the_gpu():
    res = CliRunner().invoke(app, ["validate", "--set", "device=cuda", "--json", "-"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)["result"]["points"][0]
    assert abs(first["ratio_exact"] - 1) < 0.01
    assert first["ratio_low"] <= 1.0 <= first["ratio_high"], first


def test_env_sees_the_gpu():
    res = CliRunner().invoke(app, ["env", "--json", "-"])
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)
    assert env["torch"]["cuda_available"] and env["torch"]["driver_cuda"] is not None
    assert env["torch"]["devices"][0]["name"] == torch.cuda.get_device_name(0)
    assert env["bitsandbytes"]["backend"] == "CUDA" and env["bitsandbytes"]["native_library_loaded"]


@pytest.mark.parametrize("kind", ["adamw-fused", "adamw-amsgrad", "paged-adamw-8bit", "adamw-8bit", "adamw-32bit"])
def test_real_update_on_the_gpu(kind):
    """The next step reconstructed with the CUDA kernels: bitsandbytes' 8-bit blockwise and paged optimizers
    run for real here (on a CPU paged ones run unpaged), and the parts still add up to the step."""
    from gradprobe.optim.update import decompose, mapped_state, real_update, step_settings

    stack = gp.load_stack(_cfg(*FP32))
    opt = trained(stack, _make(kind))
    grads = loss_grads(stack, 7)
    before = [p.detach().clone() for p in stack.params]
    predicted = real_update(opt, stack.params, grads, max_grad_norm=0.05)
    parts = decompose(step_settings(opt, stack.names, stack.params, max_grad_norm=0.05),
                      mapped_state(opt, stack.names, stack.params), stack.names, stack.params, grads)
    assert all(torch.equal(p.detach(), b) for p, b in zip(stack.params, before))
    truth = [t.cpu() for t in real_step(stack, opt, grads, max_grad_norm=0.05)]
    for got, want in zip(predicted, truth):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # The parts are fp32 arithmetic on the host from the (dequantised) state; the CUDA kernels round and order
    # their own arithmetic, so the sum meets the kernels' step to a small fraction of the step, not to ulps.
    total = parts.total([g.cpu() for g in grads])
    dev = max(float((t - w).abs().max()) for t, w in zip(total, truth)) / max(float(w.abs().max()) for w in truth)
    print(f"{kind}: parts vs the CUDA step, max deviation {dev:.2e} of the largest step")
    assert dev < 1e-3

"""The real-step estimator (probe/real_step.py) against brute force and by Monte Carlo on synthetic units."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradprobe.probe import real_step
from tests.support.optimizers import random_steps


def _units(g: torch.Generator, b: int, n: int = 6):
    """X[u] and G[u] sharing noise (as score gradients of the same samples do)."""
    mx = torch.linspace(-0.3, 0.4, n, dtype=torch.float64)
    mg = torch.linspace(0.2, -0.2, n, dtype=torch.float64)
    ex = torch.randn(b, n, generator=g, dtype=torch.float64)
    return mx + ex, mg + 0.6 * ex + torch.randn(b, n, generator=g, dtype=torch.float64), mx


def test_same_batch_equals_brute_force_over_distinct_pairs():
    g = torch.Generator().manual_seed(1)
    b, n = 7, 6
    x, gr, _ = _units(g, b, n)
    a = -torch.rand(n, generator=g, dtype=torch.float64)
    mom, dec = torch.randn(n, generator=g, dtype=torch.float64), 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    clip = 0.7
    d = clip * a * gr + mom + dec  # D[v]
    est = real_step.same_batch(x @ (clip * a * gr).T, x @ mom, x @ dec, clip)
    brute = -sum(float(x[u] @ d[v]) for u, v in itertools.permutations(range(b), 2)) / (b * (b - 1))
    assert est.deltaH == pytest.approx(brute, rel=1e-12)
    assert est.deltaH == pytest.approx(est.fresh.value + est.momentum.value + est.weight_decay.value, rel=1e-12)
    assert est.momentum.value == pytest.approx(-float(x.mean(0) @ mom), rel=1e-12)
    assert est.momentum.se == pytest.approx(float((x @ mom).std()) / math.sqrt(b), rel=1e-12)
    assert est.parts()["clip_factor"] == clip and est.entropy_batch == "same"


def test_same_batch_se_is_calibrated_for_the_batch_step_and_independent_agrees():
    """4000 batches of B=8: z = (deltaH - (-mu_X . Delta theta))/se has SD ~ 1 (the step held at its batch
    value), and the independent-batch estimate (B_E=32) of the same step agrees within the combined SE."""
    g = torch.Generator().manual_seed(2)
    b, n, trials = 8, 6, 4000
    a = -0.5 - torch.rand(n, generator=g, dtype=torch.float64)
    mom = torch.linspace(0.5, -0.4, n, dtype=torch.float64)
    dec = -0.05 * torch.ones(n, dtype=torch.float64)
    z, z_ind, agree = [], [], []
    for _ in range(trials):
        x, gr, mx = _units(g, b, n)
        x_e, _, _ = _units(g, 4 * b, n)  # a t statistic: its SD is sqrt(df/(df-2)), 1.18 at B_E = 8
        step = a * gr.mean(0) + mom + dec
        truth = -float(mx @ step)
        est = real_step.same_batch(x @ (a * gr).T, x @ mom, x @ dec, 1.0)
        ind = real_step.independent(x_e @ (a * gr.mean(0)), x_e @ mom, x_e @ dec, 1.0)
        z.append((est.deltaH - truth) / est.se_deltaH)
        z_ind.append((ind.deltaH - truth) / ind.se_deltaH)
        agree.append(abs(est.deltaH - ind.deltaH) <= 2 * math.hypot(est.se_deltaH, ind.se_deltaH))
    z_t, zi = torch.tensor(z), torch.tensor(z_ind)
    assert abs(float(z_t.mean())) < 0.06 and abs(float(zi.mean())) < 0.06
    assert 0.9 < float(z_t.std()) < 1.12 and 0.9 < float(zi.std()) < 1.15
    assert sum(agree) / trials > 0.93


@pytest.mark.parametrize("precondition", ["identity", "adam"])
def test_engine_hook_equals_brute_force_from_unit_gradients(fp32_stacks, rollouts_file, tmp_path, precondition):
    """The fused probe's deltaH for a given decomposition (random a, momentum, decay, clip 0.6) equals
    -U(X[u] . D[v]) formed from the per-unit gradients of unit_gradients; with the SGD decomposition
    (a = -lr, nothing else) it is deltaH1 itself. With P the bank holds P grad LY and the hook divides it out."""
    import gradprobe as gp
    from gradprobe.optim.precondition import Preconditioner, from_adam_state
    from gradprobe.optim.update import UpdateParts
    from tests.probe.test_probe_exact import LR, adam_state

    stack = fp32_stacks["non_reentrant"]
    cfg = gp.load_config(overrides=["autocast=off", "quant.compute_dtype=float32", "checkpointing=non_reentrant",
                                    f"batch.rollouts={rollouts_file}"])
    batch = gp.build_batch(stack, cfg)
    precond = Preconditioner(None) if precondition == "identity" else \
        from_adam_state(adam_state(stack, tmp_path / "opt.pt"), stack.names, stack.params)
    g = torch.Generator().manual_seed(3)
    a = [-LR * (0.5 + torch.rand(p.shape, generator=g)) for p in stack.params]
    mom = [1e-4 * torch.randn(p.shape, generator=g) for p in stack.params]
    dec = [-1e-5 * p.detach().clone() for p in stack.params]
    seen = []

    def parts(grads):
        seen.append(torch.cat([t.reshape(-1) for t in grads]))
        return UpdateParts(a, mom, dec, 0.6)

    r = gp.probe.run_probe(stack, batch, cfg.probe, precond, LR, step_parts=parts)
    raw = gp.probe.unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("x", "y"))
    x, gy = raw["x"].double(), -raw["y"].double()  # G[v]: gradient of the loss -LY[v]
    flat = [torch.cat([t.reshape(-1) for t in ts]).double() for ts in (a, mom, dec)]
    assert torch.allclose(seen[0].double(), gy.mean(0), rtol=1e-4, atol=1e-9)
    d = 0.6 * flat[0] * gy + flat[1] + flat[2]
    b = x.shape[0]
    k = x @ d.T
    want = -(float(k.sum()) - float(k.diagonal().sum())) / (b * (b - 1))
    assert r.deltaH == pytest.approx(want, rel=1e-4)
    assert r.parts["momentum"]["value"] == pytest.approx(-float(x.mean(0) @ flat[1]), rel=1e-4)
    assert r.parts["weight_decay"]["value"] == pytest.approx(-float(x.mean(0) @ flat[2]), rel=1e-4)
    assert r.update_norm == pytest.approx(float(d.mean(0).norm()), rel=1e-4)
    assert r.deltaH_unrounded == r.deltaH and "rounding" not in r.parts
    # a rounding part (what a bf16 run's dtype does to the step) is a fixed vector like momentum: deltaH moves
    # by -Xbar . rounding, the unrounded deltaH is the one above, and the step's norm is the rounded step's
    rnd = [1e-4 * torch.randn(p.shape, generator=g) for p in stack.params]
    rounded = gp.probe.run_probe(stack, batch, cfg.probe, precond, LR, step_parts=lambda grads: UpdateParts(
        a, mom, dec, 0.6, rounding=rnd, rounded_away=0.25, theta_norm=2.0))
    flat_r = torch.cat([t.reshape(-1) for t in rnd]).double()
    assert rounded.parts["rounding"]["value"] == pytest.approx(-float(x.mean(0) @ flat_r), rel=1e-4)
    assert rounded.deltaH == pytest.approx(want - float(x.mean(0) @ flat_r), rel=1e-4)
    assert rounded.deltaH_unrounded == pytest.approx(r.deltaH, rel=1e-9)
    assert rounded.update_norm == pytest.approx(float((d.mean(0) + flat_r).norm()), rel=1e-4)
    assert rounded.update_norm_unrounded == pytest.approx(r.update_norm, rel=1e-6)
    assert rounded.rounded_away == 0.25 and rounded.update_rel == pytest.approx(rounded.update_norm / 2.0)
    assert math.isfinite(r.se_deltaH) and r.se_deltaH > 0 and r.parts["clip_factor"] == 0.6
    sgd = gp.probe.run_probe(stack, batch, cfg.probe, Preconditioner(None), LR,
                             step_parts=lambda grads: UpdateParts(
                                 fresh=[torch.full(p.shape, -LR) for p in stack.params],
                                 momentum=[torch.zeros(p.shape) for p in stack.params],
                                 decay=[torch.zeros(p.shape) for p in stack.params], clip_factor=1.0))
    assert sgd.deltaH == pytest.approx(sgd.deltaH1, rel=1e-6)
    assert sgd.plain_update_cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_micro_predict_then_really_step_then_restore():
    """A small run of bench/real_step_calibration.py (the recorded one: 30 trials, B=64, docs/real_step.md):
    AdamW with beta1 = 0.9 and weight decay trained 6 steps on micro, then 8 trials of predict, really
    step, restore, with the exact entropy. gradprobe's step is the optimizer's; its first-order term is
    the true change within 5%; the same-batch and independent-batch estimates agree within their SEs and
    with the truth; most of the change is momentum's (the plain step would miss it)."""
    from bench.real_step_calibration import calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, summary = calibrate(beta1=0.9, lr=3e-5, weight_decay=0.1, warmup=6, trials=8, units=32, group=8,
                                  seed=1, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert all(r["reconstruction_error"] < 1e-6 for r in rows)  # Delta theta = what optimizer.step() did
    assert all(abs(r["first_order"] / r["true"] - 1) < 0.05 for r in rows)  # small lr: curvature ~ lr^2
    for name in ("same", "independent"):
        z = torch.tensor([(r[f"pred_{name}"] - r["true"]) / r[f"se_{name}"] for r in rows])
        assert float(z.abs().max()) < 3.5 and abs(float(z.mean())) < 1.2, (name, z)
    agree = [abs(r["pred_same"] - r["pred_independent"]) <= 2 * math.hypot(r["se_same"], r["se_independent"])
             for r in rows]
    assert sum(agree) >= 7
    assert summary["momentum_share_exact"][0] > 0.5
    assert all(0 < r["parts"]["clip_factor"] <= 1 and r["parts"]["momentum"]["value"] != 0 for r in rows)


def test_api_with_a_live_adamw_equals_brute_force_same_and_independent(fp32_stacks, rollouts_file):
    """gp.delta_h1 with a live AdamW (two steps of history, weight decay) and an entropy batch: the
    independent estimate is -mean_u X_E[u] . Delta theta with Delta theta from real_update (the optimizer's
    own step on copies) and X_E from unit_gradients; the same-batch one is -U(X[u] . D[v]) with the parts
    from decompose; the optimizer and the model are untouched."""
    import gradprobe as gp
    from gradprobe import api
    from gradprobe.optim.precondition import Preconditioner
    from gradprobe.optim.update import decompose, real_update

    stack = fp32_stacks["reentrant"]
    cfg = gp.load_config(overrides=["autocast=off", "quant.compute_dtype=float32", f"batch.rollouts={rollouts_file}"])
    batch = gp.build_batch(stack, cfg)
    entropy = gp.load_config(overrides=["batch.num_prompts=5", "batch.max_new_tokens=8", "seed=3"])
    entropy_batch = gp.build_batch(stack, entropy)
    saved = [p.detach().clone() for p in stack.params]
    opt = torch.optim.AdamW(stack.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    random_steps(opt, stack.params, steps=2, scale=1e-3, seed=4)
    state_before = {k: v.clone() for k, v in opt.state[stack.params[0]].items()}
    theta = [p.detach().clone() for p in stack.params]
    try:
        precond = api.live_preconditioner(stack, opt, cfg)
        r = gp.delta_h1(stack, batch, cfg, precond=precond, optimizer=opt, entropy_batch=entropy_batch)
        raw = gp.probe.unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("x", "y"))
        x, gy = raw["x"].double(), -raw["y"].double()
        grads = [t.view_as(p).float() for t, p in zip(gy.mean(0).split([p.numel() for p in stack.params]),
                                                      stack.params)]
        step = torch.cat([d.reshape(-1) for d in real_update(opt, stack.params, grads)]).double()
        x_e = gp.probe.unit_gradients(stack, entropy_batch, cfg.probe, Preconditioner(None), kinds=("x",))["x"]
        terms = x_e.double() @ step
        assert r.entropy_batch == "independent"
        assert r.deltaH == pytest.approx(-float(terms.mean()), rel=1e-4)
        assert r.se_deltaH == pytest.approx(float(terms.std()) / math.sqrt(terms.numel()), rel=1e-4)
        # attribution: each entropy unit's share -X_E[u] . Delta theta / B_E; the update batch's deltaH shares NaN
        assert [u["deltaH"] for u in r.entropy_units] == pytest.approx((-terms / terms.numel()).tolist(), rel=1e-4)
        assert sum(u["deltaH"] for u in r.entropy_units) == pytest.approx(r.deltaH, rel=1e-9)
        assert all(math.isnan(u["deltaH1"]) for u in r.entropy_units)
        assert all(math.isnan(u["deltaH"]) for u in r.units) and len(r.units) == batch.B
        settings, mapped = api.step_source(stack, cfg, precond, opt)
        parts = decompose(settings, mapped, stack.names, stack.params, grads)
        flat = [torch.cat([t.reshape(-1) for t in ts]).double() for ts in (parts.fresh, parts.momentum, parts.decay)]
        d = parts.clip_factor * flat[0] * gy + flat[1] + flat[2]
        assert float((d.mean(0) - step).norm()) < 1e-4 * float(step.norm())  # the parts sum to the step (fp32)
        b = x.shape[0]
        k = x @ d.T
        assert r.same_batch["deltaH"] == pytest.approx(-(float(k.sum() - k.diagonal().sum())) / (b * (b - 1)),
                                                       rel=1e-4)
        assert r.step["optimizer"] == "AdamW" and r.step["step"] == 3 and r.step["weight_decay"] == 0.05
        assert all(torch.equal(p.detach(), t) for p, t in zip(stack.params, theta))
        assert all(torch.equal(opt.state[stack.params[0]][k], v) for k, v in state_before.items())
    finally:
        with torch.no_grad():
            for p, s in zip(stack.params, saved):
                p.copy_(s)


@pytest.mark.slow
def test_validate_steps_along_the_real_update():
    """validate.direction=real with a live AdamW (momentum, weight decay): d is the optimizer's own next step
    on the update batch (eta = 1 is that step), the small-step truth follows the exact first-order term, and
    the model and the optimizer are unchanged afterwards."""
    from gradprobe.config import load_config
    from gradprobe.stack import load_stack
    from gradprobe.validate import GROUND_TRUTH, sweep

    cfg = load_config(overrides=[*GROUND_TRUTH, "validate.eval_num_prompts=12", "validate.points=3"])
    stack = load_stack(cfg)
    opt = torch.optim.AdamW(stack.params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    random_steps(opt, stack.params, steps=3, scale=1e-2, seed=0)
    theta = [p.detach().clone() for p in stack.params]
    state = {k: v.clone() for k, v in opt.state[stack.params[3]].items()}
    r = sweep(stack, cfg, optimizer=opt)
    assert r.direction == "real" and r.eta_run == 1.0 and r.step["optimizer"] == "AdamW" and r.step["step"] == 4
    assert r.step_run == pytest.approx(r.d_norm / r.theta_norm)
    assert abs(r.points[0].ratio_exact - 1) < 0.01 and abs(r.slope_fit / r.slope_exact - 1) < 0.01
    assert all(torch.equal(p.detach(), t) for p, t in zip(stack.params, theta))
    assert all(torch.equal(opt.state[stack.params[3]][k], v) for k, v in state.items())
    plain = sweep(stack, load_config(overrides=[*GROUND_TRUTH, "validate.eval_num_prompts=12",
                                                       "validate.points=3", "validate.direction=plain"]))
    assert plain.direction == "plain" and plain.d_norm != pytest.approx(r.d_norm, rel=0.1)


@pytest.mark.slow
def test_cli_leads_with_the_real_step(rollouts_file, tmp_path):
    """delta-h1 on the embedded default warms up 2 AdamW steps, reports deltaH with its parts and the step's
    provenance first, deltaH1 after; --entropy-rollouts switches to the independent estimate; bad
    combinations are one-line errors."""
    import json

    from typer.testing import CliRunner

    from gradprobe import schemas
    from gradprobe.cli import app
    from tests.support.schema import validate

    schema = schemas.load("delta-h1")

    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["delta-h1", "--rollouts", rollouts_file, "--json", str(out)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert text.index("deltaH (real step)") < text.index("deltaH1 (plain step)")
    assert "momentum" in text and "assumed max_grad_norm" in text and "and not deltaH1" in text
    r = json.loads(out.read_text())["result"]
    assert r["warmup_steps"] == 2 and r["entropy_batch"] == "same" and r["step"]["optimizer"] == "AdamW"
    assert r["step"]["step"] == 3 and r["step"]["sources"]["betas"].startswith("read")
    assert math.isfinite(r["deltaH"]) and r["se_deltaH"] > 0 and r["parts"]["momentum"]["value"] != 0
    assert r["deltaH"] == pytest.approx(sum(r["parts"][k]["value"] for k in ("fresh", "momentum", "weight_decay")))
    assert math.isfinite(r["deltaH1"]) and r["se_unbiased"] > 0
    # every estimate says whether it can be told from zero, in the JSON and, when it cannot, in words
    assert set(r["resolution"]) == {"deltaH", "deltaH1", "fresh", "momentum", "weight_decay"}
    for key, value, se in (("deltaH", r["deltaH"], r["se_deltaH"]), ("deltaH1", r["deltaH1"], r["se_unbiased"])):
        assert r["resolution"][key]["resolved"] == (abs(value) >= 2 * se), key
        if abs(value) < 2 * se:
            assert f"cannot be told from zero at 6 prompts (|{key}| < 2 SE)" in text
    assert validate(json.loads(out.read_text()), schema, schema) == []
    res = runner.invoke(app, ["delta-h1", "--rollouts", rollouts_file, "--entropy-rollouts", rollouts_file,
                              "--json", "-", "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    r2 = payload["result"]
    assert r2["entropy_batch"] == "independent" and r2["same_batch"]["deltaH"] == pytest.approx(r["deltaH"])
    assert validate(payload, schema, schema) == []
    assert sum(u["deltaH"] for u in payload["entropy_units"]) == pytest.approx(r2["deltaH"], rel=1e-9)
    assert all(u["deltaH"] is None and u["deltaH1"] is not None for u in payload["units"])
    bad = runner.invoke(app, ["delta-h1", "--set", f"batch.entropy_rollouts={rollouts_file}"])
    assert bad.exit_code == 2 and "probe.entropy_batch=independent" in bad.stderr
    bad = runner.invoke(app, ["delta-h1", "--set", "probe.warmup_steps=-1"])
    assert bad.exit_code == 2 and "probe.warmup_steps" in bad.stderr


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_probe_y_is_the_runs_loss_type(fp32_stacks, rollouts_file, loss_type):
    """The probe's per-unit Y gradient is the run's own loss: sum_g w[u,g] grad S[u,g] with the weights of
    objective.y_weights_for_batch for probe.loss_type (one sequence at a time, by brute force)."""
    import gradprobe as gp
    from gradprobe.objective import y_weights_for_batch
    from gradprobe.optim.precondition import Preconditioner
    from tests.probe.test_probe_exact import sequence_grad

    stack = fp32_stacks["non_reentrant"]
    cfg = gp.load_config(overrides=["autocast=off", "quant.compute_dtype=float32", "checkpointing=non_reentrant",
                                    f"batch.rollouts={rollouts_file}", f"probe.loss_type={loss_type}",
                                    "probe.scale_rewards=group"])
    batch = gp.build_batch(stack, cfg)
    y = gp.probe.unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"].double()
    weights = y_weights_for_batch(batch, loss_type, "group")
    for u in (0, 3):
        grp = batch.groups[u]
        want = sum(float(w) * sequence_grad(stack, grp.prompt, r)[1] for w, r in zip(weights[u], grp.responses))
        assert torch.allclose(y[u], want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_bf16_weights_the_headline_is_the_step_the_optimizer_really_takes(rollouts_file, tmp_path):
    """LoRA weights held in bf16 (TRL on a 4-bit base): the step optimizer.step() makes is theta + Delta theta
    rounded to bf16, and at a small lr most coordinates do not move at all. The headline step is that rounded
    step (the file --save-update writes equals the real optimizer's theta' - theta), deltaH includes the
    rounding part, and the unrounded step beside it is far from the real one."""
    from safetensors.torch import load_file

    import gradprobe as gp
    from gradprobe import api
    from gradprobe.optim.precondition import Preconditioner

    cfg = gp.load_config(overrides=["autocast=off", "quant.compute_dtype=float32", "lora.dtype=bfloat16",
                                    f"batch.rollouts={rollouts_file}", "probe.learning_rate=2e-4"])
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    opt = torch.optim.AdamW(stack.params, lr=2e-4, weight_decay=0.01)
    random_steps(opt, stack.params, steps=2, scale=1e-3, seed=5)
    r = gp.delta_h1(stack, batch, cfg, precond=api.live_preconditioner(stack, opt, cfg), optimizer=opt,
                    keep_update=True)
    api.save_update(r, stack.model, tmp_path / "step.safetensors")
    # the probe's loss gradient is the run's: backward() into bf16 .grad agrees to bf16 rounding (measured 0.44%;
    # the probe forms it in fp32 inside the backward)
    g = -gp.probe.unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"].mean(0)
    probe_g = torch.cat([r.gradient[n].reshape(-1) for n in stack.names])
    assert float((probe_g - g).norm() / g.norm()) < 1e-2
    # the trainer's step with that gradient: optimizer.step() on the bf16 weights
    theta = [p.detach().clone() for p in stack.params]
    for name, p in zip(stack.names, stack.params):
        p.grad = r.gradient[name].to(p.dtype)
    opt.step()
    real = torch.cat([(p.detach().float() - t.float()).reshape(-1) for p, t in zip(stack.params, theta)]).double()
    saved = load_file(tmp_path / "step.safetensors")
    assert set(saved) == {n.replace(".default.", ".") for n in stack.names}
    ours = torch.cat([saved[n.replace(".default.", ".")].reshape(-1) for n in stack.names]).double()
    assert float((ours - real).norm()) <= 1e-6 * float(real.norm())  # the optimizer's own arithmetic
    assert r.rounded_away > 0.5 and "rounding" in r.parts  # most coordinates do not move in bf16 at this lr
    assert r.update_norm == pytest.approx(float(real.norm()), rel=5e-3)
    assert abs(r.update_norm_unrounded - float(real.norm())) > 0.1 * float(real.norm())
    assert r.deltaH_unrounded == pytest.approx(r.deltaH - r.parts["rounding"]["value"], rel=1e-9)


def test_resolution_says_when_an_estimate_cannot_be_told_from_zero():
    """|value| < 2 SE is unresolved, with the units at which SE ∝ 1/sqrt(B) would make 2 SE = |value|; checked
    against the definition by shrinking the SE as the formula assumes."""
    assert real_step.resolution(0.3, 0.1, 8) == {"resolved": True, "units_needed": None}
    out = real_step.resolution(-0.01, 0.02, 8)
    assert out["resolved"] is False
    need = out["units_needed"]
    assert 2 * 0.02 * math.sqrt(8 / need) <= 0.01 < 2 * 0.02 * math.sqrt(8 / (need - 1))
    assert real_step.resolution(0.0, 0.1, 8) == {"resolved": False, "units_needed": None}
    assert real_step.resolution(0.1, math.nan, 8) == {"resolved": None, "units_needed": None}


def test_a_step_past_the_first_order_limit_is_flagged(fp32_stacks, rollouts_file):
    """|step|/|theta| is reported; past FIRST_ORDER_LIMIT the result and the report say deltaH may not be first
    order and point at validate; a small step is not flagged."""
    import io

    from rich.console import Console

    import gradprobe as gp
    from gradprobe.report.delta_h1 import render_real_step

    stack = fp32_stacks["reentrant"]
    out = {}
    for lr in (1e-5, 30.0):
        cfg = gp.load_config(overrides=["autocast=off", "quant.compute_dtype=float32",
                                        f"batch.rollouts={rollouts_file}", f"probe.learning_rate={lr}"])
        r = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
        theta = float(torch.cat([p.detach().double().reshape(-1) for p in stack.params]).norm())
        assert r.update_rel == pytest.approx(r.update_norm / theta, rel=1e-6)
        assert r.beyond_first_order == (r.update_rel > real_step.FIRST_ORDER_LIMIT)
        text = io.StringIO()
        render_real_step(Console(file=text, width=200), r)
        out[lr] = (r, " ".join(text.getvalue().split()))
    assert not out[1e-5][0].beyond_first_order and "beyond first order" not in out[1e-5][1]
    big = out[30.0]
    assert big[0].beyond_first_order and "beyond first order" in big[1] and "gradprobe validate" in big[1]

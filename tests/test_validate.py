"""delta-H1 against ground truth on the micro model: exact enumeration, sampling, IS, unbiasedness, SE calibration.

The micro model's responses (at most 4 tokens over a 10-token vocabulary: 7,381 per prompt) are all
enumerated, so H and grad H are exact and independent of the probe's estimators.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.entropy import (
    count_responses,
    enumerate_prompt,
    is_delta_entropy,
    sample_enumerated,
    sample_responses,
    score,
)
from gradprobe.objective import advantages, pack, sequence_logprobs, x_weights, y_weights
from gradprobe.optim.precondition import Preconditioner
from gradprobe.params import GradReader
from gradprobe.probe import run_probe, ustat
from gradprobe.report.validate import ratio_plot, render_validate, save_plot, validate_payload
from gradprobe.rollouts import MICRO_PROMPTS, Batch, Group, builtin_prompts, builtin_reward
from gradprobe.stack import load_stack
from gradprobe.validate import GROUND_TRUTH, _Step, exact_entropy_grad, sweep
from tests.support.fp64 import float64_copy
from tests.support.persample import sequence_jacobian

MAX_LEN = 4


@pytest.fixture(scope="module")
def micro():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared 2-core machine
    cfg = load_config(overrides=list(GROUND_TRUTH))
    yield cfg, load_stack(cfg)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(micro):
    _, stack = micro
    return [stack.tokenizer.encode(t, add_bos=True) for t in MICRO_PROMPTS]


@pytest.fixture(scope="module")
def enums(micro, pool):
    _, stack = micro
    with torch.no_grad():
        return [enumerate_prompt(stack, p, 1.0, MAX_LEN) for p in pool]


def test_micro_config_file_is_the_ground_truth_default():
    assert load_config("configs/micro.yaml") == load_config(overrides=list(GROUND_TRUTH))


def test_enumeration_is_a_distribution_and_matches_teacher_forcing(micro, pool, enums):
    _, stack = micro
    vocab = stack.model.get_input_embeddings().num_embeddings
    assert vocab == 10 and builtin_prompts(stack.tokenizer) == MICRO_PROMPTS
    for e in enums:
        assert len(e.responses) == count_responses(vocab, MAX_LEN) == 7381
        assert len({tuple(r) for r in e.responses}) == len(e.responses)
        assert abs(float(e.logp.exp().sum()) - 1.0) < 1e-9
    # the probe's left-padded teacher forcing scores the same responses alike (mixed prompt lengths)
    gen = torch.Generator().manual_seed(0)
    picks = [(k, int(i)) for k in (0, 3, 7) for i in torch.randint(7381, (20,), generator=gen)]
    tb = pack([(pool[k], enums[k].responses[i]) for k, i in picks], stack.tokenizer.pad_token_id, stack.device)
    with torch.no_grad():
        s = sequence_logprobs(stack.model, tb, 1.0, stack.autocast()).double()
    want = torch.stack([enums[k].logp[i] for k, i in picks])
    assert torch.allclose(s, want, atol=1e-4)
    entropies = [float(e.entropy()) for e in enums]
    assert 0.5 < min(entropies) and max(entropies) < math.log(7381)  # peaked, not uniform, not degenerate


def _chi2(counts: dict[tuple[int, ...], int], probs: torch.Tensor, responses: list[list[int]],
          n: int) -> tuple[float, int]:
    """Pearson chi-square over the responses with expected count >= 10 plus one bucket for the rest."""
    expected = probs * n
    keep = (expected >= 10).nonzero().squeeze(1).tolist()
    stat, seen = 0.0, 0
    for i in keep:
        o = counts.get(tuple(responses[i]), 0)
        seen += o
        stat += (o - float(expected[i])) ** 2 / float(expected[i])
    rest_e = n - float(expected[keep].sum())
    stat += (n - seen - rest_e) ** 2 / rest_e
    return stat, len(keep)


def test_token_by_token_sampler_draws_from_the_enumerated_distribution(micro, pool, enums):
    _, stack = micro
    n = 4000
    draws = sample_responses(stack, [pool[0]], n, 1.0, MAX_LEN, torch.Generator().manual_seed(1))[0]
    counts: dict[tuple[int, ...], int] = {}
    for r in draws:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    probs = enums[0].logp.exp()
    stat, df = _chi2(counts, probs, enums[0].responses, n)
    assert stat < df + 5 * math.sqrt(2 * df), (stat, df)
    # decisive: the same draws are far from a slightly different policy (temperature 1.2)
    with torch.no_grad():
        other = enumerate_prompt(stack, pool[0], 1.2, MAX_LEN).logp.exp()
    wrong, df2 = _chi2(counts, other, enums[0].responses, n)
    assert wrong > df2 + 20 * math.sqrt(2 * df2), (wrong, df2)


def test_exact_grad_matches_central_difference(micro, pool):
    """grad H against a central difference of H taken on a float64 copy of the model.

    On the float32 model itself the difference cannot resolve this: at eps = 1e-3/|v| the two entropies
    (H = 5.66) differ by 1.7e-5 while float32 rounding moves each by ~1e-7, so the quotient scatters by
    ~1% (0.7875 against 0.7810; 0.385 at eps = 1e-4/|v|). On the float64 copy it equals the float64
    gradient to 1e-6 at eps = 1e-4/|v| and 1e-3/|v|, and the float32 gradient differs from both by 2e-5.
    """
    _, stack = micro
    prompts = pool[:2]
    h, grad = exact_entropy_grad(stack, prompts, 1.0, MAX_LEN)
    exact = float64_copy(stack)
    v = torch.randn(stack.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-3 / float(v.norm())
    step = _Step(exact.params, v)
    hs = []
    for sign in (1, -1):
        step.apply(sign * eps)
        with torch.no_grad():
            hs.append(sum(float(enumerate_prompt(exact, p, 1.0, MAX_LEN).entropy()) for p in prompts) / 2)
    step.restore()
    fd = (hs[0] - hs[1]) / (2 * eps)
    assert abs(h - (hs[0] + hs[1]) / 2) < 1e-5  # the copy is the same function
    assert abs(fd - float(grad.double() @ v)) < 1e-4 * abs(fd), (fd, float(grad.double() @ v))


@pytest.fixture(scope="module")
def small_run(micro):
    """sweep on the micro model with a small evaluation batch, and theta before and after."""
    _, stack = micro
    cfg = load_config(overrides=[*GROUND_TRUTH, "validate.eval_num_prompts=16"])
    before = [p.detach().clone() for p in stack.params]
    r = sweep(stack, cfg)
    return r, before, [p.detach().clone() for p in stack.params]


def test_linearisation_and_theta_restored(small_run):
    r, before, after = small_run
    assert all(torch.equal(a, p) for a, p in zip(before, after))
    assert r.method == "exact" and r.responses_per_prompt == 7381
    dev = [abs(p.ratio_exact - 1) for p in r.points]
    assert dev[0] < 0.01, dev
    assert all(b > a for a, b in zip(dev, dev[1:])), dev  # deviation grows with eta
    assert dev[-1] > 0.05 and r.eta_nonlinear is not None
    assert abs(r.slope_fit / r.slope_exact - 1) < 0.01


def test_render_json_and_plot(small_run, tmp_path):
    r, _, _ = small_run
    out = Console(record=True, width=120, no_color=True)
    render_validate(out, r)
    text = out.export_text()
    assert "exact enumeration" in text and "second-order effects" in text
    assert len([line for line in ratio_plot(r) if "│" in line or "●" in line]) == len(r.points)
    payload = validate_payload(r, load_config())
    assert json.loads(json.dumps(payload))["result"]["points"][0]["eta"] == r.points[0].eta
    pytest.importorskip("matplotlib")
    save_plot(r, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_importance_sampling_tracks_the_exact_change(micro, pool):
    _, stack = micro
    prompts = pool[:6]
    with torch.no_grad():
        h0 = [float(enumerate_prompt(stack, p, 1.0, MAX_LEN).entropy()) for p in prompts]
    _, grad = exact_entropy_grad(stack, prompts, 1.0, MAX_LEN)
    d = grad / grad.norm()  # a direction along which H moves
    draws = sample_responses(stack, prompts, 600, 1.0, MAX_LEN, torch.Generator().manual_seed(3))
    logq = [score(stack, p, r, 1.0) for p, r in zip(prompts, draws)]
    step = _Step(stack.params, d)
    zs, ses = [], []
    for eta in (0.003, 0.03, 0.3):
        step.apply(eta)
        with torch.no_grad():
            exact = sum(float(enumerate_prompt(stack, p, 1.0, MAX_LEN).entropy()) - h
                        for p, h in zip(prompts, h0)) / len(prompts)
        est = is_delta_entropy(logq, [score(stack, p, r, 1.0) for p, r in zip(prompts, draws)])
        step.restore()
        zs.append((est.delta - exact) / est.se)
        ses.append(est.se / abs(exact))
    assert all(abs(z) < 4 for z in zs), zs
    assert ses[0] < 0.1  # common random numbers: the small step is measured sharply
    assert is_delta_entropy(logq, logq).delta == 0.0


def test_importance_path_end_to_end(micro):
    """sweep's importance-sampling branch on the micro model (where exact would be chosen)."""
    _, stack = micro
    cfg = load_config(overrides=[*GROUND_TRUTH, "validate.method=importance", "validate.eval_num_prompts=4",
                                 "validate.is_samples=300", "validate.points=3"])
    r = sweep(stack, cfg)
    assert r.method == "importance" and r.slope_exact is None and r.responses_per_prompt is None
    assert 0 < r.is_min_ess <= 300
    with torch.no_grad():
        h = sum(float(enumerate_prompt(stack, p, 1.0, MAX_LEN).entropy())
                for p in [stack.tokenizer.encode(t, add_bos=True) for t in MICRO_PROMPTS[:4]]) / 4
    assert abs(r.entropy - h) < 0.5  # H(theta) from 300 samples per prompt against the exact mean
    assert all(p.delta_true_se > 0 and math.isfinite(p.ratio) for p in r.points)


def test_per_sequence_jacobian_matches_backward(micro, pool):
    _, stack = micro
    pairs = [(pool[0], [3, 4, 2]), (pool[4], [5]), (pool[2], [9, 0, 7, 7])]
    s, jac = sequence_jacobian(stack, pairs, 1.0)
    reader = GradReader(stack.params)
    for i, pair in enumerate(pairs):
        si = sequence_logprobs(stack.model, pack([pair], 0, stack.device), 1.0, stack.autocast())
        stack.model.zero_grad(set_to_none=True)
        si.sum().backward()
        g = torch.zeros(stack.n_params)
        reader.add(g)
        assert abs(float(si.detach()) - float(s[i])) < 1e-5
        assert torch.allclose(g, jac[i], atol=1e-4, rtol=1e-4)
    stack.model.zero_grad(set_to_none=True)


def _draw_units(stack, pool, enums, n_units, g, gen):
    """Units with a uniformly drawn prompt and G responses from the exact policy: i.i.d. units."""
    which = torch.randint(len(pool), (n_units,), generator=gen).tolist()
    groups = []
    for k in which:
        responses = sample_enumerated(enums[k], g, gen)
        rewards = [builtin_reward(MICRO_PROMPTS[k], stack.tokenizer.decode(r)) for r in responses]
        groups.append(Group(pool[k], responses, rewards))
    return groups


def _unit_vectors(stack, groups):
    """X[u], Y[u] from per-sequence gradients (one batched backward per 256 sequences) and the probe's weights."""
    keys = sorted({(tuple(gr.prompt), tuple(r)) for gr in groups for r in gr.responses})
    row = {k: i for i, k in enumerate(keys)}
    s, jac = sequence_jacobian(stack, [(list(p), list(r)) for p, r in keys], 1.0)
    x = torch.zeros(len(groups), stack.n_params, dtype=torch.float64)
    y = torch.zeros_like(x)
    for u, gr in enumerate(groups):
        idx = [row[(tuple(gr.prompt), tuple(r))] for r in gr.responses]
        rows = jac[idx].double()
        x[u] = x_weights(s[idx]) @ rows
        adv = advantages(torch.tensor(gr.rewards, dtype=torch.float64))
        y[u] = y_weights(adv, torch.tensor([len(r) for r in gr.responses]), "dr_grpo") @ rows
    return x, y


def _summary(x, y):
    return ustat.summarize_cross(x @ y.T)


@pytest.mark.slow
def test_unbiasedness_and_calibrated_standard_errors(micro, pool, enums):
    """Many independent batches of B=16 units (G=8): the mean of Xbar points along -grad H, U_cross is
    unbiased for E[X].E[Y], the mean reported SE (row-mean Hoeffding, jackknife, pairwise from K) matches
    the spread of U_cross across batches, and the pairwise variance is unbiased."""
    cfg, stack = micro
    n_batches, b, g = 400, 16, 8
    gen = torch.Generator().manual_seed(4)
    groups = _draw_units(stack, pool, enums, 2 * n_batches * b, g, gen)
    x, y = _unit_vectors(stack, groups)
    _, grad_h = exact_entropy_grad(stack, pool, 1.0, MAX_LEN)  # uniform over the pool: the units' prompt law
    grad_h = grad_h.double()

    # the tested numbers are the probe's: run_probe on two of the batches gives the same U_cross and SEs
    probe_cfg = replace(cfg.probe, microbatch_size=g)
    for k in (0, 1):
        batch = Batch(groups[k * b:(k + 1) * b], temperature=1.0)
        res = run_probe(stack, batch, probe_cfg, Preconditioner(None), 1.0)
        ref = _summary(x[k * b:(k + 1) * b], y[k * b:(k + 1) * b])
        for got, want in ((res.U_cross, ref.u_cross), (res.U_cross_se, ref.se),
                          (res.U_cross_se_jackknife, ref.se_jackknife), (res.U_cross_se_unbiased, ref.se_unbiased)):
            assert abs(got - want) <= 1e-3 * abs(want) + 1e-6, (got, want)

    xs, ys = x[:n_batches * b].view(n_batches, b, -1), y[:n_batches * b].view(n_batches, b, -1)
    stats = [_summary(xs[k], ys[k]) for k in range(n_batches)]
    u = torch.tensor([s.u_cross for s in stats], dtype=torch.float64)
    se = torch.tensor([s.se for s in stats], dtype=torch.float64)
    se_jack = torch.tensor([s.se_jackknife for s in stats], dtype=torch.float64)
    se_pair = torch.tensor([s.se_unbiased for s in stats], dtype=torch.float64)
    var_pair = torch.tensor([s.var_unbiased for s in stats], dtype=torch.float64)

    xbar = xs.mean((0, 1))
    cos = float(-xbar @ grad_h / (xbar.norm() * grad_h.norm()))
    assert cos >= 0.99, cos

    # E[X].E[Y] without the U-statistic: exact E[X] = -grad H times Y of the independent half
    terms = -(y[n_batches * b:] @ grad_h)
    target, target_se = float(terms.mean()), float(terms.std()) / math.sqrt(terms.numel())
    sd = float(u.std())
    combined = math.sqrt(sd ** 2 / n_batches + target_se ** 2)
    assert abs(float(u.mean()) - target) < 3 * combined, (float(u.mean()), target, combined)
    # decisive: keeping the within-unit pairs (the V-statistic Xbar.Ybar) is visibly biased
    v = torch.tensor([s.bars_dot for s in stats], dtype=torch.float64)
    assert abs(float(v.mean()) - target) > 3 * math.sqrt(float(v.std()) ** 2 / n_batches + target_se ** 2)

    for name, reported in (("hoeffding", se), ("jackknife", se_jack), ("pairwise", se_pair)):
        ratio = float(reported.mean()) / sd
        assert 0.8 <= ratio <= 1.2, (name, ratio)
    # the pairwise variance before truncation is unbiased for Var U_cross (measured 0.95 +- 0.09 of SD^2)
    d = var_pair - (u - u.mean()) ** 2
    assert abs(float(d.mean())) < 3 * float(d.std()) / math.sqrt(n_batches), (float(d.mean()), float(d.std()))


@pytest.mark.slow
def test_validate_cli_no_arguments(micro):
    result = CliRunner().invoke(app, ["validate", "--json", "-"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["schema"] == "gradprobe.validate/1"
    r = payload["result"]
    assert r["method"] == "exact"
    first = r["points"][0]
    assert first["ratio_low"] <= 1.0 <= first["ratio_high"], first
    assert abs(first["ratio_exact"] - 1) < 0.01


def test_validate_cli_bad_input_is_one_line():
    result = CliRunner().invoke(app, ["validate", "--set", "validate.points=1"])
    assert result.exit_code == 2
    assert "validate.points" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["validate", "--set", "batch.top_p=0.9"])
    assert result.exit_code == 2 and "top_p" in result.output

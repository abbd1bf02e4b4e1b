"""The real-step estimator (probe/real_step.py) against brute force and by Monte Carlo on synthetic units."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradprobe.probe import real_step


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

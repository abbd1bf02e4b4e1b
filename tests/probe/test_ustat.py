"""The U-statistic algebra against brute force over random vectors."""

import itertools
import math

import pytest
import torch

from gradprobe.probe import ustat


@pytest.fixture(params=[2, 3, 7, 20])
def xy(request):
    g = torch.Generator().manual_seed(request.param)
    b, n = request.param, 33
    x = torch.randn(b, n, generator=g, dtype=torch.float64) + 0.3
    y = torch.randn(b, n, generator=g, dtype=torch.float64) - 0.1
    return x, y


def brute_u(x, y):
    b = x.shape[0]
    return sum(float(x[u] @ y[v]) for u in range(b) for v in range(b) if u != v) / (b * (b - 1))


def test_bars_dot_diag_form_equals_brute_force(xy):
    x, y = xy
    b = x.shape[0]
    bars = float(x.mean(0) @ y.mean(0))
    diag = float((x * y).sum())
    assert ustat.u_cross(bars, diag, b) == pytest.approx(brute_u(x, y), rel=1e-12, abs=1e-12)


def test_running_sum_form_equals_brute_force(xy):
    x, y = xy
    b = x.shape[0]
    assert ustat.running_cross(x, y) / (b * (b - 1)) == pytest.approx(brute_u(x, y), rel=1e-12, abs=1e-12)


def test_row_means_match_definition_and_average_to_u(xy):
    x, y = xy
    b = x.shape[0]
    sx, sy = x.sum(0), y.sum(0)
    r = ustat.row_means(x @ sy, y @ sx, (x * y).sum(1))
    for u in range(b):
        ybar_mu = (sy - y[u]) / (b - 1)
        xbar_mu = (sx - x[u]) / (b - 1)
        assert float(r[u]) == pytest.approx(0.5 * float(x[u] @ ybar_mu + y[u] @ xbar_mu), rel=1e-12, abs=1e-12)
    assert float(r.mean()) == pytest.approx(brute_u(x, y), rel=1e-12, abs=1e-12)


def test_jackknife_equals_brute_force_leave_one_out(xy):
    x, y = xy
    b = x.shape[0]
    st = ustat.summarize(float(x.mean(0) @ y.mean(0)), (x * y).sum(1), x @ y.sum(0), y @ x.sum(0))
    if b < 3:
        assert math.isnan(st.se_jackknife)
        return
    keep = [[v for v in range(b) if v != u] for u in range(b)]
    loo = torch.tensor([brute_u(x[k], y[k]) for k in keep], dtype=torch.float64)
    var = (b - 1) / b * float(((loo - loo.mean()) ** 2).sum())
    assert st.se_jackknife == pytest.approx(math.sqrt(var), rel=1e-10)
    sd = float(torch.tensor(st.row_means, dtype=torch.float64).std())
    assert st.se == pytest.approx(2 * sd / math.sqrt(b), rel=1e-12)


def _h(k):
    return 0.5 * (k + k.T)


@pytest.mark.parametrize("b", [4, 5, 6])
def test_variance_components_equal_enumeration_over_distinct_indices(b):
    """theta2, zeta1, zeta2 by looping over every ordered tuple of distinct units, on a non-symmetric K."""
    g = torch.Generator().manual_seed(b)
    k = torch.randn(b, b, generator=g, dtype=torch.float64) + 0.4
    h = _h(k)
    theta2 = sum(float(h[u, v] * h[w, z]) for u, v, w, z in itertools.permutations(range(b), 4))
    theta2 /= math.perm(b, 4)
    zeta1 = sum(float(h[u, v] * h[u, w]) for u, v, w in itertools.permutations(range(b), 3)) / math.perm(b, 3)
    zeta2 = sum(float(h[u, v] ** 2) for u, v in itertools.permutations(range(b), 2)) / math.perm(b, 2)
    s1, s2 = ustat.variance_components(k)
    assert s1 == pytest.approx(zeta1 - theta2, rel=1e-10, abs=1e-12)
    assert s2 == pytest.approx(zeta2 - 2 * zeta1 + theta2, rel=1e-10, abs=1e-12)
    u = sum(float(h[u, v]) for u, v in itertools.permutations(range(b), 2)) / math.perm(b, 2)
    var = ustat.unbiased_variance(k)
    assert var == pytest.approx(u * u - theta2, rel=1e-10, abs=1e-12)
    assert var == pytest.approx(4 * s1 / b + 2 * s2 / (b * (b - 1)), rel=1e-9, abs=1e-12)
    se = ustat.unbiased_se(k)
    assert se == pytest.approx(math.sqrt(4 * max(s1, 0) / b + 2 * max(s2, 0) / (b * (b - 1))), rel=1e-12)


def test_needs_four_units():
    k = torch.ones(3, 3, dtype=torch.float64)
    assert math.isnan(ustat.unbiased_variance(k)) and math.isnan(ustat.unbiased_se(k))
    assert math.isnan(ustat.summarize_cross(k).se_unbiased)


@pytest.mark.parametrize("b", [4, 5])
def test_unbiased_exactly_over_a_finite_unit_law(b):
    """Units drawn i.i.d. from 3 atoms (X_a, Y_a): every one of the 3^B batches weighed by its probability.
    E[unbiased_variance] = Var U and E[components] = (s1^2, s2^2) exactly; the row-mean SEs follow the
    expectations in ustat's docstring, which double-count s2^2 (and the Hoeffding form misses some s1^2)."""
    g = torch.Generator().manual_seed(11)
    xa = torch.randn(3, 5, generator=g, dtype=torch.float64) + 0.1
    ya = torch.randn(3, 5, generator=g, dtype=torch.float64) - 0.05
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    c = xa @ ya.T  # X_a . Y_b
    h = _h(c)
    theta = float(p @ h @ p)
    h1 = h @ p - theta
    s1 = float(p @ h1 ** 2)
    s2 = float(p @ (h - theta - h1[:, None] - h1[None, :]) ** 2 @ p)
    moments = torch.zeros(7, dtype=torch.float64)  # E of: U, U^2, var, s1, s2, hoeffding^2, jackknife^2
    for idx in itertools.product(range(3), repeat=b):
        k = c[list(idx)][:, list(idx)]
        w = float(torch.prod(p[list(idx)]))
        st = ustat.summarize_cross(k)
        moments += w * torch.tensor([st.u_cross, st.u_cross ** 2, st.var_unbiased, *ustat.variance_components(k),
                                     st.se ** 2, st.se_jackknife ** 2], dtype=torch.float64)
    e_u, e_u2, e_var, e_s1, e_s2, e_hoef, e_jack = moments.tolist()
    var_u = e_u2 - e_u ** 2
    assert e_u == pytest.approx(theta, rel=1e-12)
    assert var_u == pytest.approx(4 * s1 / b + 2 * s2 / (b * (b - 1)), rel=1e-10)
    assert e_var == pytest.approx(var_u, rel=1e-10)
    assert e_s1 == pytest.approx(s1, rel=1e-10) and e_s2 == pytest.approx(s2, rel=1e-10)
    assert e_hoef == pytest.approx(4 * (b - 2) ** 2 * s1 / (b * (b - 1) ** 2) + 4 * (b - 2) * s2 / (b * (b - 1) ** 2),
                                   rel=1e-10)
    assert e_jack == pytest.approx(4 * s1 / b + 4 * s2 / (b * (b - 2)), rel=1e-10)
    assert min(abs(e_jack / var_u - 1), abs(e_hoef / var_u - 1)) > 0.05  # exact sums: a real gap


@pytest.mark.slow
def test_unbiased_by_monte_carlo_with_noisy_units():
    """20,000 batches of B=8 i.i.d. units whose pairwise noise dominates (s2^2 >> s1^2, as for score
    gradients): mean unbiased_variance - (U - mean U)^2 is zero within 4 SE; the row-mean forms are not."""
    b, n, batches = 8, 6, 20_000
    g = torch.Generator().manual_seed(3)
    mx = torch.linspace(-0.2, 0.3, n, dtype=torch.float64)
    my = torch.linspace(0.25, -0.1, n, dtype=torch.float64)
    ex = torch.randn(batches, b, n, generator=g, dtype=torch.float64)
    x = mx + ex
    y = my + 0.5 * ex + torch.randn(batches, b, n, generator=g, dtype=torch.float64)
    k = x @ y.transpose(1, 2)
    stats = [ustat.summarize_cross(kk) for kk in k]
    u = torch.tensor([s.u_cross for s in stats], dtype=torch.float64)
    sq = (u - u.mean()) ** 2 * batches / (batches - 1)

    def z(var: torch.Tensor) -> float:
        d = var - sq
        return float(d.mean()) / (float(d.std()) / math.sqrt(batches))

    s1, s2 = torch.tensor([ustat.variance_components(kk) for kk in k], dtype=torch.float64).mean(0).tolist()
    assert s2 > 30 * abs(s1)  # about 66
    assert abs(z(torch.tensor([s.var_unbiased for s in stats], dtype=torch.float64))) < 4
    assert z(torch.tensor([s.se_jackknife for s in stats], dtype=torch.float64) ** 2) > 30  # about 75
    assert z(torch.tensor([s.se for s in stats], dtype=torch.float64) ** 2) > 15  # about 40


@pytest.mark.parametrize("b", [4, 7, 12])
def test_jackknife_corrected_by_unbiased_s2_is_the_unbiased_variance(b):
    """E[jackknife^2] = 4 s1^2/B + 4 s2^2/(B(B-2)); removing the excess with the unbiased s2^2 leaves the
    one symmetric unbiased estimator, identically (not just on average)."""
    g = torch.Generator().manual_seed(b)
    k = torch.randn(b, b, generator=g, dtype=torch.float64) * 3 + 1
    st = ustat.summarize_cross(k)
    _, s2 = ustat.variance_components(k)
    corrected = st.se_jackknife ** 2 - (4 / (b * (b - 2)) - 2 / (b * (b - 1))) * s2
    assert corrected == pytest.approx(st.var_unbiased, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("b", [4, 5])
def test_conditional_variance_is_unbiased_for_the_error_against_the_batch_step(b):
    """The error of U against mu_X . Ybar (the batch's own Y held fixed), over all 3^B batches of a finite
    unit law: E[conditional v1/B + 2 s2^2/(B(B-1))] = E[(U - mu_X . Ybar)^2] exactly, and the row-pair
    average inside it equals its enumeration over distinct (u, v, w)."""
    g = torch.Generator().manual_seed(5)
    xa = torch.randn(3, 4, generator=g, dtype=torch.float64) + 0.2
    ya = torch.randn(3, 4, generator=g, dtype=torch.float64) - 0.3
    p = torch.tensor([0.45, 0.35, 0.2], dtype=torch.float64)
    mu_x = p @ xa
    c = xa @ ya.T
    e_err2 = e_var = e_full = 0.0
    for idx in itertools.product(range(3), repeat=b):
        i = list(idx)
        k = c[i][:, i]
        w = float(torch.prod(p[i]))
        u = ustat.summarize_cross(k).u_cross
        target = float(mu_x @ ya[i].mean(0))
        v1, s2 = ustat.conditional_components(k)
        e_err2 += w * (u - target) ** 2
        e_var += w * (v1 / b + 2 * s2 / (b * (b - 1)))
        e_full += w * ustat.unbiased_variance(k)
    assert e_var == pytest.approx(e_err2, rel=1e-10)
    assert abs(e_full / e_err2 - 1) > 0.02  # Var U also holds the step's own spread (here its covariance)
    k = torch.randn(b, b, generator=g, dtype=torch.float64)
    rows = sum(float(k[u, v] * k[u, w]) for u, v, w in itertools.permutations(range(b), 3)) / math.perm(b, 3)
    theta2 = sum(float(k[u, v] * k[w, z]) for u, v, w, z in itertools.permutations(range(b), 4)) / math.perm(b, 4)
    assert ustat.conditional_components(k)[0] == pytest.approx(rows - theta2, rel=1e-10, abs=1e-12)
    v1, s2 = ustat.conditional_components(k)
    assert ustat.conditional_se(k) == pytest.approx(math.sqrt(max(v1, 0) / b + 2 * max(s2, 0) / (b * (b - 1))))
    assert math.isnan(ustat.conditional_se(k[:3, :3]))

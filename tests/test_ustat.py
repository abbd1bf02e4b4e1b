"""The U-statistic algebra against brute force over random vectors."""

import math

import pytest
import torch

from gradprobe import ustat


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

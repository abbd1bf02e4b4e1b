"""The U-statistic algebra of DESIGN.md on plain numbers: no model code here.

Inputs are the sufficient statistics a probe collects over B units:
    bars_dot = Xbar . Ybar,  diag[u] = X[u] . Y[u],
    x_dot_sumy[u] = X[u] . sum_v Y[v],  y_dot_sumx[u] = Y[u] . sum_v X[v],
and, when the probe kept every unit's gradients, the cross matrix K[u, v] = X[u] . Y[v] (B x B).

Variance of U_cross. With h(u, v) = (K[u, v] + K[v, u])/2 split as theta + h1(u) + h1(v) + h2(u, v)
(Hoeffding), Var U = 4 s1^2/B + 2 s2^2/(B(B-1)), s1^2 = Var h1, s2^2 = Var h2. The row-mean SEs
(Hoeffding 2 sd(r)/sqrt(B), jackknife) estimate the second term about twice over:
    E[4 sd(r)^2/B] = 4 (B-2)^2 s1^2/(B(B-1)^2) + 4 (B-2) s2^2/(B(B-1)^2),
    E[jackknife^2] = 4 s1^2/B + 4 s2^2/(B(B-2)),
which matters because per-unit score-function gradients are noisy (s2^2 >> s1^2): at small B both
SEs run high. K separates the two terms (variance_components, unbiased_se).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def u_cross(bars_dot: float, diag_sum: float, b: int) -> float:
    """(1/(B(B-1))) sum_{u != v} X[u].Y[v] = (B/(B-1)) Xbar.Ybar - diag_sum/(B(B-1))."""
    return b / (b - 1) * bars_dot - diag_sum / (b * (b - 1))


def running_cross(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum_{u != v} X[u].Y[v] in one pass: sum_u X[u].sumY_{<u} + Y[u].sumX_{<u} (rows of x, y are units)."""
    sx = torch.zeros_like(x[0])
    sy = torch.zeros_like(y[0])
    total = 0.0
    for xu, yu in zip(x, y):
        total += float(xu @ sy + yu @ sx)
        sx += xu
        sy += yu
    return total


def row_means(x_dot_sumy: torch.Tensor, y_dot_sumx: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """r[u] = 1/2 (X[u].Ybar_{-u} + Y[u].Xbar_{-u}); their mean is U_cross."""
    b = diag.numel()
    return 0.5 * ((x_dot_sumy - diag) + (y_dot_sumx - diag)) / (b - 1)


def hoeffding_se(r: torch.Tensor) -> float:
    """SE(U) ~ 2 sd(r)/sqrt(B): the first-order (Hoeffding) variance of a degree-2 U-statistic.
    Undefined at B = 2: both row means are the one pair's mean, so their spread is rounding."""
    b = r.numel()
    if b < 3:
        return math.nan
    return float(2.0 * r.double().std(unbiased=True) / math.sqrt(b))


def jackknife_se(r: torch.Tensor, u: float) -> float:
    """Delete-one jackknife: U_{-u} = (B U - 2 r[u])/(B - 2), Var = ((B-1)/B) sum (U_{-u} - mean)^2."""
    b = r.numel()
    if b < 3:
        return math.nan
    loo = (b * u - 2.0 * r.double()) / (b - 2)
    return float(math.sqrt((b - 1) / b * float(((loo - loo.mean()) ** 2).sum())))


def _pair_sums(cross: torch.Tensor) -> tuple[int, float, float, float]:
    """B, S = sum h, sum_u r[u]^2, Q = sum h^2 for h = (K + K^T)/2 with its diagonal zeroed, r = row sums."""
    k = cross.double()
    h = 0.5 * (k + k.T)
    h.fill_diagonal_(0.0)
    r = h.sum(1)
    return k.shape[0], float(r.sum()), float((r * r).sum()), float((h * h).sum())


def _moments(cross: torch.Tensor) -> tuple[float, float, float]:
    """theta2, zeta1, zeta2 of variance_components (B >= 4)."""
    b, s, sq_r, q = _pair_sums(cross)
    theta2 = (s * s - 4.0 * sq_r + 2.0 * q) / (b * (b - 1) * (b - 2) * (b - 3))
    return theta2, (sq_r - q) / (b * (b - 1) * (b - 2)), q / (b * (b - 1))


def variance_components(cross: torch.Tensor) -> tuple[float, float]:
    """Unbiased estimates of s1^2 and s2^2 from K (B >= 4), from three averages over distinct indices:
    theta2 = mean h(u,v) h(w,z)  (E = theta^2): S^2 - 4 sum r^2 + 2 Q over B(B-1)(B-2)(B-3) (the ordered
             pairs of pairs sharing an index, by inclusion-exclusion);
    zeta1  = mean h(u,v) h(u,w)  (E = theta^2 + s1^2): sum r^2 - Q over B(B-1)(B-2);
    zeta2  = mean h(u,v)^2       (E = theta^2 + 2 s1^2 + s2^2): Q over B(B-1)."""
    if cross.shape[0] < 4:
        return math.nan, math.nan
    theta2, zeta1, zeta2 = _moments(cross)
    return zeta1 - theta2, zeta2 - 2.0 * zeta1 + theta2


def unbiased_variance(cross: torch.Tensor) -> float:
    """Var U without bias from K (B >= 4): U^2 - theta2 = 4 s1^2/B + 2 s2^2/(B(B-1)) with the unbiased
    components. It is the only symmetric unbiased estimator, so the jackknife corrected by an unbiased
    s2^2 is this same number. It can come out negative."""
    b, s, sq_r, q = _pair_sums(cross)
    if b < 4:
        return math.nan
    u = s / (b * (b - 1))
    return u * u - (s * s - 4.0 * sq_r + 2.0 * q) / (b * (b - 1) * (b - 2) * (b - 3))


def unbiased_se(cross: torch.Tensor) -> float:
    """SE(U) from the unbiased components, each truncated at 0 (a variance is not negative):
    sqrt(4 max(s1^2, 0)/B + 2 max(s2^2, 0)/(B(B-1))). s1^2 is the noisy one when s2^2 >> s1^2; plain
    sqrt(max(U^2 - theta2, 0)) averaged 0.76-0.90 of the true SD on the micro model (Jensen, heavy tails),
    this 0.91-1.05 (docs/validate.md)."""
    s1, s2 = variance_components(cross)
    if math.isnan(s1):
        return math.nan
    b = cross.shape[0]
    return math.sqrt(4.0 * max(s1, 0.0) / b + 2.0 * max(s2, 0.0) / (b * (b - 1)))


def conditional_components(cross: torch.Tensor) -> tuple[float, float]:
    """Unbiased (v1, s2^2) for the error of U against mu_X . Ybar, the target when the Y[v] are held at
    their batch values (the step the batch will take is known; only E[X] is estimated). With
    X[u] = mu_X + x_u, Y[v] = mu_Y + y_v:
        U - mu_X . Ybar = (1/B) sum_u x_u . mu_Y + (1/(B(B-1))) sum_{u != v} x_u . y_v,
    whose variance is v1/B + 2 s2^2/(B(B-1)), v1 = Var X[u] . mu_Y (the Y half of s1^2 drops out):
        v1 = mean over distinct (u, v, w) of K[u,v] K[u,w]  -  theta2   (rows of K, not of h)."""
    b = cross.shape[0]
    if b < 4:
        return math.nan, math.nan
    k = cross.double().clone()
    k.fill_diagonal_(0.0)
    r = k.sum(1)
    row_pairs = float((r * r - (k * k).sum(1)).sum()) / (b * (b - 1) * (b - 2))
    theta2, zeta1, zeta2 = _moments(cross)
    return row_pairs - theta2, zeta2 - 2.0 * zeta1 + theta2


def conditional_se(cross: torch.Tensor) -> float:
    """SE of U as a prediction of mu_X . Ybar (conditional_components), each component truncated at 0."""
    v1, s2 = conditional_components(cross)
    if math.isnan(v1):
        return math.nan
    b = cross.shape[0]
    return math.sqrt(max(v1, 0.0) / b + 2.0 * max(s2, 0.0) / (b * (b - 1)))


@dataclass
class UStats:
    u_cross: float
    bars_dot: float
    diag_sum: float
    row_means: list[float]
    se: float
    se_jackknife: float
    se_unbiased: float = math.nan  # unbiased_se: needs K and B >= 4, else NaN
    var_unbiased: float = math.nan  # unbiased_variance (can be negative)


def summarize(bars_dot: float, diag: torch.Tensor, x_dot_sumy: torch.Tensor, y_dot_sumx: torch.Tensor,
              cross: torch.Tensor | None = None) -> UStats:
    diag = diag.double()
    b = diag.numel()
    u = u_cross(bars_dot, float(diag.sum()), b)
    r = row_means(x_dot_sumy.double(), y_dot_sumx.double(), diag)
    var = unbiased_variance(cross) if cross is not None else math.nan
    return UStats(u, bars_dot, float(diag.sum()), r.tolist(), hoeffding_se(r), jackknife_se(r, u),
                  unbiased_se(cross) if cross is not None else math.nan, var)


def summarize_cross(cross: torch.Tensor) -> UStats:
    """Everything from K alone: Xbar.Ybar = sum K/B^2, diag = diag K, X[u].sum Y = row sums of K."""
    k = cross.double()
    return summarize(float(k.sum()) / k.shape[0] ** 2, k.diagonal(), k.sum(1), k.sum(0), cross=k)

"""The U-statistic algebra of DESIGN.md on plain numbers: no model code here.

Inputs are the sufficient statistics a probe collects over B units:
    bars_dot = Xbar . Ybar,  diag[u] = X[u] . Y[u],
    x_dot_sumy[u] = X[u] . sum_v Y[v],  y_dot_sumx[u] = Y[u] . sum_v X[v].
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
    """SE(U) ~ 2 sd(r)/sqrt(B): the first-order (Hoeffding) variance of a degree-2 U-statistic."""
    b = r.numel()
    if b < 2:
        return math.nan
    return float(2.0 * r.double().std(unbiased=True) / math.sqrt(b))


def jackknife_se(r: torch.Tensor, u: float) -> float:
    """Delete-one jackknife: U_{-u} = (B U - 2 r[u])/(B - 2), Var = ((B-1)/B) sum (U_{-u} - mean)^2."""
    b = r.numel()
    if b < 3:
        return math.nan
    loo = (b * u - 2.0 * r.double()) / (b - 2)
    return float(math.sqrt((b - 1) / b * float(((loo - loo.mean()) ** 2).sum())))


@dataclass
class UStats:
    u_cross: float
    bars_dot: float
    diag_sum: float
    row_means: list[float]
    se: float
    se_jackknife: float


def summarize(bars_dot: float, diag: torch.Tensor, x_dot_sumy: torch.Tensor, y_dot_sumx: torch.Tensor) -> UStats:
    diag = diag.double()
    b = diag.numel()
    u = u_cross(bars_dot, float(diag.sum()), b)
    r = row_means(x_dot_sumy.double(), y_dot_sumx.double(), diag)
    return UStats(u, bars_dot, float(diag.sum()), r.tolist(), hoeffding_se(r), jackknife_se(r, u))

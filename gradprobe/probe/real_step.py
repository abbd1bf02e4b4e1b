"""deltaH for the real next optimizer step, from per-unit X[u] and the step's parts (pure math, no model code).

The step the run's optimizer takes (optim/update.py) is
    Delta theta = clip * a (.) g + momentum + decay,    g = mean_v G[v],
with G[v] unit v's gradient of the run's loss, a the elementwise fresh-gradient coefficient (for AdamW
-lr (1-beta1)/bc1 / (sqrt(v_hat)+eps), v including this batch's g^2), momentum the part exp_avg carries
from earlier steps and decay the weight-decay part. Its first-order entropy change is
    deltaH = grad H . Delta theta = -mu_X . Delta theta,   X[u] estimating -grad H (docs/real_step.md).
Write D[v] = clip a (.) G[v] + momentum + decay, so that Delta theta = mean_v D[v], and K[u, v] = X[u] . D[v].

Same batch (X and G from the same samples): X[u] . D[u] shares samples, so -Xbar . Delta theta is biased;
deltaH = -U(K), the cross-unit U-statistic of ustat.py, is unbiased. The momentum and decay columns of K
are X[u] . w for a fixed w, so their parts are plain means -mean_u X[u] . w; the fresh part is the
U-statistic of X[u] . (clip a (.) G[v]), today's U_cross with P replaced by a. The headline's SE comes from
the whole K, so the covariance of the parts (they share X[u]) is in it.

First order, stated: a and the clip factor depend on the whole batch (a through this batch's g^2 inside
Adam's v, clip through |g|); they are held fixed at their batch values. Their dependence on any one unit
is O(1/B) and enters deltaH only at second order in the unit's noise.

Which SE. The step is known (it is this batch's); only mu_X is estimated. So the headline SE is that of
-U(K) as a prediction of -mu_X . Delta theta with Delta theta held at its value (ustat.conditional_se):
it leaves out the spread of the step itself across batches, which the unbiased variance of U (the
batch-to-batch SD of the estimator, also reported) counts.

Independent entropy batch E (X_E from other samples than the step's): deltaH = -mean_u X_E[u] . Delta theta
is unbiased with no U-statistic, and its SE is the plain one of a mean of i.i.d. scalars.

Per-unit attribution (unit_terms, summing to deltaH exactly): same batch, -r[u]/B with r[u] the Hoeffding
row mean of K, (sum_{v != u} K[u, v] + K[v, u]) / (2 (B-1)), whose mean is U(K); independent batch,
-X_E[u] . Delta theta / B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import ustat

# |Delta theta| / |theta| past which deltaH is not first-order accurate (docs/real_step.md, "Large steps": measured
# with gradprobe validate, the realised change departs from the first-order forecast by more than 10% there).
FIRST_ORDER_LIMIT = 0.05


@dataclass
class Part:
    value: float  # its contribution to deltaH
    se: float


@dataclass
class RealStepEstimate:
    deltaH: float
    se_deltaH: float  # SE as a prediction of this step's first-order change (the step held at its value)
    se_deltaH_batches: float  # SD of the estimator over batches (same batch: unbiased U variance), else NaN
    fresh: Part
    momentum: Part
    weight_decay: Part
    clip_factor: float
    entropy_batch: str  # "same" or "independent"
    units: int
    unit_terms: list[float]  # each unit's share of deltaH; they sum to deltaH (unit_contributions)
    rounding: Part | None = None  # what the run's dtype does to the step; None: not computed (fp32)

    def parts(self) -> dict[str, Any]:
        out = {"fresh": asdict(self.fresh), "momentum": asdict(self.momentum),
               "weight_decay": asdict(self.weight_decay), "clip_factor": self.clip_factor}
        if self.rounding is not None:
            out["rounding"] = asdict(self.rounding)
        return out


def mean_part(terms: torch.Tensor) -> Part:
    """-mean of per-unit scalars X[u] . w with the SE of a mean of i.i.d. terms."""
    t = terms.double()
    se = float(t.std(unbiased=True)) / math.sqrt(t.numel()) if t.numel() > 1 else math.nan
    return Part(-float(t.mean()), se)


def unit_contributions(cross: torch.Tensor) -> torch.Tensor:
    """-r[u]/B for a cross matrix K: unit u's share of -U(K), with r[u] the Hoeffding row mean (ustat.row_means),
    which splits every pair (u, v) half to u and half to v. sum_u -r[u]/B = -mean r = -U(K)."""
    k = cross.double()
    return -ustat.row_means(k.sum(1), k.sum(0), k.diagonal()) / k.shape[0]


def same_batch(fresh_cross: torch.Tensor, x_momentum: torch.Tensor, x_decay: torch.Tensor,
               clip_factor: float, x_rounding: torch.Tensor | None = None) -> RealStepEstimate:
    """fresh_cross[u, v] = X[u] . (clip a (.) G[v]) (clip already in), x_momentum[u] = X[u] . momentum,
    x_decay[u] = X[u] . decay, x_rounding[u] = X[u] . rounding (the run's dtype's part of the step, held
    fixed like momentum: it depends on the batch only through the whole step); all from the B units of one
    batch."""
    fresh_cross = fresh_cross.double()
    b = fresh_cross.shape[0]
    fixed = x_momentum.double() + x_decay.double() + (x_rounding.double() if x_rounding is not None else 0.0)
    k = fresh_cross + fixed[:, None]
    u = ustat.u_cross(float(k.sum()) / b ** 2, float(k.diagonal().sum()), b)
    u_fresh = ustat.u_cross(float(fresh_cross.sum()) / b ** 2, float(fresh_cross.diagonal().sum()), b)
    return RealStepEstimate(
        deltaH=-u, se_deltaH=ustat.conditional_se(k), se_deltaH_batches=ustat.unbiased_se(k),
        fresh=Part(-u_fresh, ustat.conditional_se(fresh_cross)),
        momentum=mean_part(x_momentum), weight_decay=mean_part(x_decay),
        clip_factor=clip_factor, entropy_batch="same", units=b, unit_terms=unit_contributions(k).tolist(),
        rounding=mean_part(x_rounding) if x_rounding is not None else None)


def independent(x_fresh: torch.Tensor, x_momentum: torch.Tensor, x_decay: torch.Tensor,
                clip_factor: float, x_rounding: torch.Tensor | None = None) -> RealStepEstimate:
    """x_fresh[u] = X_E[u] . (clip a (.) g) etc., X_E from an entropy batch independent of the step's."""
    terms = x_fresh.double() + x_momentum.double() + x_decay.double()
    if x_rounding is not None:
        terms = terms + x_rounding.double()
    whole = mean_part(terms)
    return RealStepEstimate(
        deltaH=whole.value, se_deltaH=whole.se, se_deltaH_batches=math.nan,
        fresh=mean_part(x_fresh), momentum=mean_part(x_momentum), weight_decay=mean_part(x_decay),
        clip_factor=clip_factor, entropy_batch="independent", units=x_fresh.numel(),
        unit_terms=(-terms / terms.numel()).tolist(),
        rounding=mean_part(x_rounding) if x_rounding is not None else None)


def resolution(value: float, se: float, units: int) -> dict[str, Any]:
    """Whether an estimate can be told from zero (|value| >= 2 SE) and, when not, about how many units would
    make it so: SE shrinks as 1/sqrt(B), so 2 SE = |value| at B (2 SE / |value|)^2. None where undefined (no
    SE, or a value of exactly 0)."""
    if not (math.isfinite(value) and math.isfinite(se)) or se <= 0:
        return {"resolved": None, "units_needed": None}
    if abs(value) >= 2 * se:
        return {"resolved": True, "units_needed": None}
    need = math.ceil(units * (2 * se / abs(value)) ** 2) if value != 0 else None
    return {"resolved": False, "units_needed": need}


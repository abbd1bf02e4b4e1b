"""Unbiasedness and SE calibration of U_cross on the micro model, over many independent batches (CPU).

    OMP_NUM_THREADS=1 python bench/validate_calibration.py --batches 400 --units 16 --group 8

Units draw a prompt uniformly from the 12 micro prompts and G responses from the exact (enumerated)
policy, so they are i.i.d.; X[u], Y[u] come from per-sequence gradients (one batched backward per 256
sequences) and the probe's loss weights; U_cross and both SEs from gradprobe.ustat. Printed: the cosine of
mean Xbar with -grad H (exact), mean U_cross against E[X].E[Y] (exact E[X], Y from an independent half),
the V-statistic's bias, and mean/RMS reported SE over the empirical SD of U_cross. `--unbiased` also
prints the exactly unbiased variance estimate U^2 - U4 from the pairwise matrix X[u].Y[v] (for comparison;
not what the probe reports).
"""

from __future__ import annotations

import argparse
import math

import torch

from gradprobe import ustat
from gradprobe.config import load_config
from gradprobe.entropy import enumerate_prompt, sample_enumerated
from gradprobe.losses import advantages, x_weights, y_weights
from gradprobe.persample import sequence_jacobian
from gradprobe.rollouts import MICRO_PROMPTS, builtin_reward
from gradprobe.stack import load_stack
from gradprobe.validate import GROUND_TRUTH, exact_entropy_grad


def unbiased_variance(pairs: torch.Tensor) -> float:
    """U^2 - (mean over 4 distinct indices of h(u,v) h(w,z)), h the symmetrised kernel: unbiased for Var U."""
    b = pairs.shape[0]
    h = 0.5 * (pairs + pairs.T)
    h = h - torch.diag(torch.diag(h))
    a = h.sum(1)
    total, sq_a, sq_h = float(a.sum()), float((a * a).sum()), float((h * h).sum())
    u = total / (b * (b - 1))
    return u * u - (total ** 2 - 4 * sq_a + 2 * sq_h) / (b * (b - 1) * (b - 2) * (b - 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--unbiased", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. lora.r=2")
    args = ap.parse_args()
    cfg = load_config(overrides=[*GROUND_TRUTH, *args.set])
    stack = load_stack(cfg)
    pool = [stack.tokenizer.encode(t, add_bos=True) for t in MICRO_PROMPTS]
    with torch.no_grad():
        enums = [enumerate_prompt(stack, p, 1.0, 4) for p in pool]
    _, grad_h = exact_entropy_grad(stack, pool, 1.0, 4)
    grad_h = grad_h.double()

    n, b, g = args.batches, args.units, args.group
    gen = torch.Generator().manual_seed(args.seed)
    which = torch.randint(len(pool), (2 * n * b,), generator=gen).tolist()
    units = [(k, sample_enumerated(enums[k], g, gen)) for k in which]
    keys = sorted({(k, tuple(r)) for k, rs in units for r in rs})
    row = {key: i for i, key in enumerate(keys)}
    s, jac = sequence_jacobian(stack, [(pool[k], list(r)) for k, r in keys], 1.0)
    x = torch.zeros(len(units), stack.n_params, dtype=torch.float64)
    y = torch.zeros_like(x)
    for u, (k, rs) in enumerate(units):
        idx = [row[(k, tuple(r))] for r in rs]
        rows = jac[idx].double()
        x[u] = x_weights(s[idx]) @ rows
        rewards = torch.tensor([builtin_reward(MICRO_PROMPTS[k], stack.tokenizer.decode(r)) for r in rs],
                               dtype=torch.float64)
        y[u] = y_weights(advantages(rewards), torch.tensor([len(r) for r in rs]), "dr_grpo") @ rows

    xs, ys = x[:n * b].view(n, b, -1), y[:n * b].view(n, b, -1)
    stats, unb = [], []
    for k in range(n):
        sx, sy = xs[k].sum(0), ys[k].sum(0)
        stats.append(ustat.summarize(float(sx @ sy) / b ** 2, (xs[k] * ys[k]).sum(1), xs[k] @ sy, ys[k] @ sx))
        if args.unbiased:
            unb.append(unbiased_variance(xs[k] @ ys[k].T))
    u = torch.tensor([st.u_cross for st in stats], dtype=torch.float64)
    v = torch.tensor([st.bars_dot for st in stats], dtype=torch.float64)
    sd = float(u.std())
    xbar = xs.mean((0, 1))
    terms = -(y[n * b:] @ grad_h)
    target, target_se = float(terms.mean()), float(terms.std()) / math.sqrt(terms.numel())
    print(f"B={b} G={g} batches={n} distinct responses={len(keys)} params={stack.n_params}")
    print(f"cos(mean Xbar, -grad H) = {float(-xbar @ grad_h / (xbar.norm() * grad_h.norm())):.4f}")
    comb = math.sqrt(sd ** 2 / n + target_se ** 2)
    print(f"mean U_cross {float(u.mean()):.4g}, E[X].E[Y] {target:.4g} ± {target_se:.2g}: "
          f"z = {(float(u.mean()) - target) / comb:.2f}")
    vcomb = math.sqrt(float(v.std()) ** 2 / n + target_se ** 2)
    print(f"V-statistic Xbar.Ybar mean {float(v.mean()):.4g}: z = {(float(v.mean()) - target) / vcomb:.2f}")
    z = (u - u.mean()) / sd
    print(f"empirical SD of U_cross {sd:.4g} (kurtosis {float((z ** 4).mean()):.1f})")
    for name, se in (("hoeffding", [st.se for st in stats]), ("jackknife", [st.se_jackknife for st in stats])):
        se_t = torch.tensor(se, dtype=torch.float64)
        rms = float((se_t ** 2).mean().sqrt())
        print(f"{name}: mean SE / SD {float(se_t.mean()) / sd:.3f}, RMS SE / SD {rms / sd:.3f}")
    if unb:
        vt = torch.tensor(unb, dtype=torch.float64)
        print(f"unbiased U^2-U4: mean var / SD^2 {float(vt.mean()) / sd ** 2:.3f}, "
              f"mean sqrt(max(var,0)) / SD {float(vt.clamp(min=0).sqrt().mean()) / sd:.3f}, "
              f"negative in {int((vt < 0).sum())}/{n}")


if __name__ == "__main__":
    main()

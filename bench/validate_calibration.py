"""Unbiasedness and SE calibration of U_cross on the micro model, over many independent batches (CPU).

    OMP_NUM_THREADS=1 python bench/validate_calibration.py --batches 400 --units 16 --group 8

Units draw a prompt uniformly from the 12 micro prompts and G responses from the exact (enumerated)
policy, so they are i.i.d.; X[u], Y[u] come from per-sequence gradients (one batched backward per 256
sequences) and the probe's loss weights; U_cross and its SEs from gradprobe.ustat. Printed: the cosine of
mean Xbar with -grad H (exact), mean U_cross against E[X].E[Y] (exact E[X], Y from an independent half),
the V-statistic's bias, and for each SE (row-mean Hoeffding and jackknife, the probe's se_unbiased from
the cross matrix X[u].Y[v], and the plain root of the unbiased variance) its mean and RMS over the
empirical SD of U_cross and the coverage of +-1.96 SE around the mean of U_cross.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, when run as a script

from gradprobe.config import load_config  # noqa: E402
from gradprobe.entropy import enumerate_prompt, sample_enumerated  # noqa: E402
from gradprobe.objective import advantages, x_weights, y_weights  # noqa: E402
from gradprobe.probe import ustat  # noqa: E402
from gradprobe.rollouts import MICRO_PROMPTS, builtin_reward  # noqa: E402
from gradprobe.stack import load_stack  # noqa: E402
from gradprobe.validate import GROUND_TRUTH, exact_entropy_grad  # noqa: E402
from tests.support.persample import sequence_jacobian  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--save", help="write every batch's cross matrix X[u].Y[v] to this .pt file")
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
    cross = torch.stack([xs[k] @ ys[k].T for k in range(n)])
    if args.save:
        torch.save(cross, args.save)
    stats = [ustat.summarize_cross(c) for c in cross]
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
    var = torch.tensor([st.var_unbiased for st in stats], dtype=torch.float64)
    ses = {name: torch.tensor([getattr(st, attr) for st in stats], dtype=torch.float64)
           for name, attr in (("hoeffding", "se"), ("jackknife", "se_jackknife"), ("unbiased", "se_unbiased"))}
    ses["sqrt(max(U^2-theta2,0))"] = var.clamp(min=0).sqrt()
    print("SE: mean SE / SD, RMS SE / SD, share of batches with |U_cross - mean| <= 1.96 SE")
    for name, se_t in ses.items():
        cover = float(((u - u.mean()).abs() <= 1.96 * se_t).double().mean())
        print(f"  {name}: {float(se_t.mean()) / sd:.3f}, {float((se_t ** 2).mean().sqrt()) / sd:.3f}, {cover:.3f}")
    print(f"unbiased variance U^2 - theta2: mean / SD^2 {float(var.mean()) / sd ** 2:.3f} "
          f"± {float(var.std()) / math.sqrt(n) / sd ** 2:.3f}, negative in {int((var < 0).sum())}/{n}")

if __name__ == "__main__":
    main()

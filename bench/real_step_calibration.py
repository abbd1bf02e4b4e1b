"""deltaH of the real next AdamW step against the exact entropy change, on the micro model (CPU).

    OMP_NUM_THREADS=1 python bench/real_step_calibration.py --beta1 0.9 --trials 30   (B=64, G=16, lr 1e-4)

A LoRA run is trained with torch AdamW (weight decay on) for --warmup steps on the run's loss; then each
trial samples a fresh batch of --units prompts x --group responses from the exact policy, asks gradprobe
(api.delta_h1 with the live optimizer, fused probe) for deltaH of the next step, takes that step for real
(optimizer.step() on the batch's loss gradient), measures H(theta') - H(theta) by enumerating every
response of every micro prompt, and restores the parameters and the optimizer state. Also per trial: an
independent entropy batch's estimate of the same step, the plain step's deltaH1 (lr P grad LY), the
exact first-order term <grad H, theta' - theta>, and the exact momentum share <grad H, momentum>/<grad H, step>.
Printed: one line per trial, then the summary (the table in docs/real_step.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from gradprobe import api
from gradprobe.config import load_config
from gradprobe.optim.precondition import Preconditioner
from gradprobe.optim.update import decompose, real_update
from gradprobe.probe import unit_gradients
from gradprobe.rollouts import MICRO_PROMPTS
from gradprobe.stack import load_stack
from gradprobe.validate import GROUND_TRUTH, Policy, exact_entropy_grad, sampled_batch

MAX_LEN = 4


def loss_grads(stack, batch, cfg) -> list[torch.Tensor]:
    """The run's loss gradient -mean_u grad LY[u], per trainable tensor (the probe's own backward reads)."""
    g = -unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"].mean(0)
    return [t.view_as(p).clone() for t, p in zip(g.split([p.numel() for p in stack.params]), stack.params)]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, p.dtype).clone()


def calibrate(beta1: float = 0.9, lr: float = 1e-4, weight_decay: float = 0.1, warmup: int = 12, trials: int = 30,
              units: int = 64, group: int = 16, seed: int = 0, log=print) -> tuple[list[dict], dict]:
    """The whole experiment; returns the per-trial records and the summary."""
    cfg = load_config(overrides=[*GROUND_TRUTH, f"batch.num_prompts={units}", f"batch.group_size={group}",
                                 f"seed={seed}"])
    stack = load_stack(cfg)
    pool = [stack.tokenizer.encode(t, add_bos=True) for t in MICRO_PROMPTS]
    opt = torch.optim.AdamW(stack.params, lr=lr, betas=(beta1, 0.999), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def batch_at_theta(policy: Policy):
        which = torch.randint(len(pool), (units,), generator=gen).tolist()
        return sampled_batch(stack, policy, [pool[k] for k in which], group, gen, 1.0)

    t0 = time.perf_counter()
    for _ in range(warmup):  # the run so far: real AdamW steps on the run's loss, each from the current policy
        set_grads(stack.params, loss_grads(stack, batch_at_theta(Policy(stack, "exact", 1.0, MAX_LEN)), cfg))
        opt.step()
        opt.zero_grad(set_to_none=True)
    policy = Policy(stack, "exact", 1.0, MAX_LEN)
    h0 = policy.entropy(pool)
    _, grad_h = exact_entropy_grad(stack, pool, 1.0, MAX_LEN)
    grad_h = grad_h.double()
    theta_norm = float(torch.cat([p.detach().reshape(-1) for p in stack.params]).norm())
    log(f"micro: beta1={beta1} lr={lr} wd={weight_decay} warmup={warmup} B={units} G={group}; H={h0:.5f}, "
        f"|theta|={theta_norm:.4g}; warm-up {time.perf_counter() - t0:.0f} s")

    rows = []
    for t in range(trials):
        batch = batch_at_theta(policy)
        entropy_batch = batch_at_theta(policy)
        precond = api.live_preconditioner(stack, opt, cfg, "AdamW")
        r = api.delta_h1(stack, batch, cfg, precond=precond, optimizer=opt, entropy_batch=entropy_batch)
        grads = loss_grads(stack, batch, cfg)
        want = torch.cat([d.reshape(-1) for d in real_update(opt, stack.params, grads)]).double()
        settings, mapped = api.step_source(stack, cfg, precond, opt)
        parts = decompose(settings, mapped, stack.names, stack.params, grads)
        momentum = torch.cat([m.reshape(-1) for m in parts.momentum]).double()
        saved_p = [p.detach().clone() for p in stack.params]
        saved_o = copy.deepcopy(opt.state_dict())
        set_grads(stack.params, grads)
        opt.step()  # the real step
        opt.zero_grad(set_to_none=True)
        step = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(stack.params, saved_p)]).double()
        true = policy.entropy(pool) - h0
        with torch.no_grad():
            for p, s in zip(stack.params, saved_p):
                p.copy_(s)
        opt.load_state_dict(saved_o)
        first = float(grad_h @ step)
        same = r.same_batch
        rows.append(dict(
            trial=t, true=true, first_order=first, pred_same=same["deltaH"], se_same=same["se_deltaH"],
            se_batches=same["se_deltaH_batches"], pred_independent=r.deltaH, se_independent=r.se_deltaH,
            parts=same["parts"], deltaH1=r.deltaH1, se_deltaH1=r.se_unbiased,
            plain_cosine=r.plain_update_cosine, plain_length_ratio=r.plain_update_norm / r.update_norm,
            step_rel=float(step.norm()) / theta_norm,
            reconstruction_error=float((want - step).norm() / step.norm()),
            momentum_share_pred=same["parts"]["momentum"]["value"] / same["deltaH"],
            momentum_share_exact=float(grad_h @ momentum) / first))
        row = rows[-1]
        log(f"{t:3d} true {true:+.4e} first {first:+.4e} same {row['pred_same']:+.4e} ± {row['se_same']:.2e} "
            f"indep {row['pred_independent']:+.4e} ± {row['se_independent']:.2e} dH1 {r.deltaH1:+.4e} "
            f"cos {r.plain_update_cosine:.2f} |Δθ| err {row['reconstruction_error']:.1e}")
    summary = summarize(rows, dict(beta1=beta1, lr=lr, weight_decay=weight_decay, warmup=warmup, trials=trials,
                                   units=units, group=group))
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append the per-trial records and the summary to this JSONL file")
    args = ap.parse_args()
    rows, summary = calibrate(args.beta1, args.lr, args.weight_decay, args.warmup, args.trials, args.units,
                              args.group, args.seed, log=lambda line: print(line, flush=True))
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"beta1": args.beta1, **row}) + "\n")
            f.write(json.dumps({"summary": summary}) + "\n")


def summarize(rows: list[dict], setting: dict) -> dict:
    def t(key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    true, first = t("true"), t("first_order")
    out: dict = dict(setting)
    for name in ("same", "independent"):
        z = (t(f"pred_{name}") - true) / t(f"se_{name}")
        big = true.abs() > 2 * t(f"se_{name}")
        sign = (torch.sign(t(f"pred_{name}")) == torch.sign(true))[big]
        out[name] = {"z_mean": float(z.mean()), "z_sd": float(z.std()),
                     "sign_right_where_true_gt_2se": f"{int(sign.sum())}/{int(big.sum())}",
                     "sign_right_all": f"{int((torch.sign(t(f'pred_{name}')) == torch.sign(true)).sum())}/{len(rows)}"}
    agree = (t("pred_same") - t("pred_independent")).abs() <= 2 * (t("se_same") ** 2 + t("se_independent") ** 2).sqrt()
    out["same_vs_independent_within_2se"] = f"{int(agree.sum())}/{len(rows)}"
    z1 = (t("deltaH1") - true) / t("se_deltaH1")
    sign1 = int((torch.sign(t("deltaH1")) == torch.sign(true)).sum())
    out["plain_deltaH1"] = {"z_mean": float(z1.mean()), "z_sd": float(z1.std()),
                            "sign_right_all": f"{sign1}/{len(rows)}"}
    rel = (first / true - 1).abs()
    out["first_order_vs_true_rel_err"] = {"median": float(rel.median()), "max": float(rel.max())}
    out["momentum_share_exact"] = [float(t("momentum_share_exact").min()), float(t("momentum_share_exact").max())]
    out["plain_cosine"] = [float(t("plain_cosine").min()), float(t("plain_cosine").max())]
    out["plain_length_ratio"] = [float(t("plain_length_ratio").min()), float(t("plain_length_ratio").max())]
    out["step_rel"] = float(t("step_rel").median())
    out["reconstruction_error_max"] = float(t("reconstruction_error").max())
    out["se_step_over_se_batches_median"] = float((t("se_same") / t("se_batches")).median())
    return out


if __name__ == "__main__":
    main()

"""Is the default forecast calibrated on TRL's own batches? Issue 23 (last Must-show). CPU, tiny Qwen2.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/trl_forecast_calibration.py --steps 10 --is-samples 1000
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/trl_forecast_calibration.py --bf16 --independent

A real trl.GRPOTrainer run (tests/support/trl_run.py: the tiny Qwen2 preset, vocab 48, LoRA r=4 on the
seven projections, lr 1e-3 with TRL's linear decay, fp32 unless --bf16) of 16 prompts x 4 completions per
step (per_device_train_batch_size=64, num_generations=4), a checkpoint every step, gradprobe.BatchCapture
attached. For each K = 1 .. steps-1:

- the forecast: `gradprobe delta-h1 --checkpoint checkpoint-K --rollouts step-(K+1)-pass-1.jsonl --json`
  (the CLI itself, in process) gives deltaH, its SE and update_rel;
- the truth: H(checkpoint K+1) - H(checkpoint K) on the same 16 prompts, self-normalised importance
  sampling with --is-samples draws per prompt made at checkpoint K (validate.EntropyChange, the callback's
  code path), responses cut at max_completion_length exactly as the forecast's X cuts them;
- with --independent, the same forecast with `--entropy-rollouts` a 16 x 16 batch sampled at checkpoint K.

z = (pred - true) / sqrt(SE_pred^2 + SE_true^2). Also per step: the truth at theta_K - step (its even part is
the second-order term), and with --independent `self_terms` (the prompts' own terms, the leave-one-out and
the step's-Jacobian same-batch estimates: why the default runs low, docs/real_step.md). --is-samples 0 prints
only that mechanism (no truth, no CLI forecast; ~15 s a step). Printed: one line per step, then mean z, rms z
and the share within 2 SE per forecast. --first K probes from checkpoint K on (to split one run between
processes: the run is deterministic). Recorded: bench/RESULTS.md, docs/real_step.md.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from gradprobe.capture import BatchCapture
from gradprobe.config import load_config
from gradprobe.rollouts import read_rollouts, write_rollouts
from gradprobe.stack import load_stack
from gradprobe.trainer_checkpoint import load_checkpoint
from gradprobe.validate import EntropyChange, Policy, sampled_batch
from tests.support.trl_run import train_grpo

RUN = dict(per_device_train_batch_size=64, num_generations=4, save_steps=1, learning_rate=1e-3,
           max_completion_length=16, logging_steps=1)


def trl_run(root: Path, steps: int, bf16: bool, seed: int = 0, **config) -> Path:
    """The GRPOTrainer run with the capture; returns its output directory."""
    from trl import GRPOTrainer

    out = root / "run"

    class Capturing(GRPOTrainer):
        def train(self, *a, **kw):
            BatchCapture(out / "batches").attach(self)
            return super().train(*a, **kw)

    train_grpo(out, base_dir=root / "base", trainer_class=Capturing, lora=dict(r=4, lora_alpha=8),
               **{**RUN, "max_steps": steps, "bf16": bf16, "seed": seed, **config})
    return out


def _stack(ckpt: Path, rollouts: Path, *sets: str):
    """The stack as `--checkpoint` loads it (the run record's quantisation, the adapter's dtype)."""
    sets = (f"batch.rollouts={rollouts}", *sets)
    cfg, _ = load_checkpoint(ckpt, load_config(overrides=list(sets)), given={s.split("=")[0] for s in sets})
    stack = load_stack(cfg)
    stack.model.eval()
    return stack, cfg


def forecast(ckpt: Path, rollouts: Path, json_path: Path, entropy_rollouts: Path | None = None) -> dict:
    """`gradprobe delta-h1 --checkpoint ... --rollouts ... --json` through the CLI; its JSON payload."""
    from typer.testing import CliRunner

    from gradprobe.cli import app

    args = ["delta-h1", "--checkpoint", str(ckpt), "--rollouts", str(rollouts), "--json", str(json_path), "--quiet"]
    if entropy_rollouts is not None:
        args += ["--entropy-rollouts", str(entropy_rollouts)]
    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        raise RuntimeError(f"delta-h1 exited {res.exit_code}: {res.output[-2000:]}")
    return json.loads(json_path.read_text())["result"]


def truth(ckpt: Path, nxt: Path, rollouts: Path, is_samples: int, seed: int, independent_group: int = 0):
    """H(nxt) - H(ckpt) and its SE on the batch's prompts (draws at ckpt, EntropyChange), and, when asked, a
    batch of independent_group responses per prompt sampled at ckpt (the independent entropy batch)."""
    stack, cfg = _stack(ckpt, rollouts)
    batch = read_rollouts(rollouts, stack.tokenizer)
    prompts = [g.prompt for g in batch.groups]
    tau, max_len = cfg.batch.temperature, cfg.probe.max_completion_length  # read from training_args.bin
    policy = Policy(stack, "importance", tau, max_len)
    change = EntropyChange(stack, policy, prompts, is_samples, seed)
    entropy_batch = None
    if independent_group:
        gen = torch.Generator().manual_seed(seed + 1)
        entropy_batch = sampled_batch(stack, policy, prompts, independent_group, gen, tau)
    after, _ = _stack(nxt, rollouts, "probe.learning_rate=1")  # only its weights: the last lr may be 0
    before = [p.detach().clone() for p in stack.params]
    steps = [q.detach().to(p.dtype) - p0 for p, p0, q in zip(stack.params, before, after.params, strict=True)]

    def at(eta: float) -> tuple[float, float, float]:  # H(theta_K + eta * step) - H(theta_K), same draws
        with torch.no_grad():
            for p, p0, d in zip(stack.params, before, steps):
                p.copy_(p0 + eta * d)
        return change.measure()

    delta, se, ess = at(1.0)
    back, se_back, ess_back = at(-1.0)
    with torch.no_grad():
        for p, p0 in zip(stack.params, before):
            p.copy_(p0)
    # the step's odd part (T(1) - T(-1)) / 2 is first order plus third; the even part (T(1) + T(-1)) / 2 is the
    # second-order term. (se + se_back) / 2 bounds the odd part's SE whatever the two estimates' correlation.
    return dict(true=delta, se_true=se, ess=min(ess, ess_back), true_odd=(delta - back) / 2,
                se_odd=(se + se_back) / 2, true_even=(delta + back) / 2, entropy=change.h0, prompts=len(prompts),
                distinct=len({tuple(p) for p in prompts}), tau=tau, max_len=max_len, tokenizer=stack.tokenizer), \
        entropy_batch


def self_terms(ckpt: Path, rollouts: Path, entropy_batch) -> dict:
    """Where the prompts' own terms go. K[p, q] = X[p].D[q] with D[q] = clip a(g) G[q] + momentum + decay the
    step's share of unit q (a held at the batch's value, as the estimator holds it; mean_q D[q] = the step):
    the same-batch forecast is -U(K) over pairs of different units, which on a batch of distinct prompts
    leaves out every prompt's own term X[p].D[p]. With X_E from the independent batch (same prompts, other
    samples, so E[X_E[p]] = -grad H_p whatever D is), -mean_{p,q} K_E estimates the whole change, and its
    diagonal, -(1/B^2) sum_p K_E[p, p], the share that the prompts' own gradients make."""
    from gradprobe.api import build_batch, preconditioner, step_source
    from gradprobe.optim.precondition import Preconditioner
    from gradprobe.optim.update import decompose
    from gradprobe.probe import unit_gradients, ustat

    stack, cfg = _stack(ckpt, rollouts)
    batch = build_batch(stack, cfg)
    rows = unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("x", "y"))
    xe = unit_gradients(stack, entropy_batch, cfg.probe, Preconditioner(None), kinds=("x",))["x"].double()
    x, loss_g = rows["x"].double(), -rows["y"].double()  # per-unit loss gradients: the batch's is their mean
    sizes = [p.numel() for p in stack.params]
    grads = [t.view_as(p).float() for t, p in zip(loss_g.mean(0).split(sizes), stack.params)]
    settings, mapped = step_source(stack, cfg, preconditioner(stack, cfg), None)
    parts = decompose(settings, mapped, stack.names, stack.params, grads)
    flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
    d = parts.clip_factor * flat(parts.fresh) * loss_g + flat(parts.momentum) + flat(parts.decay)
    b = len(d)
    k, ke = x @ d.T, xe @ d.T
    off = ~torch.eye(b, dtype=torch.bool)
    # leave one out: unit u's X against the step the optimizer takes on the other units' mean gradient (its own
    # v, no unit-u sample in it): no dependence on unit u's samples, whatever a(g) does
    loo = []
    for u in range(b):
        g_u = (loss_g.sum(0) - loss_g[u]) / (b - 1)
        gs = [t.view_as(p).float() for t, p in zip(g_u.split(sizes), stack.params)]
        loo.append(flat(decompose(settings, mapped, stack.names, stack.params, gs).unrounded(gs)))
    loo = torch.stack(loo)
    # the step's own Jacobian in place of a (Adam's step is elementwise in g: central differences per
    # coordinate); D_J[v] = step + J (.) (G[v] - g), mean_v D_J[v] = the step: the delta-method U-statistic
    g = loss_g.mean(0)

    def step_at(scale: float) -> torch.Tensor:
        gs = [t.view_as(p).float() for t, p in zip((g * scale).split(sizes), stack.params)]
        return flat(decompose(settings, mapped, stack.names, stack.params, gs).unrounded(gs))

    eps = 1e-3
    jac = torch.where(g != 0, (step_at(1 + eps) - step_at(1 - eps)) / (2 * eps * g), parts.clip_factor *
                      flat(parts.fresh))
    kj = x @ (step_at(1.0)[None, :] + jac * (loss_g - g)).T
    return dict(same_u=float(-k[off].mean()), indep_all=float(-ke.mean()), indep_cross=float(-ke[off].mean()),
                indep_self=float(-ke.diagonal().sum() / b ** 2), same_loo=float(-(x * loo).sum(1).mean()),
                same_loo_se=float((x * loo).sum(1).std() / b ** 0.5), indep_loo=float(-(xe * loo).sum(1).mean()),
                same_jac=float(-kj[off].mean()), same_jac_se=ustat.conditional_se(kj),
                same_u_se=ustat.conditional_se(k),
                jac_over_a=float(jac.abs().sum() / (parts.clip_factor * flat(parts.fresh)).abs().sum()))


def _z(pred: float, se_pred: float, true: float, se_true: float) -> float:
    return (pred - true) / math.sqrt(se_pred ** 2 + se_true ** 2)


def summary(zs: list[float]) -> dict:
    n = len(zs)
    return dict(n=n, mean_z=sum(zs) / n, rms_z=math.sqrt(sum(z * z for z in zs) / n),
                within_2se=sum(abs(z) < 2 for z in zs) / n, below=sum(z < 0 for z in zs) / n)


def calibrate(root: Path, steps: int = 10, is_samples: int = 1000, bf16: bool = False, independent: bool = False,
              seed: int = 0, log=print, first: int = 1, **config) -> tuple[list[dict], dict]:
    """The whole experiment in `root`; the per-step rows and {forecast name: summary}."""
    t0 = time.perf_counter()
    out = trl_run(root, steps, bf16, seed, **config)
    log(f"TRL run: {steps} steps, bf16={bf16}, {time.perf_counter() - t0:.0f} s")
    rows = []
    for k in range(first, steps):
        t1 = time.perf_counter()
        ckpt, nxt = out / f"checkpoint-{k}", out / f"checkpoint-{k + 1}"
        rollouts = next((out / "batches").glob(f"step-{k + 1:06d}-pass-*.jsonl"))
        if not is_samples:  # the mechanism only: no truth, no CLI forecast
            stack, _ = _stack(ckpt, rollouts)
            prompts = [g.prompt for g in read_rollouts(rollouts, stack.tokenizer).groups]
            eb = sampled_batch(stack, Policy(stack, "importance", 1.0, config.get("max_completion_length", 16)),
                               prompts, 16, torch.Generator().manual_seed(seed * 1_000_003 + k + 1), 1.0)
            rows.append(dict(step=k + 1, **self_terms(ckpt, rollouts, eb)))
            log(json.dumps(rows[-1]))
            continue
        t, eb = truth(ckpt, nxt, rollouts, is_samples, seed * 1_000_003 + k, 16 if independent else 0)
        r = forecast(ckpt, rollouts, root / f"d{k + 1}.json")
        row = dict(step=k + 1, pred=r["deltaH"], se_pred=r["se_deltaH"], true=t["true"], se_true=t["se_true"],
                   ess=t["ess"], entropy=t["entropy"], update_rel=r.get("update_rel"), lr=r.get("step", {}).get("lr"),
                   max_len=t["max_len"], prompts=t["prompts"], distinct=t["distinct"])
        row["z"] = _z(row["pred"], row["se_pred"], row["true"], row["se_true"])
        row.update(true_odd=t["true_odd"], se_odd=t["se_odd"], true_even=t["true_even"])
        row["z_odd"] = _z(row["pred"], row["se_pred"], row["true_odd"], row["se_odd"])
        if eb is not None:
            path = root / f"entropy-{k + 1}.jsonl"
            write_rollouts(eb, path, t["tokenizer"])
            ri = forecast(ckpt, rollouts, root / f"e{k + 1}.json", entropy_rollouts=path)
            row.update(pred_indep=ri["deltaH"], se_pred_indep=ri["se_deltaH"])
            row["z_indep"] = _z(row["pred_indep"], row["se_pred_indep"], row["true"], row["se_true"])
            row.update(self_terms(ckpt, rollouts, eb))
            row["z_jac"] = _z(row["same_jac"], row["same_jac_se"], row["true"], row["se_true"])
        rows.append(row)
        log(" ".join(f"{k}={v:+.4e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            + f"  ({time.perf_counter() - t1:.0f} s)")
    if not is_samples:
        return rows, {}
    result = {"same batch": summary([r["z"] for r in rows]),
              "same batch vs the odd part": summary([r["z_odd"] for r in rows])}
    if independent:
        result["independent 16x16"] = summary([r["z_indep"] for r in rows])
        result["same batch, the step's Jacobian (bench only)"] = summary([r["z_jac"] for r in rows])
    result["sums"] = dict(pred=sum(r["pred"] for r in rows), true=sum(r["true"] for r in rows),
                          true_odd=sum(r["true_odd"] for r in rows), true_even=sum(r["true_even"] for r in rows),
                          max_update_rel=max(r["update_rel"] or 0.0 for r in rows))
    return rows, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--is-samples", type=int, default=1000)
    ap.add_argument("--bf16", action="store_true", help="TRL's default bf16 autocast (else fp32)")
    ap.add_argument("--independent", action="store_true", help="also the forecast with a 16x16 entropy batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--first", type=int, default=1, help="the first checkpoint K probed (to split a run)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the summary here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows, result = calibrate(Path(d), a.steps, a.is_samples, a.bf16, a.independent, a.seed, first=a.first,
                                 learning_rate=a.lr, max_completion_length=a.max_completion_length)
    for name, s in result.items():
        print(name, json.dumps(s))
    if a.json is not None:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rows": rows, "summary": result},
                                     indent=1))


if __name__ == "__main__":
    main()

"""GradprobeCallback over a training run: forecast deltaH against the realised entropy change, step by step.

    OMP_NUM_THREADS=1 python bench/callback_run.py --steps 30 --lr 3e-4        (micro, plain Trainer, exact H)
    OMP_NUM_THREADS=1 python bench/callback_run.py --trainer grpo --steps 20   (tiny, TRL GRPOTrainer, IS)

plain: a transformers Trainer on the micro QLoRA stack (language-modelling loss, AdamW, weight decay 0.1,
max_grad_norm 1), evaluation prompts' entropy enumerated exactly (responses of at most --max-new-tokens), and
grad H . Delta theta exactly beside the sampled forecast. grpo: TRL's GRPOTrainer with its defaults on the tiny
preset (dapo loss, bf16 autocast, gradient checkpointing), entropy importance-sampled. Prints one row per
forecast, then the correlation of forecast and realised over steps and the cost; --out keeps the JSONL.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from gradprobe.callback import GradprobeCallback
from gradprobe.rollouts import BUILTIN_PROMPTS, MICRO_PROMPTS


def pearson(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def run(trainer: str, steps: int, lr: float, every: int, prompts: int, group: int, max_new_tokens: int,
        is_samples: int, out: Path, seed: int, work: Path) -> list[dict]:
    """Train in `work` with the callback writing `out`; returns its records."""
    if trainer == "plain":
        from tests.support.trainer_run import micro_trainer

        tr, tok = micro_trainer(work / "run", lr=lr, steps=steps, seed=seed)
        cb = GradprobeCallback(MICRO_PROMPTS[:prompts], every_n_steps=every, tokenizer=tok, group_size=group,
                               max_new_tokens=max_new_tokens, exact_first_order=True, jsonl=out, seed=seed)
        cb.attach(tr).trainer.train()
        return cb.records
    from trl import GRPOTrainer

    from tests.support.trl_run import train_grpo

    cb = GradprobeCallback(BUILTIN_PROMPTS[:prompts], every_n_steps=every, group_size=group,
                           is_samples=is_samples, jsonl=out, seed=seed)

    class Probed(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cb.attach(self)

    train_grpo(work / "run", trainer_class=Probed, max_steps=steps, save_steps=10 ** 6, learning_rate=lr,
               seed=seed)
    return cb.records


def table(records: list[dict]) -> str:
    exact = any(r["deltaH_exact"] is not None for r in records)
    head = "| step | lr | forecast deltaH ± SE | realised ± SE | " + ("grad H·Δθ (exact) | " if exact else "") + \
        "momentum part | step size ‖Δθ‖/‖θ‖ | seconds | × step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        row = [f"{r['step']}", f"{r['lr']:.2e}", f"{r['deltaH']:+.3e} ± {r['se_deltaH']:.1e}",
               f"{r['realised']:+.3e} ± {r['realised_se']:.1e}"]
        if exact:
            row.append(f"{r['deltaH_exact']:+.3e}")
        row += [f"{r['parts']['momentum']['value']:+.2e}", f"{r['update_rel']:.1e}", f"{r['seconds']:.1f}",
                f"{r['cost_ratio']:.0f}" if r["cost_ratio"] else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(records: list[dict]) -> str:
    f = [r["deltaH"] for r in records]
    t = [r["realised"] for r in records]
    z = [(r["deltaH"] - r["realised"]) / math.hypot(r["se_deltaH"], r["realised_se"]) for r in records]
    out = [f"forecasts: {len(records)}",
           f"correlation(forecast, realised) over steps: {pearson(f, t):.3f}",
           f"|forecast - realised| within 2 SE: {sum(abs(v) < 2 for v in z)}/{len(z)}; "
           f"RMS z: {math.sqrt(sum(v * v for v in z) / len(z)):.2f}"]
    if all(r["deltaH_exact"] is not None for r in records):
        e = [r["deltaH_exact"] for r in records]
        rel = max(abs(a - b) / abs(b) for a, b in zip(e, t) if b)
        out.append(f"correlation(grad H·Δθ exact, realised): {pearson(e, t):.4f}; largest relative gap {rel:.2%}")
    sec = sorted(r["seconds"] for r in records)
    ratio = sorted(r["cost_ratio"] for r in records if r["cost_ratio"])
    out.append(f"seconds per forecast: median {sec[len(sec) // 2]:.1f} (min {sec[0]:.1f}, max {sec[-1]:.1f}); "
               f"× the training step: median {ratio[len(ratio) // 2]:.0f}")
    phases: dict[str, float] = {}
    for r in records:
        for k, v in r["timings"].items():
            phases[k] = phases.get(k, 0.0) + v / len(records)
    out.append("mean seconds per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
               + f", realised {sum(r['realised_seconds'] for r in records) / len(records):.2f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", choices=("plain", "grpo"), default="plain")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=3, help="plain: response length for exact entropy")
    ap.add_argument("--is-samples", type=int, default=128, help="grpo: importance samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="keep the JSONL here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradprobe-bench-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "gradprobe.jsonl"
        records = run(args.trainer, args.steps, args.lr, args.every, args.prompts, args.group, args.max_new_tokens,
                      args.is_samples, out, args.seed, Path(tmp))
    print(f"{args.trainer}: {args.steps} steps, lr {args.lr:g}, forecast every {args.every}, {args.prompts} "
          f"evaluation prompts x {args.group}")
    print(table(records))
    print(summary(records))


if __name__ == "__main__":
    main()

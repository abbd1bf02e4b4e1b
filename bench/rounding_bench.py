"""The headline deltaH with a live AdamW on fp32 and on bf16 LoRA weights, side by side in one process, against a
training step: what the rounding part (the optimizer's own step on bf16 copies) costs at real shapes.

    python bench/rounding_bench.py --preset qwen2.5-1.5b --prompts 64 --json out.json
    python bench/rounding_bench.py --preset tiny --prompts 8 --device cpu        # a smoke run

Per LoRA dtype: the stack (nf4 base, LoRA r on all seven projections, bf16 autocast, reentrant checkpointing),
the same synthetic batch (random ids, no generation), a torch AdamW with one step of history; rows: the training
step (forward + backward of the run's loss over the batch, microbatched, then optimizer.step()) and
gradprobe.delta_h1 (packed schedule, the real-step finish, its rounding part on bf16 weights). Times are
CUDA-synchronised, each the median of --repeats after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradprobe as gp  # noqa: E402
from bench.probe_bench import sync, synthetic_batch, training_step  # noqa: E402
from gradprobe import api  # noqa: E402


def timed(fn, device, repeats: int) -> tuple[float, object]:
    fn()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(dtype: str, a: argparse.Namespace) -> dict:
    """One LoRA dtype: its stack, batch and AdamW, the training step and delta_h1 timed."""
    cfg = gp.load_config(overrides=[
        f"model.preset={a.preset}", f"lora.r={a.rank}", f"lora.alpha={2 * a.rank}", f"lora.dtype={dtype}",
        f"device={a.device}", "checkpointing=reentrant", f"probe.microbatch_size={a.microbatch}",
        "probe.warmup_steps=0", "probe.learning_rate=1e-5"])
    stack = gp.load_stack(cfg)
    vocab = stack.model.get_input_embeddings().num_embeddings
    batch = synthetic_batch(vocab, a.prompts, a.group, a.prompt_len, a.response_len)
    opt = torch.optim.AdamW(stack.params, lr=1e-5, weight_decay=0.01)
    training_step(stack, batch, cfg.probe)
    opt.step()  # one step of history: momentum and v to show
    opt.zero_grad(set_to_none=True)
    precond = api.live_preconditioner(stack, opt, cfg)
    theta = [p.detach().clone() for p in stack.params]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}

    def step() -> None:
        training_step(stack, batch, cfg.probe)
        opt.step()
        with torch.no_grad():  # the same starting point every time, the optimizer state too
            for p, t in zip(stack.params, theta):
                p.copy_(t)
            for k, s in state.items():
                for n, v in s.items():
                    opt.state[k][n].copy_(v)
        opt.zero_grad(set_to_none=True)

    t_step, _ = timed(step, stack.device, a.repeats)
    t_probe, r = timed(lambda: gp.delta_h1(stack, batch, cfg, precond=precond, optimizer=opt), stack.device,
                       a.repeats)
    return dict(lora_dtype=dtype, preset=a.preset, B=a.prompts, G=a.group, tokens=a.prompt_len + a.response_len,
                microbatch=a.microbatch, trainable=stack.n_params, step_s=t_step, delta_h1_s=t_probe,
                ratio=t_probe / t_step, deltaH=r.deltaH, se_deltaH=r.se_deltaH,
                rounding=r.parts.get("rounding", {}).get("value"), rounded_away=r.rounded_away,
                update_rel=r.update_rel, probe_s=r.timings.get("probe"),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if stack.device.type == "cuda" else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--microbatch", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        row = measure(dtype, a)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Cost of TRL's per-token surrogate in the probe: the sequence-weighted packed probe (one backward per
forward) against the per-token one (packed takes a second backward per forward; fused one per unit), with the
same model and batch in one process. The reference log-probs are a constant: the cost does not depend on their
values.

    PYTHONPATH=. python bench/trl_surrogate_cost.py                      # tiny CPU stack, B=16 x G=4, 16 tokens
    PYTHONPATH=. python bench/trl_surrogate_cost.py --preset qwen2.5-1.5b --device cuda --prompts 64 --group 8 \
        --prompt-len 64 --response-len 192 --microbatch 64 --rank 64 --rows packed --json out.json

The tiny default samples its batch; a preset run takes synthetic_batch's random ids (bench/probe_bench.py).
Each row is the best of --repeats calls of gradprobe.delta_h1, CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradprobe as gp  # noqa: E402
from bench.probe_bench import sync, synthetic_batch  # noqa: E402

FP32 = ["autocast=off", "quant.compute_dtype=float32"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=16)
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", default="packed,fused", help="schedules to time, each with and without per-token LY")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tiny = a.preset == "tiny"
    base = [f"model.preset={a.preset}", f"device={a.device}", f"lora.r={a.rank}", f"lora.alpha={2 * a.rank}",
            f"probe.microbatch_size={a.microbatch}", "probe.warmup_steps=0", "probe.learning_rate=1e-5",
            *(FP32 if tiny else ["checkpointing=reentrant"])]
    cfg = gp.load_config(overrides=[*base, f"batch.num_prompts={a.prompts}", f"batch.group_size={a.group}",
                                    f"batch.max_new_tokens={a.response_len}"])
    stack = gp.load_stack(cfg)
    if tiny:
        batch = gp.build_batch(stack, cfg)
    else:
        vocab = stack.model.get_input_embeddings().num_embeddings
        batch = synthetic_batch(vocab, a.prompts, a.group, a.prompt_len, a.response_len)
    for g in batch.groups:
        g.ref_logprobs = [[-1.0] * len(r) for r in g.responses]

    def best(*sets: str) -> tuple[float, str]:
        c = gp.load_config(overrides=[*base, *sets])
        times, r = [], None
        for _ in range(a.repeats):
            sync(stack.device)
            t0 = time.perf_counter()
            r = gp.delta_h1(stack, batch, c)
            sync(stack.device)
            times.append(time.perf_counter() - t0)
        return min(times), r.schedule

    rows = []
    for schedule in a.rows.split(","):
        for label, sets in (("sequence weights", ()), ("per-token (beta 0.04)", ("probe.beta=0.04",))):
            seconds, ran = best(f"probe.schedule={schedule}", *sets)
            rows.append(dict(label=f"{label}, {schedule}", seconds=seconds, schedule=ran, preset=a.preset,
                             B=a.prompts, G=a.group, microbatch=a.microbatch))
            print(f"{label + ', ' + schedule:34s} {seconds:.3f} s  ({ran})", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

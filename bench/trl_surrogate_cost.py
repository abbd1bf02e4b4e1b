"""Cost of TRL's per-token surrogate in the probe: the sequence-weighted packed probe (one backward per
forward) against the per-token one (packed takes a second backward per forward; fused one per unit), on the
tiny CPU stack, B=16 prompts x G=4, up to 16 tokens, best of 3. The reference log-probs are a constant: the
cost does not depend on their values.

    PYTHONPATH=. python bench/trl_surrogate_cost.py
"""

from __future__ import annotations

import time

import gradprobe as gp
from gradprobe.rollouts import write_rollouts

FP32 = ["autocast=off", "quant.compute_dtype=float32"]


def main() -> None:
    cfg = gp.load_config(overrides=["batch.num_prompts=16", "batch.group_size=4", "batch.max_new_tokens=16", *FP32])
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    for g in batch.groups:
        g.ref_logprobs = [[-1.0] * len(r) for r in g.responses]
    path = "/tmp/trl_surrogate_cost.jsonl"
    write_rollouts(batch, path)

    def best(*sets: str) -> tuple[float, str]:
        c = gp.load_config(overrides=[f"batch.rollouts={path}", *FP32, *sets])
        b = gp.build_batch(stack, c)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = gp.delta_h1(stack, b, c)
            times.append(time.perf_counter() - t0)
        return min(times), r.schedule

    for label, sets in (("sequence weights, packed", ()), ("sequence weights, fused", ("probe.schedule=fused",)),
                        ("per-token (beta 0.04), packed", ("probe.beta=0.04",)),
                        ("per-token (beta 0.04), fused", ("probe.beta=0.04", "probe.schedule=fused"))):
        seconds, schedule = best(*sets)
        print(f"{label:32s} {seconds:.3f} s  ({schedule})")


if __name__ == "__main__":
    main()

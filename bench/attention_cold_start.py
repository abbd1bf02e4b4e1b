"""Cold-start cost of cuDNN attention with rollouts of varying length, side by side in one process.

cuDNN attention plans per sequence shape; rollouts cut by EOS give a new padded shape almost every unit.
The probe switches cuDNN attention off for its own forwards and backwards (gradprobe/attention.py); a
plain training step here keeps torch's default. Rows, in this order, on one synthetic batch:
  fused_cold     the probe, first call in the process (its kernels need no plan)
  step_cold      one training step with torch's default attention (cuDNN on H100): plans every shape
  step_warm      the same step again: plans cached
  step_no_cudnn  the same step with cuDNN attention off
  fused_warm     the probe again

    python bench/attention_cold_start.py --preset qwen2.5-1.5b --prompts 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_bench import probe_cfg_for, synthetic_adam, synthetic_batch, training_step  # noqa: E402

import gradprobe as gp  # noqa: E402
from gradprobe.attention import without_cudnn_attention  # noqa: E402
from gradprobe.probe import run_probe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--response-len-min", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=192)
    args = ap.parse_args()
    cfg = gp.load_config(overrides=[f"model.preset={args.preset}", "device=cuda", "lora.r=64", "lora.alpha=128"])
    stack = gp.load_stack(cfg)
    vocab = stack.model.get_input_embeddings().num_embeddings
    batch = synthetic_batch(vocab, args.prompts, args.group, 64, args.response_len, seed=1,
                            response_len_min=args.response_len_min)
    precond = synthetic_adam(stack)
    pc = probe_cfg_for("fused", args.group)
    out: dict = {"preset": args.preset, "gpu": torch.cuda.get_device_name(), "B": args.prompts, "G": args.group,
                 "response_len": [args.response_len_min, args.response_len], "torch": torch.__version__}

    def timed(name: str, fn) -> None:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out[name + "_s"] = round(time.perf_counter() - t, 3)

    def step_without_cudnn() -> None:
        with without_cudnn_attention():
            training_step(stack, batch, pc)

    timed("fused_cold", lambda: out.setdefault("deltaH1", run_probe(stack, batch, pc, precond, 1e-5).deltaH1))
    timed("step_cold", lambda: training_step(stack, batch, pc))
    timed("step_warm", lambda: training_step(stack, batch, pc))
    timed("step_no_cudnn", step_without_cudnn)
    timed("fused_warm", lambda: run_probe(stack, batch, pc, precond, 1e-5))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

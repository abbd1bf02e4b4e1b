"""Host time of the probe's final pass over its bank of per-unit gradients (fused / one_backward schedules).

Before the pairwise SE, the pass was two row-dot sweeps (X[u].sum Y and Y[u].sum X: fp32 matrix-vector
products over 8192-column slabs, fp64 across slabs). Now it is one sweep forming K[u, v] = X[u].Y[v]
(FlatLayout.cross_dots: an m x 8192 by 8192 x m fp32 product per slab, fp64 across slabs), whose row and
column sums are the same dots. This times both on random banks of m x n fp32 (no model, no GPU).

    python bench/bank_pass_bench.py --n 73900000 --units 8,32,64 --json bench/results/bank_pass.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradprobe.params import FlatLayout  # noqa: E402


def row_dots(rows: torch.Tensor, v: torch.Tensor, cols: int = 8192) -> torch.Tensor:
    """The former FlatLayout.row_dots, for comparison."""
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    for s in range(0, rows.shape[1], cols):
        out += (rows[:, s:s + cols] @ v[s:s + cols]).double()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=73_900_000, help="trainable values (Qwen2.5-1.5B, r=64, all 7)")
    ap.add_argument("--units", default="8,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    layout = FlatLayout([torch.nn.Parameter(torch.empty(args.n))])
    n = layout.n
    rows = []
    for m in [int(v) for v in args.units.split(",")]:
        bx = torch.empty(m, n).uniform_(-1, 1)
        by = torch.empty(m, n).uniform_(-1, 1)
        old, new = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sx, sy = bx.sum(0), by.sum(0)  # the running sums exist already in the probe; timed apart
            t1 = time.perf_counter()
            a, b = row_dots(bx, sy), row_dots(by, sx)
            t2 = time.perf_counter()
            k = layout.cross_dots(bx, by)
            t3 = time.perf_counter()
            old.append(t2 - t1)
            new.append(t3 - t2)
        scale = float(bx.norm(dim=1).max() * sy.norm() + by.norm(dim=1).max() * sx.norm())  # |x||y| bound
        agree = max(float((k.sum(1) - a).abs().max()), float((k.sum(0) - b).abs().max())) / scale
        rows.append({"units": m, "n": n, "row_dots_s": statistics.median(old), "cross_dots_s": statistics.median(new),
                     "sums_s": t1 - t0, "row_sums_diff_over_norms": agree, "bank_gb": 2 * m * n * 4 / 1e9})
        print(json.dumps(rows[-1]))
        del bx, by
    if args.json:
        Path(args.json).write_text(json.dumps({"host": platform.processor() or platform.machine(),
                                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Side-by-side GPU benchmark of the delta-H1 probe: training steps, `literal`, `fused`, `packed`.

Every row runs in this one process on the same synthetic rollouts (random token ids, no generation)
and the same model: a preset architecture with random weights, nf4 base, LoRA on all seven projections,
bf16 autocast. Wall time is CUDA-synchronised (warm-up excluded, median of repeats); peak memory is
torch.cuda.max_memory_allocated, reset before every call.

    python bench/probe_bench.py --preset qwen2.5-1.5b --prompts 4 --repeats 3 --json out.json
    python bench/probe_bench.py --preset qwen2.5-0.5b --rows step,fused --sweep 4,8,16,32
    python bench/probe_bench.py --preset tiny --device cpu --rows step,fused --sweep 2,4,8,16

Rows: step (forward + backward of the Y loss over the whole batch, microbatched like the probe: the
floor), literal (the seed's Plan A schedule), fused (two backwards per unit), fused_cpu (fused with
probe.accumulate_on=cpu), one_backward (packed with one unit per forward), packed (the default: k units
per forward and one backward), packed_host / packed_none (packed with probe.bank=host / none). A row
may name its microbatch in sequences: `step@64,packed@64,fused@8` (default --microbatch); every ratio
is taken against the step at the same microbatch and against the fastest step row of the run
("the step at its best microbatch").

    python bench/probe_bench.py --preset qwen2.5-1.5b --prompts 64 --repeats 1 --warmup-prompts 8 \
        --rows step@8,step@64,packed@64,fused@8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradprobe as gp  # noqa: E402
from gradprobe.config import Config, ProbeSection  # noqa: E402
from gradprobe.optim.precondition import Preconditioner, from_adam_state  # noqa: E402
from gradprobe.probe.engine import _Engine, plan_chunks, run_probe, units_of  # noqa: E402
from gradprobe.rollouts import Batch, Group  # noqa: E402

LR = 1e-5


def synthetic_batch(vocab: int, prompts: int, group: int, prompt_len: int, response_len: int,
                    seed: int = 0, response_len_min: int | None = None) -> Batch:
    """Random prompts and responses with random rewards: teacher forcing only. Responses have response_len
    tokens, or a length drawn uniformly from [response_len_min, response_len] (as EOS would cut them)."""
    g = torch.Generator().manual_seed(seed)
    lo = response_len if response_len_min is None else response_len_min
    groups = []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        lengths = [response_len] * group if lo == response_len else \
            torch.randint(lo, response_len + 1, (group,), generator=g).tolist()  # fixed: the recorded stream
        responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        groups.append(Group(prompt, responses, torch.randn(group, generator=g).tolist()))
    return Batch(groups, meta={"source": "synthetic"})


def synthetic_adam(stack, seed: int = 0) -> Preconditioner:
    """A preconditioner read through the real Adam-state path, from positive random second moments."""
    g = torch.Generator().manual_seed(seed)
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(p.shape),
                 "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6 + 1e-8}
             for i, p in enumerate(stack.params)}
    groups = [{"params": list(range(len(stack.params))), "lr": LR, "betas": (0.9, 0.999), "eps": 1e-8}]
    return from_adam_state({"state": state, "param_groups": groups}, stack.names, stack.params, "synthetic")


def set_checkpointing(stack, mode: str) -> None:
    """Switch activation checkpointing on the loaded model (the probe's numbers do not depend on it)."""
    base = stack.model.get_base_model()
    base.gradient_checkpointing_disable()
    if mode != "off":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    stack.checkpointing = mode


def set_precision(stack, precision: str) -> None:
    """bf16: autocast and bf16 4-bit compute, as loaded. fp32: no autocast, 4-bit weights dequantised to
    fp32 (a reference for what bf16 rounding does to the estimate)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    stack.autocast_dtype = None if precision == "fp32" else torch.bfloat16
    for module in stack.model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype


def training_step(stack, batch: Batch, probe_cfg: ProbeSection) -> None:
    """What a trainer does before optimizer.step(): backward of the Y loss over the batch into .grad."""
    units = units_of(batch, probe_cfg.mode, probe_cfg.block_size)
    eng = _Engine(stack, batch, probe_cfg, {p: u for u, ps in enumerate(units) for p in ps},
                  [len(ps) for ps in units])
    chunks = plan_chunks(list(range(batch.B)), eng.group_sizes, eng.mb)
    eng.prepare(chunks)
    stack.model.zero_grad(set_to_none=True)
    for chunk in chunks:
        s = eng.forward(chunk)
        _, wy = eng.weights(chunk, s)
        (s * wy).sum().backward()  # accumulates into .grad across microbatches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(stack, fns: list, warmup: int, repeats: int) -> list[tuple[list[float], int, Any]]:
    """Wall times of every fn, interleaved (A B C A B C ...) so that a drift in the host's speed falls on
    all rows alike; the largest peak memory over each fn's timed calls."""
    dev = stack.device
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    peaks = [0] * len(fns)
    outs: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            stack.model.zero_grad(set_to_none=True)
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            outs[i] = fn()
            sync(dev)
            times[i].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(dev))
    stack.model.zero_grad(set_to_none=True)
    return list(zip(times, peaks, outs))


def probe_cfg_for(schedule: str, microbatch: int, accumulate_on: str = "device", bank: str = "auto") -> ProbeSection:
    return Config().with_values({"probe.schedule": schedule, "probe.microbatch_size": microbatch,
                                 "probe.accumulate_on": accumulate_on, "probe.bank": bank}).probe


def split_row(row: str, default_mb: int) -> tuple[str, int]:
    """'packed@64' -> ('packed', 64); 'fused' -> ('fused', default_mb)."""
    name, _, mb = row.partition("@")
    return name, int(mb) if mb else default_mb


def row_fns(stack, batch: Batch, rows: list[str], args, precond: Preconditioner) -> list:
    fns = []
    for row in rows:
        name, mb = split_row(row, args.microbatch)
        if name == "step":
            pcfg = probe_cfg_for("fused", mb)
            fns.append(lambda pcfg=pcfg: training_step(stack, batch, pcfg))
        else:
            schedule, acc, bank = {"fused_cpu": ("fused", "cpu", "auto"), "packed_host": ("packed", "device", "host"),
                                   "packed_none": ("packed", "device", "none")}.get(name, (name, "device", "auto"))
            pcfg = probe_cfg_for(schedule, mb, acc, bank)
            fns.append(lambda pcfg=pcfg: run_probe(stack, batch, pcfg, precond, LR))
    return fns


def run_rows(stack, batch: Batch, rows: list[str], args, precond: Preconditioner, label: str,
             warm_batch: Batch | None = None) -> list[dict]:
    """warm_batch: warm every row up once on this (small) batch instead of args.warmup calls on batch."""
    results = []
    tokens = sum(len(g.prompt) + len(r) for g in batch.groups for r in g.responses)
    if warm_batch is not None:
        for fn in row_fns(stack, warm_batch, rows, args, precond):
            fn()
    fns = row_fns(stack, batch, rows, args, precond)
    warmup = 0 if warm_batch is not None else args.warmup
    for row, (times, peak, out) in zip(rows, timed_interleaved(stack, fns, warmup, args.repeats)):
        med = statistics.median(times)
        rec = {"label": label, "row": row, "preset": args.preset, "checkpointing": stack.checkpointing,
               "B": batch.B, "G": batch.G, "microbatch": split_row(row, args.microbatch)[1], "tokens": tokens,
               "times_s": times, "median_s": med, "per_unit_s": med / batch.B, "tokens_per_s": tokens / med,
               "peak_bytes": peak, "n_params": stack.n_params}
        if out is not None:
            rec.update(deltaH1=out.deltaH1, se=out.se, se_jackknife=out.se_jackknife, U_cross=out.U_cross,
                       forwards=out.forwards, backwards=out.backwards, x_nonnull=out.x_nonnull,
                       y_nonnull=out.y_nonnull, n_tensors=out.n_tensors, se_unbiased=out.se_unbiased,
                       notes=out.notes)
        print(json.dumps({k: v for k, v in rec.items() if k != "times_s"}), flush=True)
        results.append(rec)
    return results


def compare(rows: list[dict]) -> dict[str, Any]:
    """The targets of the benchmark, from rows measured side by side: every probe row against the step at
    its own microbatch, the fastest step row (the step at its best microbatch), fused and literal."""
    by = {r["row"]: r for r in rows}
    steps = [r for r in rows if r["row"].partition("@")[0] == "step"]
    best = min(steps, key=lambda r: r["median_s"]) if steps else None
    fused = next((r for r in rows if r["row"].partition("@")[0] == "fused"), None)
    lit = next((r for r in rows if r["row"].partition("@")[0] == "literal"), None)
    out: dict[str, Any] = {}
    if best:
        out["best_step"] = best["row"]
    for row in rows:
        name = row["row"]
        if name.partition("@")[0] in ("step", "literal"):
            continue
        step = by.get(f"step@{row['microbatch']}") or next(
            (s for s in steps if s["microbatch"] == row["microbatch"]), None)
        if lit:
            out[f"{name}_over_literal"] = row["median_s"] / lit["median_s"]
            out[f"{name}_deltaH1_rel_diff"] = abs(row["deltaH1"] - lit["deltaH1"]) / abs(lit["deltaH1"])
            out[f"{name}_se_rel_diff"] = abs(row["se"] - lit["se"]) / abs(lit["se"])
        if fused and row is not fused:
            out[f"{name}_speedup_over_fused"] = fused["median_s"] / row["median_s"]
            out[f"{name}_deltaH1_rel_diff_fused"] = abs(row["deltaH1"] - fused["deltaH1"]) / abs(fused["deltaH1"])
        if best:
            out[f"{name}_over_best_step"] = row["median_s"] / best["median_s"]
        if step:
            out[f"{name}_over_step_same_mb"] = row["median_s"] / step["median_s"]
            if step["peak_bytes"]:
                out[f"{name}_peak_over_step"] = row["peak_bytes"] / step["peak_bytes"]
                out[f"{name}_extra_peak_in_trainable_fp32"] = (row["peak_bytes"] - step["peak_bytes"]) / (
                    4 * row["n_params"])
    return out


def profile_fused(stack, batch: Batch, args, precond: Preconditioner, path: Path) -> None:
    """torch.profiler over one call of the --profile-row schedule (after a warm-up): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    name, mb = split_row(args.profile_row, args.microbatch)
    pcfg = probe_cfg_for(name, mb)
    run_probe(stack, batch, pcfg, precond, LR)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stack.device.type == "cuda" else [])
    sync(stack.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_probe(stack, batch, pcfg, precond, LR)
        sync(stack.device)
    wall = time.perf_counter() - t0
    key = "cuda_time_total" if stack.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    head = f"# {args.profile_row}, {stack.checkpointing}, B={batch.B}: wall {wall:.3f} s (profiled)\n"
    path.write_text(head + table)
    print(head + table[:6000], flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b", choices=["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpointing", default="reentrant,non_reentrant")
    ap.add_argument("--rows", default="step,literal,fused")
    ap.add_argument("--prompts", type=int, default=4, help="B for the timed rows")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-prompts", type=int, default=0, help="warm each timed row up once at this B instead")
    ap.add_argument("--precondition", default="adam", choices=["adam", "identity"])
    ap.add_argument("--full", type=int, default=0, help="also run literal and fused once at this B (agreement)")
    ap.add_argument("--full-rows", default="fused,literal")
    ap.add_argument("--full-precision", default="bf16", help="bf16 and/or fp32 (no autocast, fp32 compute)")
    ap.add_argument("--full-checkpointing", default="reentrant,non_reentrant")
    ap.add_argument("--sweep", default="", help="comma-separated B values: step and fused, 1 repeat each")
    ap.add_argument("--no-checkpointing-rows", action="store_true", help="also time step and fused with it off")
    ap.add_argument("--sweep-rows", default="step,fused")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of one call here")
    ap.add_argument("--profile-row", default="fused", help="the row to profile, e.g. packed@64")
    ap.add_argument("--json", default="", help="write all rows here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg = gp.load_config(overrides=[f"model.preset={args.preset}", f"device={args.device}",
                                    f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}"])
    stack = gp.load_stack(cfg)
    sync(stack.device)
    load_s = time.perf_counter() - t0
    dev = stack.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    header = {"preset": args.preset, "gpu": gpu, "torch": torch.__version__, "load_stack_s": load_s,
              "n_params": stack.n_params, "n_tensors": len(stack.params), "argv": sys.argv}
    print(json.dumps(header), flush=True)
    precond = synthetic_adam(stack) if args.precondition == "adam" else Preconditioner(None)
    vocab = stack.model.get_input_embeddings().num_embeddings

    def batch_of(b: int) -> Batch:
        return synthetic_batch(vocab, b, args.group, args.prompt_len, args.response_len)

    rows: list[dict] = []
    summary: dict[str, Any] = {}
    rownames = [r for r in args.rows.split(",") if r]
    for mode in [m for m in args.checkpointing.split(",") if m]:
        set_checkpointing(stack, mode)
        warm = batch_of(args.warmup_prompts) if args.warmup_prompts else None
        got = run_rows(stack, batch_of(args.prompts), rownames, args, precond, "timed", warm)
        rows += got
        summary[f"timed/{mode}"] = compare(got)
        print(json.dumps({f"timed/{mode}": summary[f"timed/{mode}"]}), flush=True)
    if args.no_checkpointing_rows:  # what the second recomputation costs: step and fused with checkpointing off
        set_checkpointing(stack, "off")
        got = run_rows(stack, batch_of(args.prompts), ["step", "fused", "one_backward"], args, precond, "timed")
        rows += got
        summary["timed/off"] = compare(got)
        print(json.dumps({"timed/off": summary["timed/off"]}), flush=True)
    if args.profile:
        set_checkpointing(stack, args.checkpointing.split(",")[0])
        profile_fused(stack, batch_of(args.prompts), args, precond, Path(args.profile))
    for precision in [p for p in args.full_precision.split(",") if p and args.full]:
        set_precision(stack, precision)
        for mode in [m for m in args.full_checkpointing.split(",") if m]:
            set_checkpointing(stack, mode)
            once = argparse.Namespace(**{**vars(args), "warmup": 0, "repeats": 1})
            label = "full" if precision == "bf16" else "full-fp32"
            got = run_rows(stack, batch_of(args.full), args.full_rows.split(","), once, precond, label)
            rows += got
            summary[f"{label}/{mode}"] = compare(got)
            print(json.dumps({f"{label}/{mode}": summary[f"{label}/{mode}"]}), flush=True)
        set_precision(stack, "bf16")
    if args.sweep:
        set_checkpointing(stack, args.checkpointing.split(",")[0])
        once = argparse.Namespace(**{**vars(args), "warmup": 0, "repeats": 1})
        for b in [int(x) for x in args.sweep.split(",")]:
            rows += run_rows(stack, batch_of(b), args.sweep_rows.split(","), once, precond, "sweep")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "summary": summary}, indent=1))
    print(markdown(rows), flush=True)
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| label | ckpt | row | B | median s | s/unit | tokens/s | peak GiB | deltaH1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dh = f"{r['deltaH1']:.6e}" if "deltaH1" in r else ""
        lines.append(f"| {r['label']} | {r['checkpointing']} | {r['row']} | {r['B']} | {r['median_s']:.3f} | "
                     f"{r['per_unit_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**30:.2f} | {dh} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

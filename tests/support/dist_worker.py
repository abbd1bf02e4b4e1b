"""One rank of a torch.distributed (gloo) launch on the tiny stack, for tests/probe/test_distributed.py: the same
probe runs as in the test's own process, and rank 0 saves what it got."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

FP32 = ["autocast=off", "quant.compute_dtype=float32"]
SCHEDULES = ("packed", "fused")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, timeout: float = 300.0) -> tuple[list[int | None], float]:
    """Run target(rank, world, port, *args) in `world` spawned processes and wait for all, ending any that hang
    past `timeout` (the caller's test then fails on its exit code); (exit codes, seconds)."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - t0)))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes, time.monotonic() - t0


def config(rollouts: str, optimizer_state: str, schedule: str) -> dict:
    import gradprobe as gp

    return gp.load_config(overrides=[*FP32, "checkpointing=reentrant", f"batch.rollouts={rollouts}",
                                     "probe.precondition=adam", f"probe.optimizer_state={optimizer_state}",
                                     f"probe.schedule={schedule}", "probe.microbatch_size=8"])


def sample(stack, prompts: int = 7, tokens: int = 10):
    """B = 7 prompts, G = 4: a batch that neither 2 nor 3 processes divide."""
    import gradprobe as gp

    return gp.build_batch(stack, gp.load_config(overrides=[*FP32, f"batch.num_prompts={prompts}", "batch.group_size=4",
                                                           f"batch.max_new_tokens={tokens}"]))


def cases(stack, rollouts: str, optimizer_state: str) -> dict:
    """{schedule: ProbeResult.to_dict()} of the probe with the real step (the optimizer state has momentum),
    and "sampled": the groups that generation gives."""
    import gradprobe as gp

    # 20 prompts: three generate() calls (8, 8, 4 prompts) for the ranks to share
    out: dict = {"sampled": [(g.prompt, g.responses, g.rewards) for g in sample(stack, 20, 6).groups]}
    for schedule in SCHEDULES:
        cfg = config(rollouts, optimizer_state, schedule)
        out[schedule] = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg).to_dict()
    cfg = config(rollouts, optimizer_state, "packed")
    cfg = cfg.with_values({"probe.bank": "none"})  # no bank: partial sums and a second pass of directional derivatives
    out["packed, no bank"] = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg).to_dict()
    return out


def worker(rank: int, world: int, port: int, rollouts: str, optimizer_state: str, out: str,
           fail_rank: int = -1, oom: bool = False) -> None:
    """Rank `rank` of `world`; rank `fail_rank` raises inside its first forward (torch's out-of-memory error
    with `oom`, as a device that ran out of memory raises it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    os.environ.setdefault("GRADPROBE_DIST_TIMEOUT", "60")
    import torch

    torch.set_num_threads(1)
    import gradprobe as gp
    from gradprobe import distributed
    from gradprobe.probe import engine

    assert distributed.init() and distributed.world_size() == world
    try:
        stack = gp.load_stack(config(rollouts, optimizer_state, "packed"))
        if rank == fail_rank:
            def broken(self, chunk):
                if oom:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                raise RuntimeError("injected failure in a forward")
            engine._Engine.forward = broken
        result = cases(stack, rollouts, optimizer_state)
        if distributed.is_main():
            torch.save(result, Path(out) / f"world{world}.pt")
    except BaseException as exc:
        if distributed.is_main() or os.environ.get("DIST_WORKER_ALL_ERRORS"):
            (Path(out) / f"world{world}.{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n"
                                                            f"{traceback.format_exc()}")
        distributed.shutdown(finished=False)
        raise SystemExit(1) from None
    distributed.shutdown()

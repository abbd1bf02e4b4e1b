"""Data parallelism under torch.distributed (gloo on CPU, as CI runs it): 2 and 3 processes on the tiny stack give
the one-process numbers (every estimate and SE, packed and fused, the real step with momentum, B = 7 units that
neither world size divides), generation is sharded without changing the batch, and a failing rank ends the job
with one line naming it. The launches spawn real processes (tests/support/dist_worker.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradprobe as gp
from gradprobe import distributed
from gradprobe.errors import GradprobeError
from gradprobe.probe.engine import forward_starts, units_of
from tests.probe.test_probe_exact import adam_state
from tests.support import dist_worker

# measurements, not estimates: they differ between runs of one process too
NOT_ESTIMATES = {"seconds", "timings", "peak_memory_bytes", "peak_memory_kind", "notes", "world_size",
                 "units_per_rank"}


def test_split_cuts_where_one_process_starts_a_forward():
    # B = 7, two units per forward: forwards start at units 0, 2, 4, 6
    assert distributed.split(7, 2, [2, 4, 6]) == ([0, 4, 7], True)
    assert distributed.split(7, 3, [2, 4, 6]) == ([0, 2, 4, 7], True)
    assert distributed.split(7, 4, [2, 4, 6]) == ([0, 2, 4, 6, 7], True)
    # more ranks than forwards: an even split, and the packing then differs from one process
    assert distributed.split(7, 5, [2, 4, 6]) == ([0, 1, 2, 4, 5, 7], False)
    assert distributed.split(5, 2, range(1, 5)) == ([0, 2, 5], True)


def test_more_processes_than_units_is_refused():
    with pytest.raises(GradprobeError, match="4 processes for 3 units: .*at most 3 processes"):
        distributed.split(3, 4, [1, 2])


def test_forward_starts_follow_the_one_process_packing(fp32_stacks, rollouts_file):
    cfg = gp.load_config(overrides=[f"batch.rollouts={rollouts_file}"])
    batch = gp.build_batch(fp32_stacks["reentrant"], cfg)  # B = 6, G = 4
    units = units_of(batch, "exact", 1)
    sizes = [len(g.responses) for g in batch.groups]
    assert forward_starts(units, sizes, 8, "packed") == [0, 2, 4]  # 2 units per forward
    assert forward_starts(units, sizes, 12, "packed") == [0, 3]
    assert forward_starts(units, sizes, 8, "fused") == [1, 2, 3, 4, 5]  # one unit each


def launch(world: int, out, rollouts: str, optimizer_state: str, fail_rank: int = -1, oom: bool = False,
           timeout: float = 300.0) -> tuple[list[int | None], float]:
    """Start `world` ranks (spawned processes, gloo), wait for all; (exit codes, seconds)."""
    return dist_worker.spawn_ranks(dist_worker.worker, world, rollouts, optimizer_state, str(out), fail_rank, oom,
                                   timeout=timeout)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The batch (B = 7, G = 4), a real AdamW state (momentum non-zero) and the one-process results."""
    out = tmp_path_factory.mktemp("dist")
    rollouts, opt = str(out / "batch.jsonl"), str(out / "optimizer.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the CPU kernels' rounding depends on the thread count
    try:
        cfg = dist_worker.config(rollouts, opt, "packed")
        stack = gp.load_stack(cfg)
        gp.write_rollouts(dist_worker.sample(stack), rollouts)
        adam_state(stack, opt)
        single = dist_worker.cases(stack, rollouts, opt)
    finally:
        torch.set_num_threads(threads)
    return out, rollouts, opt, single


def compare(one, many, path: str = "") -> int:
    """Every number of the one-process result against the distributed one (relative 1e-6); returns how many."""
    if isinstance(one, dict):
        return sum(compare(v, many[k], f"{path}.{k}") for k, v in one.items() if k not in NOT_ESTIMATES)
    if isinstance(one, list):
        assert len(one) == len(many), path
        return sum(compare(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(one, many)))
    if isinstance(one, float):
        assert (math.isnan(one) and math.isnan(many)) or many == pytest.approx(one, rel=1e-6, abs=1e-300), path
        return 1
    assert one == many, path
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_one_process_numbers(job, world):
    out, rollouts, opt, single = job
    codes, seconds = launch(world, out, rollouts, opt)
    assert codes == [0] * world, (out / f"world{world}.0.error").read_text() if codes[0] else codes
    many = torch.load(out / f"world{world}.pt")
    assert many["sampled"] == single["sampled"]  # generation sharded by calls: the same batch
    for schedule in dist_worker.SCHEDULES:
        one, dist = single[schedule], many[schedule]
        assert dist["world_size"] == world and sum(dist["units_per_rank"]) == one["B"] == 7
        assert len(dist["units_per_rank"]) == world and min(dist["units_per_rank"]) >= 1
        assert dist["schedule"] == schedule and math.isfinite(dist["deltaH"])
        assert abs(dist["parts"]["momentum"]["value"]) > 0  # the optimizer state carries momentum
        for key in ("deltaH1", "U_cross", "deltaH", "se", "se_jackknife", "se_unbiased", "se_deltaH",
                    "se_deltaH_batches"):
            assert math.isfinite(one[key]) and dist[key] == pytest.approx(one[key], rel=1e-6), (schedule, key)
        for part in ("fresh", "momentum", "weight_decay"):
            assert dist["parts"][part]["se"] == pytest.approx(one["parts"][part]["se"], rel=1e-6), (schedule, part)
        assert compare(one, dist) > 40  # and every other number of the result (55 here)
        assert dist["forwards"] == one["forwards"] and dist["tokens"] == one["tokens"]
    # without a bank the ranks' partial sums are added (fp32 rounding in another order): close, not bit for bit
    one, dist = single["packed, no bank"], many["packed, no bank"]
    assert math.isnan(dist["se_unbiased"]) and dist["world_size"] == world
    for key in ("deltaH1", "U_cross", "se", "se_jackknife"):
        assert dist[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("oom", [False, True], ids=["raises", "out of memory"])
def test_a_failing_rank_ends_the_job_naming_it(job, monkeypatch, oom):
    """Rank 1 raises in its first forward; rank 0 (still computing) stops at the reductions with one line
    naming it: an out-of-memory error stays one (MemoryError: the CLI's exit 5 with the microbatch to try)."""
    out, rollouts, opt, _ = job
    monkeypatch.setenv("GRADPROBE_DIST_TIMEOUT", "30")
    (out / "world2.0.error").unlink(missing_ok=True)
    codes, seconds = launch(2, out, rollouts, opt, fail_rank=1, oom=oom, timeout=120)
    assert all(c not in (0, None) for c in codes), codes  # every rank exits, none with success
    first = (out / "world2.0.error").read_text().splitlines()[0]
    assert first == ("MemoryError: rank 1 failed during the probe: CUDA out of memory. Tried to allocate 2.00 GiB"
                     if oom else "RankFailed: rank 1 failed during the probe: RuntimeError: injected failure in a "
                                 "forward"), first
    assert seconds < 120


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m gradprobe ARGS` on the CPU (gloo), from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "CUDA_VISIBLE_DEVICES": "",
           "GRADPROBE_DIST_TIMEOUT": "120", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "gradprobe", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_cli_under_torchrun_rank0_alone_reports_the_one_process_numbers(job):
    """The whole command under torchrun: a warm-up step (sampled over the ranks, its model and AdamW state
    then rank 0's on every rank) drives the real step; one report, one JSON, the one-process numbers."""
    out, rollouts, _, _ = job
    sets = [*dist_worker.FP32, "probe.warmup_steps=1", "batch.num_prompts=12", "batch.max_new_tokens=8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = gp.run_delta_h1(gp.load_config(overrides=[*sets, f"batch.rollouts={rollouts}"])).to_dict()
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(2, "delta-h1", "--rollouts", rollouts, *[x for s in sets for x in ("--set", s)],
                    "--json", str(out / "cli.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("the next optimizer step") == 1  # one report: rank 0's
    result = json.loads((out / "cli.json").read_text())["result"]
    assert result["world_size"] == 2 and result["units_per_rank"] == [4, 3] and result["warmup_steps"] == 1
    assert abs(one["parts"]["momentum"]["value"]) > 0
    for key in ("deltaH", "deltaH1", "se_deltaH", "se_unbiased", "se_deltaH_batches"):
        assert result[key] == pytest.approx(one[key], rel=1e-6), key


@pytest.mark.slow
def test_cli_refuses_more_processes_than_units_before_loading(job, tmp_path):
    _, rollouts, _, _ = job
    two = tmp_path / "two.jsonl"
    two.write_text("".join(Path(rollouts).read_text().splitlines(keepends=True)[:2]))
    proc = torchrun(3, "delta-h1", "--rollouts", str(two))
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # each rank's exit code, in torchrun's summary
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: 3 processes for 2 units: every rank needs at least one unit; launch at most 2 "
                     "processes (torchrun --nproc-per-node) or probe more prompts"]

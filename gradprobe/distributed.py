"""Data parallelism over units with torch.distributed (launched by torchrun): the one home of the plumbing.

Each rank loads the same stack, holds the whole batch (a rollouts file is parsed on every rank; generation
is sharded by prompt and gathered) and computes the per-unit gradients of its contiguous share of the units.
The reductions reproduce the one-process numbers (docs/distributed.md):
  - sums of X[u] and Y[u]: an ordered reduction. Rank r adds its banked rows, in unit order, onto the fp32
    sum of ranks < r, so the sum is bit for bit the one a single process accumulates;
  - per-unit scalars (X[u].Y[u] per tensor, directional derivatives): gathered (zero-padded all-reduce: exact);
  - the cross matrix K[u, v] = X[u].Y[v]: a ring exchange of the banks' Y rows in column slabs, each rank
    forming the rows of its own units; only the B x B scalars are gathered.
Failures: every reduction opens with a status exchange (sync); a rank whose local work raised joins it with
its error, so the others stop with a message naming that rank. Collectives time out after
GRADPROBE_DIST_TIMEOUT seconds (default 1800): a rank that died or hangs ends the job instead of blocking it.
With no process group (no torchrun) nothing here runs and nothing changes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import GradprobeError, is_out_of_memory

TIMEOUT_ENV = "GRADPROBE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
SLAB_BYTES = 256 << 20  # one message of the ring exchange: bounded, so a host bank never needs a device copy


NO_RESUME = "--state and --resume keep one process's units: run a resumable probe without torchrun"


class RankFailed(RuntimeError):
    """Another rank's local work raised (its message is in this one), or a collective failed or timed out."""


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 alone prints and writes (torchrun's RANK decides before the group is joined)."""
    if active():
        return dist.get_rank() == 0
    return not launched() or int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Started by torchrun (or a SLURM script that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_units(units: int) -> None:
    """Refuse, before any model loads, a launch with more processes than units."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > units:
        split(units, world, [])


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise GradprobeError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise GradprobeError(f"{TIMEOUT_ENV} must be > 0 seconds; got {raw}")
    return value


def init() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK):
    NCCL when CUDA is visible (each rank on the GPU LOCAL_RANK names), else gloo. Returns whether a group of
    more than one rank is active. Without torchrun's variables: nothing, False."""
    if active():
        return True
    if not launched() or not dist.is_available():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise GradprobeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
                             f"torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT per process")
    backend = "gloo"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise GradprobeError(f"LOCAL_RANK={local} but {torch.cuda.device_count()} CUDA device(s) are visible: "
                                 f"use at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return active()


def shutdown(finished: bool = True) -> None:
    """Leave the process group. A rank that finished first waits for the others at a barrier (bounded by the
    group's timeout), so that no rank tears its connections down while a peer still uses them: gloo aborts
    that peer's process otherwise. After a failure there is nobody to wait for."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished and active():
        with contextlib.suppress(Exception):
            dist.barrier()
    dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- failures ------------------------------------------------------------------------------------------------

_synced = [False]  # set by sync() inside a guard: a later error is past the status exchange


def _kind(exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return "oom"
    return "input" if isinstance(exc, GradprobeError) else "error"


def _exchange(stage: str, exc: BaseException | None, value: Any = None) -> list[Any]:
    """Every rank's status and value (one all_gather_object: a failing rank's report meets whichever
    exchange the others are in); raise on every healthy rank when one failed, naming the first that did."""
    mine = (None, value) if exc is None else (
        (_kind(exc), f"{type(exc).__name__}: " if _kind(exc) == "error" else "",
         (str(exc).strip().splitlines() or [""])[0][:300], stage), None)
    got: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(got, mine)
    except Exception as err:  # a peer died or hangs past the timeout
        _synced[0] = True  # nobody is left to tell
        raise RankFailed(f"rank {rank()}: the status exchange before {stage} failed: "
                         f"{(str(err).strip().splitlines() or [''])[0][:200]} (another rank exited or hung; "
                         f"its log says why)") from None
    failed = [(r, st) for r, (st, _) in enumerate(got) if st is not None]
    if not failed or exc is not None:
        return [v for _, v in got]
    _synced[0] = True  # the failure is known to every rank: no guard reports it again
    r, (kind, prefix, text, where) = failed[0]
    others = f" (and rank(s) {', '.join(str(f[0]) for f in failed[1:])})" if len(failed) > 1 else ""
    message = f"rank {r} failed during {where}{others}: {prefix}{text}"
    if kind == "oom":
        raise MemoryError(message)  # out of memory: the CLI's exit 5 with the microbatch to try
    if kind == "input":
        raise GradprobeError(message)
    raise RankFailed(message)


def sync(stage: str) -> None:
    """The status exchange that opens a reduction: raises when another rank's local work failed."""
    if not active():
        return
    _exchange(stage, None)
    _synced[0] = True


def exchange(stage: str, value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order, from inside local work (a guard): raises when another
    rank failed. Small things only (a batch's token ids and rewards, a choice that all ranks must share)."""
    if not active():
        return [value]
    return _exchange(stage, None, value)


@contextmanager
def guard(stage: str) -> Iterator[None]:
    """Local work whose failure the other ranks must hear of: an exception before this rank's next sync()
    joins that exchange with the error (so the others stop naming this rank), then propagates."""
    if not active():
        yield
        return
    _synced[0] = False
    try:
        yield
    except BaseException as exc:
        if not _synced[0]:
            _synced[0] = True
            with suppress(RankFailed):  # the peers are gone too: this rank's own error says more
                _exchange(stage, exc)
        raise


def _collective(stage: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:
        raise RankFailed(f"rank {rank()}: {stage} failed: {(str(err).strip().splitlines() or [''])[0][:200]} "
                         f"(another rank exited or hung past {TIMEOUT_ENV}={timeout_s():g} s)") from None


# ---- the split of units --------------------------------------------------------------------------------------

@dataclass
class Shard:
    """This rank's contiguous share [lo, hi) of m units; starts[r] is rank r's first unit (starts[-1] = m)."""

    rank: int
    world: int
    starts: list[int]
    aligned: bool  # every rank's forwards are the ones one process runs (the sums are then bit for bit)

    @property
    def lo(self) -> int:
        return self.starts[self.rank]

    @property
    def hi(self) -> int:
        return self.starts[self.rank + 1]

    @property
    def m(self) -> int:
        return self.starts[-1]

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def split(m: int, world: int, cuts: Sequence[int]) -> tuple[list[int], bool]:
    """Rank boundaries over m units: from `cuts` (units at which a forward of the one-process run starts)
    the ones nearest to an even split, else (too few cuts) the even split itself. Returns (starts, aligned)."""
    if world > m:
        raise GradprobeError(f"{world} processes for {m} units: every rank needs at least one unit; launch at most "
                             f"{m} processes (torchrun --nproc-per-node) or probe more prompts")
    cuts = sorted(set(c for c in cuts if 0 < c < m))
    if len(cuts) < world - 1:
        return [r * m // world for r in range(world)] + [m], False
    starts, lo = [0], 0
    for r in range(1, world):
        room = cuts[lo:len(cuts) - (world - 1 - r)]  # leave a cut for every rank after this one
        best = min(range(len(room)), key=lambda i: abs(room[i] - r * m / world))
        starts.append(room[best])
        lo += best + 1
    return starts + [m], True


# ---- reductions ----------------------------------------------------------------------------------------------

def all_reduce(t: torch.Tensor, op: str = "sum", stage: str = "a reduction") -> torch.Tensor:
    """t reduced over ranks (sum, min or max), on t's device."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    buf = t.to(_comm_device()).clone()
    _collective(stage, lambda: dist.all_reduce(buf, ops[op]))
    return buf.to(t.device)


def gather_rows(t: torch.Tensor, shard: Shard, stage: str = "gathering per-unit values") -> torch.Tensor:
    """[m_local, ...] rows of this rank's units -> [m, ...] on every rank. Zero padding and a sum: exact."""
    full = torch.zeros((shard.m, *t.shape[1:]), dtype=t.dtype, device=_comm_device())
    full[shard.lo:shard.hi] = t.to(full.device)
    _collective(stage, lambda: dist.all_reduce(full))
    return full.to(t.device)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0, stage: str = "a broadcast") -> None:
    """Overwrite every rank's tensors with rank src's, in place (one model and one optimizer state on every
    rank, whatever the rounding of nondeterministic kernels in work that every rank repeated)."""
    dev = _comm_device()
    for t in tensors:
        buf = t.detach().to(dev)
        _collective(stage, lambda buf=buf: dist.broadcast(buf, src))
        if buf.data_ptr() != t.data_ptr():
            t.detach().copy_(buf)


def ordered_sums(rows: Sequence[torch.Tensor], partial: Sequence[torch.Tensor], shard: Shard
                 ) -> list[torch.Tensor]:
    """The sums over all units of k row banks, added in unit order as one process adds them.
    rows[i]: [m_local, n] (this rank's banked rows, in unit order), or empty (no bank: then `partial[i]`,
    this rank's own sum, is added at once and the fp32 rounding differs from one process's in order only).
    Rank r receives the sum of ranks < r, adds its rows one by one, sends it on; the last rank broadcasts."""
    dev = _comm_device()
    where = partial[0].device
    n = partial[0].numel()
    acc = torch.zeros(len(partial), n, device=where)
    r, w = shard.rank, shard.world
    if r > 0:
        buf = torch.empty(len(partial), n, device=dev)
        _collective("the ordered sum of X and Y", lambda: dist.recv(buf, r - 1))
        acc.copy_(buf)
    for i, (bank, own) in enumerate(zip(rows, partial)):
        if bank.numel():
            for row in bank:
                acc[i].add_(row.to(where))
        else:
            acc[i].add_(own)
    if r < w - 1:
        buf = acc.to(dev)
        _collective("the ordered sum of X and Y", lambda: dist.send(buf, r + 1))
    buf = acc.to(dev) if r == w - 1 else torch.empty(len(partial), n, device=dev)
    _collective("the ordered sum of X and Y", lambda: dist.broadcast(buf, w - 1))
    acc.copy_(buf)
    return list(acc)


def placed(rows: torch.Tensor, shard: Shard, owner: int) -> torch.Tensor:
    """rows of rank `owner`'s units at their places in an [m, ...] zero matrix. A CPU fp32 matrix product
    rounds an entry differently in another shape (blocking); in the one-process shape it is bit for bit."""
    out = rows.new_zeros((shard.m, *rows.shape[1:]))
    out[shard.starts[owner]:shard.starts[owner + 1]] = rows
    return out


def rows_dot(a: torch.Tensor, w: torch.Tensor, shard: Shard,
             cross: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """cross(a, w) for this rank's rows a [m_local, n] against a few fixed vectors w [k, n], gathered to
    [m, k] (fp64, CPU) on every rank."""
    if a.is_cuda:  # fp64 products (FlatLayout.cross_dots): no fp32 blocking to match
        return gather_rows(cross(a, w).cpu(), shard, "gathering per-unit dots")
    return gather_rows(cross(placed(a, shard, shard.rank), w)[shard.lo:shard.hi].cpu(), shard,
                       "gathering per-unit dots")


def ring_cross(a: torch.Tensor, b: torch.Tensor, shard: Shard,
               cross: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """K[u, v] = a[u].b[v] (fp64 [m, m], CPU, on every rank) for the rows a, b [m_local, n] of every rank's
    units, never holding another rank's whole bank: in column slabs (SLAB_BYTES per message), each rank's b
    slab travels the ring once and every rank forms its own rows K[lo:hi, :] from it; the m x m scalars are
    then gathered. `cross(a_cols, b_cols)` is the dot kernel (FlatLayout.cross_dots on a slab). On the CPU
    the products run in the one-process shape (placed(): zero rows elsewhere), bit for bit its entries, at
    `world` times its multiply work per rank; on CUDA they are fp64 (exact whatever the shape)."""
    dev, where = _comm_device(), a.device
    r, w, starts = shard.rank, shard.world, shard.starts
    n = a.shape[1]
    step = max(1, SLAB_BYTES // (4 * max(shard.counts)))
    for grain in (1 << 20, 8192):  # whole slabs of cross_dots on CUDA and CPU: the fp64 sums keep their order
        if step >= grain:
            step -= step % grain
            break
    k = torch.zeros(shard.m, shard.m, dtype=torch.float64)
    for s in range(0, n, step):
        cur, owner = b[:, s:s + step], r
        mine = a[:, s:s + step] if a.is_cuda else placed(a[:, s:s + step], shard, r)
        for hop in range(w):
            if a.is_cuda:
                block = cross(mine, cur)
            else:
                block = cross(mine, placed(cur, shard, owner))[shard.lo:shard.hi, starts[owner]:starts[owner + 1]]
            k[shard.lo:shard.hi, starts[owner]:starts[owner + 1]] += block.cpu()
            if hop == w - 1:
                break
            src = (owner - 1) % w
            recv = torch.empty(starts[src + 1] - starts[src], cur.shape[1], device=dev)
            send = cur.to(dev).contiguous()
            ops = [dist.P2POp(dist.isend, send, (r + 1) % w), dist.P2POp(dist.irecv, recv, (r - 1) % w)]

            def exchange(ops=ops) -> None:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()

            _collective("the ring exchange for the cross matrix", exchange)
            cur, owner = recv.to(where), src
    return gather_rows(k[shard.lo:shard.hi], shard, "gathering the cross matrix")

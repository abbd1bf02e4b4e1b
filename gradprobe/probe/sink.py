"""Where per-unit gradients go: the unit sink (P, the diagonal dots, the running sums, and a bank of every
unit's X[u] and Y[u] for the row means and the cross matrix K[u, v] = X[u].Y[v])."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .. import distributed
from ..environment import available_host_memory
from ..errors import GradprobeError
from ..params import FlatLayout
from . import real_step


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def choose_bank(setting: str, m: int, n: int, device: torch.device, n_prompts: int) -> tuple[str, str]:
    """Where the [m, n] fp32 banks of X[u] and Y[u] live: 'device' when they fit in 60% of the free device
    memory (the rest is for the forwards), else 'host' when they fit in 90% of the available host memory,
    else (setting 'auto') 'none': no bank, streaming sums and a second pass for the row means, without the
    cross matrix. A bank asked for by name that does not fit is refused before any work, naming the
    settings that fit. Returns (where, the reason)."""
    need = 2 * m * n * 4
    host = available_host_memory()
    host_cap = 0.9 * host if host is not None else float("inf")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
        dev_cap = 0.6 * free
    else:
        free, dev_cap = host, host_cap  # the CPU's memory is the host's
    what = f"{_gib(need)} for {m} units x {n:,} slots (the trainable values padded to whole blocks)"
    if setting in ("auto", "device") and need <= dev_cap:
        return "device", f"bank of per-unit gradients on {device.type}: {what} ({_gib(free or 0)} free)"
    if setting in ("auto", "host") and need <= host_cap:
        why = "" if setting == "host" else f" (over 60% of the {_gib(free)} free on {device.type})"
        return "host", f"bank of per-unit gradients on the host: {what}{why}"
    if setting in ("auto", "none"):
        why = "" if setting == "none" else f" ({what} fits neither on {device.type} nor on the host)"
        return "none", (f"no bank of per-unit gradients{why}: streaming sums and a second pass for the row means; "
                        f"no pairwise SE")
    cap = dev_cap if setting == "device" else host_cap
    fits = int(cap // (8 * n))
    hint = (f"probe.mode=blocks with probe.block_size={-(-n_prompts // fits)} ({fits} units fit), " if fits >= 2
            else "")
    where = f"{_gib(dev_cap if setting == 'device' else host_cap)} usable on " + (
        device.type if setting == "device" else "the host")
    raise GradprobeError(f"the bank of per-unit gradients needs {what}, but {where}; use {hint}probe.bank=auto, "
                         f"or probe.bank=none (no bank: a second pass, no pairwise SE)")


def host_bank(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two [m, n] fp32 host banks, refused up front (not by the OOM killer at unit m) when they do not fit."""
    need = 2 * m * n * 4
    avail = available_host_memory()
    if avail is not None and need > 0.9 * avail:
        raise GradprobeError(
            f"the fused schedule keeps every unit's X and Y on the host: {need / 2**30:.1f} GiB for {m} units x "
            f"{n:,} trainable values, but {avail / 2**30:.1f} GiB is available; use probe.mode=blocks with "
            f"probe.block_size=k (k times less), fewer prompts, or probe.schedule=literal (no bank, slower)")
    return torch.empty(m, n), torch.empty(m, n)


class UnitSink:
    """Takes each unit's X[u] and raw grad LY[u] from the flat device buffers: the preconditioner, the
    diagonal dots X[u].Y[u], the running sums, and a host bank of the per-unit gradients.

    The row means need X[u].sum_v Y[v], a sum known only after the last unit, so X[u] and Y[u] wait on
    the host (2 x n fp32 per unit, never on the device); one pass at the end forms K[u, v] = X[u].Y[v],
    whose row and column sums are X[u].sum Y and Y[u].sum X.
    With sums on the device, P, the dots and the sums run there and the host only stores; with sums on
    the host (accumulate_on=cpu) the device holds nothing but the two gradient buffers. On CUDA the copy
    to the host runs on a side stream into pinned double buffers and a worker thread (with half the
    CPU threads, so the thread launching kernels keeps a core) does the host side.

    bank='device' keeps the bank on the device instead (choose_bank): each unit's gradients are formed in
    its bank row (rows()), P, the dots and the sums run there, K is one fp64 pass there, and nothing but
    the [m, m] result and the sums crosses to the host. `slots`: how many units one forward may hold open
    (the device buffers that rows() hands out with a host bank).

    Under torchrun (`shard`, distributed.Shard) the sink holds this rank's m units and finish() reduces over
    the ranks: the sums in unit order, the diagonal dots gathered, K by a ring exchange (distributed.py)."""

    def __init__(self, layout: FlatLayout, m: int, device: torch.device, sums_on_device: bool,
                 pvec: torch.Tensor | None, bank: str = "host", slots: int = 0, shard: Any = None):
        n = layout.n
        self.layout = layout
        self.shard = shard
        self.then_result: Any = None  # what finish's `then` returned
        self.device = device
        self.bank = bank
        self.cuda = device.type == "cuda" and bank == "host"  # host transfers
        self.on_device = sums_on_device or bank != "host"
        where = device if self.on_device else torch.device("cpu")
        self.pvec = pvec.to(where) if pvec is not None else None  # padded
        if bank == "device":
            self.bank_x = torch.zeros(m, n, device=device)
            self.bank_y = torch.zeros(m, n, device=device)
        elif bank == "host":
            self.bank_x, self.bank_y = host_bank(m, n)
        else:  # none: the sums and dots only
            self.bank_x = self.bank_y = torch.empty(0)
        self._slots = torch.zeros(2, slots, n, device=device) if slots and bank != "device" else None
        self._open: tuple[int, int] | None = None  # (unit, slot) left open by the last rows() call
        self.diag_t = torch.zeros(m, len(layout.sizes), dtype=torch.float64, device=where)
        self.sx = torch.zeros(n, device=where)
        self.sy = torch.zeros(n, device=where)
        self._tmp = None if self.on_device else torch.empty(n)
        self._last: torch.cuda.Event | None = None
        if self.cuda:
            threads = max(1, torch.get_num_threads() // 2)
            self._stream = torch.cuda.Stream(device)
            self._staging = [torch.empty(2, n, pin_memory=True) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._pending: list[Future | None] = [None, None]
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradprobe-bank",
                                            initializer=torch.set_num_threads, initargs=(threads,))

    def rows(self, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[k, n] fp32 X and grad-LY rows where the consecutive `units` of one forward add their gradients;
        zero for a unit not seen before, holding its partial sums for a unit the last forward left open."""
        if self.bank == "device":
            return self.bank_x[units[0]:units[-1] + 1], self.bank_y[units[0]:units[-1] + 1]
        k, slots = len(units), self._slots
        self.wait_free()
        carried = self._open is not None and self._open[0] == units[0]
        if carried and self._open[1] != 0:
            slots[:, 0].copy_(slots[:, self._open[1]])
        slots[:, int(carried):k].zero_()
        self._open = (units[-1], k - 1)
        return slots[0, :k], slots[1, :k]

    def wait_free(self) -> None:
        """Before overwriting the buffers given to the last push(): wait (on the device) for their copy."""
        if self._last is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last)

    def push(self, u: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """x = X[u], y = raw grad LY[u]; y may be scaled by P in place."""
        if self.on_device:
            if self.pvec is not None:
                y.mul_(self.pvec)
            self.diag_t[u] = self.layout.dots(x, y)
            self.sx.add_(x)
            self.sy.add_(y)
            if self.bank != "host":
                return  # x and y are the bank's rows, or there is no bank
        if not self.cuda:
            self._host(u, x, y)
            return
        slot = u % 2
        if self._pending[slot] is not None:
            self._pending[slot].result()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        stage = self._staging[slot]
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            stage[0].copy_(x, non_blocking=True)
            stage[1].copy_(y, non_blocking=True)
            self._copied[slot].record(self._stream)
        self._last = self._copied[slot]
        self._pending[slot] = self._pool.submit(self._drain, u, slot)

    def _drain(self, u: int, slot: int) -> None:
        self._copied[slot].synchronize()
        self._host(u, self._staging[slot][0], self._staging[slot][1])

    def _host(self, u: int, x: torch.Tensor, y: torch.Tensor) -> None:
        bx, by = self.bank_x[u], self.bank_y[u]
        bx.copy_(x)
        if self.on_device:
            by.copy_(y)
            return
        if self.pvec is not None:
            torch.mul(y, self.pvec, out=by)
        else:
            by.copy_(y)
        self.diag_t[u] = self.layout.dots(bx, by, tmp=self._tmp)
        self.sx.add_(bx)
        self.sy.add_(by)

    def finish(self, then: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> torch.Tensor | None:
        """Wait for the host work and bring the sums to the host; return K[u, v] = X[u].Y[v] (fp64, m x m),
        or None without a bank. `then(bank_x, bank_y)` runs on the banks (Y as stored: times P when there is
        one) before they are freed, and may scale bank_y in place; what it returns is kept in then_result."""
        if self.cuda:
            for f in self._pending:
                if f is not None:
                    f.result()
            self._pool.shutdown()
            if self.on_device:
                stage = self._staging[0]  # pinned: a pageable copy of this size runs at a tenth of the speed
                stage[0].copy_(self.sx, non_blocking=True)
                stage[1].copy_(self.sy, non_blocking=True)
                torch.cuda.synchronize(self.device)
                self.sx, self.sy = stage[0], stage[1]
                self.diag_t = self.diag_t.cpu()
            self._staging = []
        if self.shard is not None:
            self._reduce()
        out = self.cross(self.bank_x, self.bank_y) if self.bank != "none" else None
        if then is not None and self.bank != "none":
            self.then_result = then(self.bank_x, self.bank_y)
        if self.bank != "host":
            self.diag_t = self.diag_t.cpu()
        self.bank_x = self.bank_y = torch.empty(0)
        self._tmp = None
        return out

    def _reduce(self) -> None:
        """Whole-batch sums (added in unit order across the ranks) and diagonal dots on every rank."""
        distributed.sync("the reductions")
        banks = [self.bank_x, self.bank_y] if self.bank != "none" else [torch.empty(0)] * 2
        self.sx, self.sy = distributed.ordered_sums(banks, [self.sx, self.sy], self.shard)
        self.diag_t = distributed.gather_rows(self.diag_t, self.shard)

    def cross(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """K[u, v] = a[u].b[v] (fp64, CPU) over every unit of the batch, from the rows of this sink's units."""
        if self.shard is None:
            return self.layout.cross_dots(a, b).cpu()
        return distributed.ring_cross(a, b, self.shard, self.layout.cross_dots)

    def dot_rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """a[u].w[j] (fp64 [units of the batch, k], CPU) for rows a of this sink's units and a few vectors w."""
        if self.shard is None:
            return self.layout.cross_dots(a, w).cpu()
        return distributed.rows_dot(a, w, self.shard, self.layout.cross_dots)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-unit values of this sink's units -> those of every unit of the batch."""
        return rows if self.shard is None else distributed.gather_rows(rows, self.shard)




# The real step's parts for a gradient: the batch's loss gradient per trainable tensor -> an UpdateParts
# (optim/update.py: fresh coefficient a, momentum, decay, clip_factor), e.g. decompose bound to its state.
StepParts = Callable[[list[torch.Tensor]], Any]


def real_step_hook(layout: FlatLayout, sink: UnitSink, pvec: torch.Tensor | None, m: int,
                   step_parts: StepParts) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """For finish(): the batch's loss gradient g (known only after the last unit), the step's parts for it,
    then the banked Y rows rescaled from P to clip*a and the K of real_step.same_batch. Returns
    (RealStepEstimate, UpdateParts, Delta theta as the run's dtype rounds it and in exact arithmetic, each one
    flat vector)."""
    cpu = torch.device("cpu")

    def then(bank_x: torch.Tensor, bank_y: torch.Tensor) -> tuple[real_step.RealStepEstimate, Any, torch.Tensor]:
        dev = bank_x.device  # the host, or the device for a device bank
        sy = sink.sy.to(cpu)
        p = pvec.to(cpu) if pvec is not None else None
        if p is not None:  # the bank and the sums hold P grad LY[v]; the padding has P = 0
            sy = torch.where(p > 0, sy / p, torch.zeros(()))
        g = -sy / m  # the run's loss is -mean_v LY[v]: g is its gradient on the whole batch
        parts = step_parts([v.clone() for v in layout.views(g)])
        a = layout.gather(parts.fresh, cpu) * parts.clip_factor
        bank_y.mul_((a if p is None else torch.where(p > 0, a / p, torch.zeros(()))).to(dev))
        fresh_cross = -sink.cross(bank_x, bank_y)  # X[u] . (clip a (.) G[v]), G[v] = -grad LY[v]
        fixed = [parts.momentum, parts.decay] + ([parts.rounding] if parts.rounding is not None else [])
        w = torch.stack([layout.gather(f, cpu) for f in fixed])
        xw = sink.dot_rows(bank_x, w.to(dev))
        est = real_step.same_batch(fresh_cross, xw[:, 0], xw[:, 1], float(parts.clip_factor),
                                   xw[:, 2] if parts.rounding is not None else None)
        exact = a * g + w[0] + w[1]
        return est, parts, exact + w[2] if parts.rounding is not None else exact, exact

    return then

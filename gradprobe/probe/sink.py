"""Where per-unit gradients go: the unit sink (P, the diagonal dots, the running sums, and a bank of every
unit's X[u] and Y[u] for the row means and the cross matrix K[u, v] = X[u].Y[v])."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..environment import available_host_memory
from ..errors import GradprobeError
from ..params import FlatLayout


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
    CPU threads, so the thread launching kernels keeps a core) does the host side."""

    def __init__(self, layout: FlatLayout, m: int, device: torch.device, sums_on_device: bool,
                 pvec: torch.Tensor | None):
        n = layout.n
        self.layout = layout
        self.device = device
        self.cuda = device.type == "cuda"
        self.on_device = self.cuda and sums_on_device
        where = device if self.on_device else torch.device("cpu")
        self.pvec = pvec.to(where) if pvec is not None else None  # padded
        self.bank_x, self.bank_y = host_bank(m, n)
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

    def finish(self) -> torch.Tensor:
        """Wait for the host work and bring the sums to the host; return K[u, v] = X[u].Y[v] (fp64, m x m)."""
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
        out = self.layout.cross_dots(self.bank_x, self.bank_y)
        self.bank_x = self.bank_y = torch.empty(0)
        self._tmp = None
        return out



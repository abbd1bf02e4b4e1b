"""The one signature every schedule implements: run(ctx) -> Outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...optim.precondition import Preconditioner
from ...params import FlatLayout
from ...rollouts import Batch

if TYPE_CHECKING:
    from ...config import ProbeSection


@dataclass
class Context:
    """What a schedule gets: the model, the batch split into units, the engine that runs forwards and
    weighted backwards (engine.py), the flat layout of the trainable tensors, and P."""

    stack: Any
    batch: Batch
    cfg: ProbeSection
    precond: Preconditioner
    units: list[list[int]]  # prompts of each unit
    eng: Any  # engine._Engine
    layout: FlatLayout
    acc: torch.device  # where the sums live (probe.accumulate_on)
    progress: Callable[[int, int], None] | None = None
    step_parts: Any = None  # sink.StepParts: the real step's decomposition, for deltaH (real_step.py)
    x_present: list[int] = field(default_factory=list)  # tensors reached by each X backward
    y_present: list[int] = field(default_factory=list)
    store: Any = None  # resume.UnitStore: units an interrupted run finished are restored, not recomputed
    shard: Any = None  # distributed.Shard under torchrun: `units` are this rank's share, unit indices local

    def restored(self, u: int, sink: Any, fx: torch.Tensor, fy: torch.Tensor) -> bool:
        """Unit u from the store, pushed as if computed (the saved fp32 bits, in the same order): True; or False."""
        saved = self.store.load(u) if self.store is not None else None
        if saved is None:
            return False
        sink.wait_free()
        fx.copy_(saved["x"])
        fy.copy_(saved["y"])
        self.x_present.append(saved["x_present"])
        self.y_present.append(saved["y_present"])
        sink.push(u, fx, fy)
        if self.progress:
            self.progress(u + 1, self.m)
        return True

    def save(self, u: int, fx: torch.Tensor, fy: torch.Tensor, nx: int, ny: int) -> None:
        """After unit u, before push() (which may scale fy by P in place); nx, ny: its first present entries."""
        if self.store is not None:
            self.store.save(u, fx, fy, min(self.x_present[nx:]), min(self.y_present[ny:]))

    @property
    def m(self) -> int:
        """Units this process computes (all of them without torchrun)."""
        return len(self.units)

    @property
    def total(self) -> int:
        """Units of the whole batch: what the estimates average over."""
        return self.shard.m if self.shard is not None else len(self.units)

    def pvec(self, device: torch.device) -> torch.Tensor | None:
        """P as one flat vector at the layout's offsets (None: identity)."""
        return self.layout.gather(self.precond.scales, device) if self.precond.scales is not None else None


@dataclass
class Outcome:
    """What a schedule returns: the sums of X[u] and Y[u] = P grad LY[u], the per-tensor diagonal dots, the
    row sums of the cross matrix, and the matrix itself when the schedule kept every unit's gradients."""

    sx: torch.Tensor  # [layout.n]
    sy: torch.Tensor
    diag_t: torch.Tensor  # [m, tensors] fp64: X[u].Y[u] per tensor
    x_dot_sy: torch.Tensor  # [m] fp64: X[u].sum_v Y[v]
    y_dot_sx: torch.Tensor  # [m] fp64: Y[u].sum_v X[v]
    cross: torch.Tensor | None  # [m, m] fp64 K[u, v] = X[u].Y[v], or None
    schedule: str
    notes: list[str] = field(default_factory=list)  # what the schedule decided and why (reported)
    real: Any = None  # sink.real_step_hook's result, when the schedule banked every unit and had step_parts

"""The schedule registry: every way of computing the probe's per-unit gradients, one module each behind
one signature, `run(ctx: Context) -> Outcome` (base.py). The config's choices for probe.schedule are the
names here; adding a schedule is one module and one line below.

A schedule that cannot run on a model (for example, one that forms gradients inside the LoRA layers
when a trainable tensor is not such a layer) raises GradprobeError saying why; none falls back silently.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Context, Outcome

# name -> module under gradprobe.probe.schedules (imported on first use: config.py reads the names only)
SCHEDULES: dict[str, str] = {
    "packed": "packed",
    "fused": "fused",
    "literal": "literal",
    "one_backward": "one_backward",
}
NAMES: tuple[str, ...] = tuple(SCHEDULES)


def get(name: str) -> Callable[[Context], Outcome]:
    """The run function of a registered schedule."""
    return importlib.import_module(f"{__name__}.{SCHEDULES[name]}").run

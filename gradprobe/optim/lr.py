"""The learning rate the next step will use, by one rule everywhere:
explicit (probe.learning_rate) > the scheduler's _last_lr > the optimizer's param_groups > the default."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import GradprobeError
from ..files import load_torch_file

DEFAULT_LEARNING_RATE = 1e-5


def scheduler_rates(path: Path) -> list[float] | None:
    """The scheduler's _last_lr: one rate per parameter group, the one the next step will use."""
    state = load_torch_file(path, "scheduler state")
    last = state.get("_last_lr") if isinstance(state, dict) else None
    if not isinstance(last, (list, tuple)) or not last:
        return None
    return [float(v) for v in last]


def group_rates(state_dict: dict[str, Any] | None) -> list[float]:
    if not state_dict:
        return []
    return [float(g["lr"]) for g in state_dict.get("param_groups", []) if "lr" in g and g.get("params")]


def one_rate(rates: list[float], what: str) -> float:
    bad = [r for r in rates if not math.isfinite(r)]
    if bad:
        raise GradprobeError(f"{what} holds the learning rate {bad[0]:g}, not a finite number (a diverged run or a "
                             f"damaged file); set probe.learning_rate to probe a step of a chosen size")
    if len({round(r, 15) for r in rates}) != 1:
        raise GradprobeError(f"{what} gives the parameter groups different learning rates {rates}; the probe takes "
                             f"one: set probe.learning_rate")
    return rates[0]


def next_learning_rate(explicit: float | None, state_dict: dict[str, Any] | None = None,
                       state_path: Path | None = None) -> tuple[float, str, list[str]]:
    """(rate, where it came from, notes). The scheduler's file is the scheduler.pt beside the state file."""
    notes: list[str] = []
    opt_rates = group_rates(state_dict)
    sched_path = state_path.parent / "scheduler.pt" if state_path is not None else None
    sched = scheduler_rates(sched_path) if sched_path is not None and sched_path.is_file() else None
    if sched is not None:
        rate, source = one_rate(sched, str(sched_path)), f"{sched_path} (_last_lr: the next step's rate)"
        if opt_rates and not math.isclose(rate, one_rate(opt_rates, str(state_path)), rel_tol=1e-9, abs_tol=0.0):
            notes.append(f"scheduler.pt says lr {rate:g} but the optimizer's param_groups hold {opt_rates[0]:g}; "
                         f"using the scheduler's")
    elif opt_rates:
        rate, source = one_rate(opt_rates, str(state_path or "the optimizer state")), \
            f"{state_path or 'the optimizer state'} (param_groups lr{'; no scheduler.pt' if state_path else ''})"
    else:
        rate, source = None, "none in the optimizer state"
    if explicit is not None:
        if rate is not None and not math.isclose(rate, explicit, rel_tol=1e-9, abs_tol=0.0):
            notes.append(f"learning rate {explicit:g} from probe.learning_rate (the run's next is {rate:g})")
        return explicit, "probe.learning_rate", notes
    if rate is None:
        return DEFAULT_LEARNING_RATE, "default (no optimizer state, no probe.learning_rate)", notes
    if not rate > 0:
        why = "a schedule at its end, or a warm-up at its start: every deltaH would be 0" if rate == 0 else \
            "negative: a step up the gradient"
        raise GradprobeError(f"the next step's learning rate in {source.split(' (')[0]} is {rate:g} ({why}); set "
                             f"probe.learning_rate to probe a step of a chosen size")
    return rate, source, notes

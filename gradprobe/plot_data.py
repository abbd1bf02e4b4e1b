"""What `gradprobe plot` draws, read from a file (docs/plot.md); the drawing is report/plot.py.

Two kinds of file:
- a `gradprobe delta-h1 --json` result: the per-unit contributions (`units`, or `entropy_units` when deltaH came
  from an independent entropy batch), each unit's signed share of deltaH or deltaH1;
- a JSONL of forecasts over training steps, one object per line with at least "step", "deltaH", "se_deltaH",
  "realised", "realised_se" (a number or null each, step an integer): predicted +- 2 SE against realised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GradprobeError
from .files import jsonl_objects

QUANTITIES = ("auto", "deltaH", "deltaH1")
MAX_BYTES = 64 * 2**20  # a result is kilobytes, a forecast line ~150 bytes: 64 MiB is ~400,000 steps (docs/plot.md)
STEP_KEYS = ("step", "deltaH", "se_deltaH", "realised", "realised_se")


@dataclass
class Contributions:
    """Unit shares of one estimate, largest |share| first; they sum to `total` (all units, not only `rows`)."""

    quantity: str  # "deltaH" or "deltaH1"
    rows: list[dict[str, Any]]  # the result's unit objects: unit, prompts, text, deltaH, deltaH1
    n_units: int
    total: float  # the sum of every unit's share
    entropy_batch: bool  # the units are the independent entropy batch's
    source: str

    def value(self, row: dict[str, Any]) -> float:
        return row[self.quantity]


@dataclass
class StepPoint:
    step: int
    predicted: float  # NaN: no forecast at this step
    se: float
    realised: float  # NaN: not measured
    realised_se: float


@dataclass
class Forecasts:
    points: list[StepPoint]  # by step
    source: str

    def summary(self) -> dict[str, Any]:
        """Over the steps with both numbers: how many, how many realised values lie within 2 combined SEs of the
        forecast (sqrt(se^2 + realised_se^2), a missing SE counted as 0), and the Pearson correlation (n >= 3)."""
        both = [p for p in self.points if math.isfinite(p.predicted) and math.isfinite(p.realised)]
        within = sum(abs(p.realised - p.predicted) <= 2 * math.hypot(_or0(p.se), _or0(p.realised_se)) for p in both)
        return {"steps": len(self.points), "paired": len(both), "within_2se": within,
                "correlation": _pearson([p.predicted for p in both], [p.realised for p in both])}


def _or0(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 3:
        return math.nan
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else math.nan


def read_plot_file(path: str | Path, quantity: str = "auto") -> Contributions | Forecasts:
    """The file's series; every error is one line naming the file (and the line, for JSONL)."""
    p = Path(path)
    if quantity not in QUANTITIES:
        raise GradprobeError(f"--quantity must be one of {', '.join(QUANTITIES)}; got {quantity!r}")
    if not p.is_file():
        raise GradprobeError(f"{p}: no such file")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise GradprobeError(f"{p}: {size / 2**20:.0f} MiB, past plot's limit of {MAX_BYTES // 2**20} MiB "
                             f"(docs/plot.md); plot a slice of the steps, e.g. awk 'NR % 100 == 1' {p.name} > "
                             f"thinned.jsonl")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GradprobeError(f"{p}: cannot read it as text ({exc})") from exc
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # several lines: JSONL
    if isinstance(whole, dict) and "step" not in whole:
        return contributions(whole, str(p), quantity)
    return forecasts(text, str(p))


def contributions(obj: dict[str, Any], source: str, quantity: str = "auto") -> Contributions:
    """The unit shares of a delta-h1 result object (its JSON, NaN written as null)."""
    if obj.get("command") != "delta-h1":
        raise GradprobeError(f"{source}: neither a delta-h1 JSON result (command 'delta-h1') nor a JSONL of "
                             f"forecasts (one object per line with {', '.join(repr(k) for k in STEP_KEYS)})")
    if obj.get("complete") is False:
        raise GradprobeError(f"{source}: a partial result of an interrupted run has no per-unit contributions; "
                             f"finish it with gradprobe delta-h1 --resume")
    units = obj.get("units")
    if not isinstance(units, list) or not units:
        raise GradprobeError(f"{source}: no 'units' (per-unit contributions): written by an older gradprobe; run "
                             f"delta-h1 again")
    ent = obj.get("entropy_units") or []
    for where, rows in (("units", units), ("entropy_units", ent)):
        for i, u in enumerate(rows):
            if not (isinstance(u, dict) and isinstance(u.get("unit"), int) and isinstance(u.get("text"), str)
                    and all(_number_or_null(u.get(k), k in u) for k in ("deltaH", "deltaH1"))):
                raise GradprobeError(f"{source}: {where}[{i}] is not a unit object "
                                     f"({{'unit', 'prompts', 'text', 'deltaH', 'deltaH1'}})")
    candidates = [("deltaH", ent, True), ("deltaH", units, False), ("deltaH1", units, False)]
    for key, rows, is_ent in candidates:
        if quantity in ("auto", key) and rows and any(u[key] is not None for u in rows):
            shown = [{**u, key: float(u[key])} for u in rows if u[key] is not None]
            shown.sort(key=lambda u: -abs(u[key]))
            return Contributions(key, shown, len(rows), sum(u[key] for u in shown), is_ent, source)
    raise GradprobeError(f"{source}: no unit has a value for {quantity if quantity != 'auto' else 'deltaH or deltaH1'}"
                         f" (deltaH has no per-unit terms under the literal schedule or without a bank)")


def _number_or_null(v: Any, present: bool) -> bool:
    return present and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))


def forecasts(text: str, source: str) -> Forecasts:
    """A JSONL of per-step forecasts; blank lines are skipped."""
    points: list[StepPoint] = []
    for where, obj in jsonl_objects(text, source, "; expected a delta-h1 JSON result or a JSONL of forecasts"):
        missing = [k for k in STEP_KEYS if k not in obj]
        if missing:
            raise GradprobeError(f"{where}: missing key '{missing[0]}' (each line needs "
                                 f"{', '.join(repr(k) for k in STEP_KEYS)})")
        step = obj["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise GradprobeError(f"{where}: 'step' must be an integer; got {step!r}")
        values = []
        for k in STEP_KEYS[1:]:
            if not _number_or_null(obj[k], True):
                raise GradprobeError(f"{where}: '{k}' must be a number or null; got {obj[k]!r}")
            values.append(math.nan if obj[k] is None else float(obj[k]))
        points.append(StepPoint(step, *values))
    if not points:
        raise GradprobeError(f"{source}: empty: no forecasts to plot")
    points.sort(key=lambda p: p.step)
    return Forecasts(points, source)

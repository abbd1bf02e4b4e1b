"""`gradprobe plot`'s pictures: drawn with unicode characters for the terminal, or as a PNG (matplotlib, the
optional extra 'plot'). The series come from plot_data.py; nothing is computed here."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..plot_data import Contributions, Forecasts
from .common import fmt, pyplot, write_png

BAR = 41  # columns of a bar or an axis


def _columns(lo: float, hi: float, width: int):
    """x -> column in [0, width) for the axis [lo, hi]."""
    span = hi - lo or 1.0
    return lambda x: min(width - 1, max(0, round((x - lo) / span * (width - 1))))


def diverging_bar(value: float, biggest: float, width: int = BAR) -> str:
    """A bar from the centre column (│) to the left for a negative value, to the right for a positive one;
    `biggest` (the largest |value| shown) fills half the width."""
    half = width // 2
    n = round(abs(value) / biggest * half) if biggest > 0 else 0
    left = " " * (half - n) + "█" * n if value < 0 else " " * half
    right = "█" * n + " " * (half - n) if value > 0 else " " * half
    return left + "│" + right


def contribution_lines(c: Contributions, top: int, width: int = BAR) -> list[str]:
    """A header, then one line per unit: unit, share, bar, the prompt's text (markup-escaped)."""
    rows = c.rows[:top]
    biggest = max(abs(c.value(u)) for u in rows)
    where = ", units of the independent entropy batch" if c.entropy_batch else ""
    head = (f"per-prompt contributions to {c.quantity}: top {len(rows)} of {c.n_units} units{where}; all units sum "
            f"to {fmt(c.total)}")
    axis = f"{'':>5}  {'':>10}  {'lowers H':<{width // 2}}{'raises H':>{width - width // 2}}"
    lines = [head, axis]
    for u in rows:
        v = c.value(u)
        lines.append(f"{u['unit']:>5}  {fmt(v, 3):>10}  {diverging_bar(v, biggest, width)}  {escape(u['text'])}")
    return lines


MAX_STEP_ROWS = 500  # a terminal plot of more steps shows every k-th (the summary line counts them all)


def forecast_lines(f: Forecasts, width: int = BAR) -> list[str]:
    """One line per step (every k-th past MAX_STEP_ROWS steps): the forecast's +- 2 SE interval as ─, the
    forecast ●, the realised value ✕ (◆ where they share a column), zero │; then the agreement over the steps
    that have both."""
    ends = [0.0]
    for p in f.points:
        if math.isfinite(p.predicted):
            se = p.se if math.isfinite(p.se) else 0.0
            ends += [p.predicted - 2 * se, p.predicted + 2 * se]
        if math.isfinite(p.realised):
            ends.append(p.realised)
    lo, hi = min(ends), max(ends)
    col = _columns(lo, hi, width)
    lines = [f"{'step':>7}  {fmt(lo, 2):<{width // 2}}{fmt(hi, 2):>{width - width // 2}}  "
             f"{'predicted ± 2 SE':>24}  {'realised':>20}"]
    every = -(-len(f.points) // MAX_STEP_ROWS)
    for p in f.points[::every]:
        cells = [" "] * width
        if math.isfinite(p.predicted) and math.isfinite(p.se):
            for c in range(col(p.predicted - 2 * p.se), col(p.predicted + 2 * p.se) + 1):
                cells[c] = "─"
        cells[col(0.0)] = "│"
        if math.isfinite(p.predicted):
            cells[col(p.predicted)] = "●"
        if math.isfinite(p.realised):
            c = col(p.realised)
            cells[c] = "◆" if math.isfinite(p.predicted) and c == col(p.predicted) else "✕"
        pred = f"{fmt(p.predicted, 3)} ± {fmt(2 * p.se, 2)}" if math.isfinite(p.predicted) else "n/a"
        real = fmt(p.realised, 3) + (f" ± {fmt(2 * p.realised_se, 2)}" if math.isfinite(p.realised_se) else "")
        lines.append(f"{p.step:>7}  {''.join(cells)}  {pred:>24}  {real:>20}")
    if every > 1:
        lines.append(f"one row per {every} steps: {len(f.points[::every]):,} of {len(f.points):,} shown")
    s = f.summary()
    corr = f"correlation {s['correlation']:.2f}" if math.isfinite(s["correlation"]) else "correlation n/a (< 3 steps)"
    lines.append(f"● predicted, ─ ± 2 SE, ✕ realised (◆ on the forecast), │ zero. {s['paired']} of {s['steps']} steps "
                 f"have both: {s['within_2se']} realised within 2 combined SE of the forecast; {corr}")
    return lines


def render_plot(out: Console, data: Contributions | Forecasts, top: int) -> None:
    lines = contribution_lines(data, top) if isinstance(data, Contributions) else forecast_lines(data)
    for line in lines:
        out.print(line, highlight=False)


def save_png(data: Contributions | Forecasts, path: str | Path, top: int) -> None:
    """The same picture as a PNG: horizontal bars per unit, or forecast +- 2 SE and realised over steps."""
    plt = pyplot("--png")
    if isinstance(data, Contributions):
        rows = data.rows[:top][::-1]  # largest at the top
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows)))
        values = [data.value(u) for u in rows]
        ax.barh(range(len(rows)), values, color=["tab:green" if v > 0 else "tab:red" for v in values])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{u['unit']}: {u['text'][:40]}" for u in rows], fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"share of {data.quantity} (nats; > 0 raises the entropy)")
        ax.set_title(f"per-prompt contributions to {data.quantity} (top {len(rows)} of {data.n_units}; "
                     f"sum {fmt(data.total, 3)})", fontsize=10)
    else:
        pts = data.points
        fig, ax = plt.subplots(figsize=(8, 4.5))
        pred = [p for p in pts if math.isfinite(p.predicted)]
        ax.errorbar([p.step for p in pred], [p.predicted for p in pred],
                    yerr=[2 * p.se if math.isfinite(p.se) else 0.0 for p in pred], fmt="o", capsize=3,
                    label="predicted ± 2 SE")
        real = [p for p in pts if math.isfinite(p.realised)]
        ax.errorbar([p.step for p in real], [p.realised for p in real],
                    yerr=[2 * p.realised_se if math.isfinite(p.realised_se) else 0.0 for p in real], fmt="x",
                    capsize=3, label="realised")
        ax.axhline(0.0, color="black", linewidth=0.8)
        s = data.summary()
        corr = f", correlation {s['correlation']:.2f}" if math.isfinite(s["correlation"]) else ""
        ax.set_title(f"entropy change per step: {s['within_2se']}/{s['paired']} realised within 2 combined SE{corr}",
                     fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("ΔH (nats)")
        ax.legend()
    fig.tight_layout()
    write_png(fig, path)

"""Rendering of `gradprobe validate`: a Rich table, a terminal plot of the ratio, JSON, an optional PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..validate import NONLINEAR, ValidateResult
from .common import fmt, pyplot, step_words, write_png

if TYPE_CHECKING:
    from ..config import Config

SCHEMA_VALIDATE = "gradprobe.validate/1"


def validate_payload(result: ValidateResult, cfg: Config) -> dict[str, Any]:
    return {"schema": SCHEMA_VALIDATE, "command": "validate", "config": cfg.to_dict(), "result": result.to_dict()}


def _pm(x: float, se: float) -> str:
    return fmt(x, 3) if not se else f"{fmt(x, 3)} ± {fmt(se, 1)}"


def ratio_plot(r: ValidateResult, width: int = 41, lo: float = 0.0, hi: float = 2.0) -> list[str]:
    """One line per eta: the 95% interval of Delta H_true / prediction as ─, the ratio as ●, 1 as │."""
    def col(x: float) -> int:
        return min(width - 1, max(0, round((x - lo) / (hi - lo) * (width - 1))))

    lines = [f"{'eta':>10}  {fmt(lo, 2):<{width // 2}}{fmt(hi, 2):>{width - width // 2}}   (ΔH_true / prediction)"]
    for p in r.points:
        cells = [" "] * width
        if math.isfinite(p.ratio_low) and math.isfinite(p.ratio_high):
            for c in range(col(p.ratio_low), col(p.ratio_high) + 1):
                cells[c] = "─"
        cells[col(1.0)] = "│"
        if math.isfinite(p.ratio):
            cells[col(p.ratio)] = "●" if lo <= p.ratio <= hi else ("◀" if p.ratio < lo else "▶")
        lines.append(f"{fmt(p.eta, 2):>10}  {''.join(cells)}  {fmt(p.ratio, 3)}")
    return lines


def render_validate(out: Console, r: ValidateResult) -> None:
    exact = r.method == "exact"
    what = "δH (the real step, η = 1)" if r.direction == "real" else "δH₁ (the plain step)"
    title = f"gradprobe validate: {what} against " + ("exact enumeration" if exact else "importance sampling")
    t = Table(title=title, title_justify="left")
    for name in ("η", "ΔH_true", "−η X̄_E·d ± SE", "ratio", "95%"):
        t.add_column(name, justify="right")
    if exact:
        t.add_column("η ∇H·d exact", justify="right")
        t.add_column("true/exact", justify="right")
    for p in r.points:
        row = [fmt(p.eta, 2), _pm(p.delta_true, p.delta_true_se), _pm(p.predicted, p.predicted_se),
               fmt(p.ratio, 3), f"{fmt(p.ratio_low, 2)}–{fmt(p.ratio_high, 2)}"]
        if exact:
            row += [fmt(p.first_order_exact, 3), fmt(p.ratio_exact, 5)]
        t.add_row(*row)
    out.print(t)
    for line in ratio_plot(r):
        out.print(line, highlight=False)
    s = Table(show_header=False, box=None)
    s.add_column("quantity", style="bold")
    s.add_column("value")
    s.add_row("H(θ)", f"{fmt(r.entropy)} nats (sequence entropy, mean over the evaluation batch's prompts)")
    slopes = f"fitted {fmt(r.slope_fit)}, probe −X̄_E·d {fmt(r.slope_probe)} ± {fmt(r.slope_probe_se, 2)}"
    if r.slope_exact is not None:
        slopes += f", exact ∇H·d {fmt(r.slope_exact)}"
    s.add_row("dH/dη at small η", slopes)
    onset = f"from η ≈ {fmt(r.eta_nonlinear, 2)}" if r.eta_nonlinear is not None else "not within the sweep"
    s.add_row("second-order effects", f"ΔH leaves the small-η line by > {NONLINEAR:.0%} {onset}")
    if r.grad_cosine is not None:
        s.add_row("cos(−X̄_E, ∇H)", fmt(r.grad_cosine))
    truth = (f"enumeration of {r.responses_per_prompt:,} responses per prompt" if exact else
             f"{r.is_samples} fresh samples per prompt, self-normalised weights, smallest ESS {fmt(r.is_min_ess, 3)}")
    s.add_row("truth", f"{truth}; responses ≤ {r.max_len} tokens at temperature {fmt(r.temperature)}")
    s.add_row("steps", f"‖ηd‖/‖θ‖ from {fmt(r.points[0].step, 1)} to {fmt(r.points[-1].step, 1)}; the run's "
                       f"{'step (η = 1)' if r.direction == 'real' else 'η ' + fmt(r.eta_run, 2)} is a step of "
                       f"{fmt(r.step_run, 2)}")
    if r.direction == "real":
        s.add_row("direction", f"d = the optimizer's next step Δθ ({step_words(r.step)}); η multiplies it")
    d_is = "d = Δθ" if r.direction == "real" else "d = P·∇LY"
    s.add_row("batches", f"update {r.update_units}×{r.update_group_size} ({d_is}, ‖d‖ {fmt(r.d_norm)}), "
                         f"evaluation {r.eval_units}×{r.eval_group_size}, independent")
    s.add_row("θ", f"{r.n_params:,} trainable values, ‖θ‖ {fmt(r.theta_norm)}; preconditioner {r.precondition}")
    s.add_row("time", ", ".join(f"{k} {v:.2f} s" for k, v in r.timings.items()))
    out.print(s)
    if r.autocast != "off":
        out.print(f"[yellow]autocast {r.autocast}: the forward rounds away parameter steps far below its precision "
                  f"(about 1e-3 of ‖θ‖ for bf16), so small-η truths flatten; validate with --set autocast=off "
                  f"--set quant.compute_dtype=float32[/]")


def save_plot(r: ValidateResult, path: str | Path) -> None:
    """|Delta H_true| and |prediction| against eta on log axes (matplotlib, the optional extra 'plot')."""
    plt = pyplot("--plot")
    etas = [p.eta for p in r.points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(etas, [abs(p.delta_true) for p in r.points], yerr=[p.delta_true_se for p in r.points],
                marker="o", label="|ΔH_true|")
    pred = [abs(p.predicted) for p in r.points]
    ax.plot(etas, pred, "--", label="|−η X̄_E·d| (probe)")
    ax.fill_between(etas, [max(v - 1.96 * p.predicted_se, 1e-300) for v, p in zip(pred, r.points)],
                    [v + 1.96 * p.predicted_se for v, p in zip(pred, r.points)], alpha=0.2)
    if r.slope_exact is not None:
        ax.plot(etas, [abs(p.first_order_exact) for p in r.points], ":", label="|η ∇H·d| (exact)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("η")
    ax.set_ylabel("entropy change (nats)")
    ax.set_title(f"gradprobe validate ({r.method})")
    ax.legend()
    fig.tight_layout()
    write_png(fig, path)

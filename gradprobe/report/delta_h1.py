"""Rendering of results: Rich tables for people, one JSON object for scripts. No computation here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..probe import ProbeResult
from ..probe.real_step import FIRST_ORDER_LIMIT
from ..rollouts import ZERO_ADVANTAGES
from .common import _bytes, assumed_stack_words, fmt, step_provenance, step_words

if TYPE_CHECKING:
    from ..config import Config

SCHEMA_DELTA_H1 = "gradprobe.delta-h1/1"


def delta_h1_payload(result: ProbeResult, cfg: Config) -> dict[str, Any]:
    """The JSON object (schemas/delta-h1.schema.json): the per-unit attribution sits beside the result."""
    body = result.to_dict()
    units, entropy_units = body.pop("units"), body.pop("entropy_units")
    return {"schema": SCHEMA_DELTA_H1, "command": "delta-h1", "config": cfg.to_dict(), "units": units,
            "entropy_units": entropy_units, "result": body}


def top_units(r: ProbeResult, top: int = 5) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(quantity, the units it is shared over, the `top` largest shares by size) for the report: deltaH's shares
    (over the entropy batch's units when deltaH came from one), else deltaH1's where deltaH has none."""
    units = r.entropy_units if r.entropy_batch == "independent" and r.entropy_units else r.units
    key = "deltaH"
    if not any(math.isfinite(u["deltaH"]) for u in units):
        key, units = "deltaH1", r.units
    rows = sorted(units, key=lambda u: -abs(u[key]) if math.isfinite(u[key]) else 0.0)
    return key, units, rows[:top]


def render_units(out: Console, r: ProbeResult, top: int = 5) -> None:
    """The prompts that move the entropy most: each unit's signed share and its part of all shares' sizes."""
    if not r.units:
        return
    key, units, rows = top_units(r, top)
    total = sum(abs(u[key]) for u in units if math.isfinite(u[key])) or 1.0
    where = "; units of the independent entropy batch" if units is r.entropy_units else ""
    t = Table(title=f"largest per-prompt contributions to {key} (of {len(units)} units{where})",
              title_justify="left")
    t.add_column("unit", justify="right")
    t.add_column(key, justify="right")
    t.add_column("share", justify="right")
    t.add_column("effect")
    t.add_column("prompt" if r.mode == "exact" else "prompts: first prompt", overflow="fold")
    for u in rows:
        v = u[key]
        effect = "raises H" if v > 0 else "lowers H" if v < 0 else ""
        prompts = "" if r.mode == "exact" else f"{u['prompts'][0]}–{u['prompts'][-1]}: "
        text = u["text"] if len(u["text"]) <= 60 else u["text"][:59] + "…"
        t.add_row(str(u["unit"]), fmt(v, 3), f"{100 * abs(v) / total:.1f}%", effect, escape(prompts + text))
    out.print(t)
    if key == "deltaH1":
        out.print("per-prompt shares of deltaH: n/a (this schedule or bank keeps no per-unit step terms)")


def headline_se(r: ProbeResult) -> tuple[float, str]:
    """The SE shown next to deltaH1: the one from the cross matrix where there is one (it calibrated best,
    docs/validate.md), else the row-mean Hoeffding SE; plus the other SEs in words. Below B = 4 no SE is
    a headline: the pairwise one is undefined and the row-mean ones are degenerate (B = 2) or far off (B = 3)."""
    rows = f"Hoeffding ± {fmt(r.se, 2)}, jackknife ± {fmt(r.se_jackknife, 2)}"
    if r.B < 4:
        if r.B < 3:
            return math.nan, (f"no standard error: B = {r.B} units, and an SE needs B >= 4 (pairwise) and B >= 3 "
                              f"(row-mean); use more prompts")
        return math.nan, (f"no headline SE at B = 3: the pairwise SE needs B >= 4 and the row-mean SEs run far off "
                          f"(for reference only: {rows}); use more prompts")
    if math.isfinite(r.se_unbiased):
        return r.se_unbiased, f"pairwise SE; row-mean {rows}"
    why = ("the literal schedule keeps no per-unit gradients" if r.schedule == "literal"
           else "the pairwise SE came out undefined")
    return r.se, f"row-mean {rows}; no pairwise SE: {why}"


REAL_STEP_IS_NOT = ("deltaH is the first-order change grad H . step of the one step optimizer.step() will take "
                    "on this batch. It holds Adam's per-coordinate scale (through this batch's g^2) and the clip "
                    "factor at their batch values, which runs the same-batch deltaH low on steps where this "
                    "batch's g^2 is a large share of Adam's v (early in a run; docs/real_step.md); it is not the "
                    "curvature term, not the change "
                    "over several steps, and not deltaH1, which is the plain step lr P grad LY without momentum "
                    "or weight decay.")


def unresolved_words(r: ProbeResult, key: str) -> str | None:
    """'cannot be told from zero at B = 8 prompts (|deltaH| < 2 SE); about 1,400 prompts would resolve it'."""
    res = r.resolution.get(key, {})
    if res.get("resolved") is not False:
        return None
    independent = key == "deltaH" and r.entropy_batch == "independent" and r.entropy_units
    units = len(r.entropy_units) if independent else r.B
    per_unit = 1 if independent or r.mode == "exact" else max(r.n_prompts // max(r.B, 1), 1)
    need = res.get("units_needed")
    more = f"; about {float(f'{need * per_unit:.2g}'):,.0f} prompts would resolve it (SE ∝ 1/√B)" if need else ""
    return f"cannot be told from zero at {units * per_unit} prompts (|{key}| < 2 SE){more}"


PART_LABELS = {"fresh": "fresh gradient", "momentum": "momentum", "weight_decay": "weight decay",
               "rounding": "rounding (the run's dtype)"}


def render_real_step(out: Console, r: ProbeResult, assumed: dict[str, Any] | None = None) -> None:
    """The headline: deltaH of the real step, its parts, and in words what was read and assumed (`assumed`:
    the stack settings a checkpoint did not record, CheckpointInfo.assumed_stack)."""
    t = Table(title="the next optimizer step", show_header=False, title_justify="left")
    t.add_column("quantity", style="bold")
    t.add_column("value")
    stack_words = assumed_stack_words(assumed)
    if stack_words:
        t.add_row("[yellow]stack probed[/]", f"[yellow]{escape(stack_words)}[/]")
    if math.isfinite(r.deltaH):
        over = f"; over batches ± {fmt(r.se_deltaH_batches, 2)}" if math.isfinite(r.se_deltaH_batches) else ""
        how = "same batch, U-statistic" if r.entropy_batch == "same" else "independent entropy batch"
        t.add_row("deltaH (real step)", f"{fmt(r.deltaH)} ± {fmt(r.se_deltaH, 2)} ({how}{over})")
        words = unresolved_words(r, "deltaH")
        if words:
            t.add_row("", f"[yellow]{words}[/]")
        keys = [k for k in PART_LABELS if k in r.parts]
        total = sum(abs(r.parts[k]["value"]) for k in keys) or 1.0
        for key in keys:
            part = r.parts[key]
            zero = "; within 2 SE of 0" if r.resolution.get(key, {}).get("resolved") is False else ""
            t.add_row(f"  {PART_LABELS[key]}", f"{fmt(part['value'])} ± {fmt(part['se'], 2)} "
                                               f"({100 * abs(part['value']) / total:.0f}% of |parts|{zero})")
        t.add_row("  clip factor", fmt(r.parts["clip_factor"]))
        t.add_row("‖step‖; plain step", f"{fmt(r.update_norm)}; {fmt(r.plain_update_norm)} "
                                       f"(cosine {r.plain_update_cosine:.2f})")
        if "rounding" in r.parts:
            t.add_row("unrounded step", f"deltaH {fmt(r.deltaH_unrounded)}, ‖step‖ {fmt(r.update_norm_unrounded)}; "
                                        f"{100 * r.rounded_away:.1f}% of the moving coordinates round to no change")
        size = f"{fmt(r.update_rel, 3)} (second-order effects were measured from {FIRST_ORDER_LIMIT:g} on)"
        if r.beyond_first_order:
            size = (f"[yellow]{size}: a step this large may be beyond first order and deltaH far off; "
                    f"measure it with gradprobe validate on the same setting[/]")
        t.add_row("‖step‖ / ‖θ‖", size)
    else:
        t.add_row("deltaH (real step)", f"n/a: {r.real_step_note}")
    t.add_row("optimizer step", step_words(r.step))
    if r.warmup_steps:
        t.add_row("warm-up", f"{r.warmup_steps} AdamW steps on this model before probing (probe.warmup_steps)")
    out.print(t)
    if ZERO_ADVANTAGES in r.notes:
        out.print(f"[yellow]note:[/] {ZERO_ADVANTAGES}", soft_wrap=True)
    for line in step_provenance(r.step):
        out.print(f"  {line}", soft_wrap=True)
    if r.real_step_note and math.isfinite(r.deltaH):
        out.print(f"[yellow]note:[/] {r.real_step_note}", soft_wrap=True)
    out.print(REAL_STEP_IS_NOT, soft_wrap=True)


def render_delta_h1(out: Console, r: ProbeResult, top: int = 8, assumed: dict[str, Any] | None = None) -> None:
    render_real_step(out, r, assumed)
    t = Table(title="the plain step lr P grad LY (deltaH1, for comparison)", show_header=False, title_justify="left")
    t.add_column("quantity", style="bold")
    t.add_column("value")
    se, which = headline_se(r)
    shown = f"{fmt(r.deltaH1)} ± {fmt(se, 2)}" if math.isfinite(se) else fmt(r.deltaH1)
    if ZERO_ADVANTAGES in r.notes:
        shown, which = "0 by construction", "zero advantages: every group's rewards are equal"
    t.add_row("deltaH1 (plain step)", f"{shown} ({which})")
    words = unresolved_words(r, "deltaH1")
    if words:
        t.add_row("", f"[yellow]{words}[/]")
    u_se = r.U_cross_se_unbiased if math.isfinite(r.U_cross_se_unbiased) else r.U_cross_se
    t.add_row("U_cross", f"{fmt(r.U_cross)} ± {fmt(u_se, 2)}" if math.isfinite(se) else fmt(r.U_cross))
    t.add_row("Xbar·Ybar, Σ X\\[u]·Y\\[u]", f"{fmt(r.bars_dot)}, {fmt(r.diag_sum)}")
    t.add_row("units B, G, prompts", f"{r.B} ({r.mode}), {r.G}, {r.n_prompts}")
    t.add_row("learning rate", fmt(r.learning_rate))
    t.add_row("preconditioner", r.precondition)
    t.add_row("trainable", f"{r.n_params:,} values in {r.n_tensors} tensors")
    t.add_row("‖ΣX‖, ‖ΣY‖", f"{fmt(r.x_sum_norm)}, {fmt(r.y_sum_norm)}")
    t.add_row("grads non-None X / Y", f"{r.x_nonnull}/{r.n_tensors} / {r.y_nonnull}/{r.n_tensors}")
    t.add_row("grads non-zero X / Y", f"{r.x_nonzero}/{r.n_tensors} / {r.y_nonzero}/{r.n_tensors}")
    t.add_row("schedule", f"{r.schedule}, microbatch {r.microbatch_size}: {r.forwards} forwards, "
                          f"{r.backwards} backwards, {r.tokens:,} tokens")
    for note in r.notes:
        if note != ZERO_ADVANTAGES:  # said in the headline
            t.add_row("", escape(note))
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in r.timings.items())
    t.add_row("time", timing)
    t.add_row("peak memory", f"{_bytes(r.peak_memory_bytes)} ({r.peak_memory_kind})")
    out.print(t)
    if r.x_nonnull < r.n_tensors or r.y_nonnull < r.n_tensors:
        out.print("[yellow]some trainable tensors got no gradient: run `gradprobe diagnose` on this config[/]")
    m = Table(title=f"largest contributions to deltaH1 (of {len(r.modules)} modules)", title_justify="left")
    m.add_column("module")
    m.add_column("deltaH1", justify="right")
    m.add_column("share", justify="right")
    total = sum(abs(x["deltaH1"]) for x in r.modules) or 1.0
    for row in r.modules[:top]:
        m.add_row(row["name"], fmt(row["deltaH1"], 3), f"{100 * abs(row['deltaH1']) / total:.1f}%")
    out.print(m)
    layers = ", ".join(f"{row['name']} {fmt(row['deltaH1'], 2)}" for row in r.layers[:top])
    out.print(f"by layer: {layers}")
    render_units(out, r)

"""Rendering of a DiagnoseResult: the Rich table and verdict for people, one JSON object for scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..diagnose.check import FAIL, PASS, WARN
from ..diagnose.core import SCHEMA, DiagnoseResult
from .common import assumed_stack_words

if TYPE_CHECKING:
    from ..config import Config

STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red"}
SHOWN = 3  # names shown per list before "(+k more)"


def _value(v: Any) -> str:
    if isinstance(v, list):
        head = ", ".join(str(x) for x in v[:SHOWN])
        return head + (f" (+{len(v) - SHOWN} more)" if len(v) > SHOWN else "") if v else "none"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def evidence_text(evidence: dict[str, Any]) -> str:
    """One 'key: value' per line: a narrow terminal wraps values, not the structure."""
    return "\n".join(f"{k}: {_value(v)}" for k, v in evidence.items())


def _longest_word(texts) -> int:
    return max((len(w) for text in texts for w in text.split()), default=1)


def payload(result: DiagnoseResult, cfg: Config | None, exit_code: int) -> dict[str, Any]:
    return {"schema": SCHEMA, "command": "diagnose", "config": cfg.to_dict() if cfg is not None else None,
            "exit_code": exit_code, **result.to_dict()}


def render(out: Console, result: DiagnoseResult, exit_code: int, assumed: dict[str, Any] | None = None) -> None:
    """`assumed`: the stack settings a checkpoint did not record (CheckpointInfo.assumed_stack): the verdict
    is about this stack, and says so."""
    t = Table(title="gradprobe diagnose", title_justify="left", show_lines=True)
    t.add_column("check", style="bold", ratio=1)
    t.add_column("status", no_wrap=True)
    # piped or logged (no terminal): a column is never narrower than its longest word, so a fix or a code
    # line is never folded mid-token (a terminal keeps its width and folds what cannot fit)
    piped = not out.is_terminal
    t.add_column("evidence", ratio=3, overflow="fold",
                 min_width=_longest_word(evidence_text(c.evidence) for c in result.checks) if piped else None)
    t.add_column("fix", ratio=2, overflow="fold",
                 min_width=_longest_word(c.fix for c in result.checks) if piped else None)
    for c in result.checks:
        t.add_row(c.title, f"[{STYLE[c.status]}]{c.status.upper()}[/]", escape(evidence_text(c.evidence)),
                  escape(c.fix))
    out.print(t)
    if result.differential:
        d = Table(title="differential runs (one factor changed at a time)", title_justify="left")
        d.add_column("factor", no_wrap=True)
        d.add_column("before → after")
        d.add_column("symptom gone", no_wrap=True)
        for r in result.differential:
            if not r.applied:
                d.add_row(r.factor, escape(r.note or "not applied"), "n/a")
                continue
            keys = [k for k in ("autograd_grad_nonnull", "backward_nonnull", "backward_nonzero", "requires_grad",
                                "forward_grad_enabled", "forward_autocast", "raised") if k in r.before or k in r.after]
            always = [k for k in ("autograd_grad_nonnull", "backward_nonnull") if k in r.before]
            changed = always + [k for k in keys if k not in always and r.before.get(k) != r.after.get(k)]
            moves = ", ".join(f"{k} {r.before.get(k)} → {r.after.get(k)}" for k in changed)
            if "loss_error" in r.after:
                moves += f"; the loss failed: {r.after['loss_error']}"
            if r.after.get("grad_rel_change") is not None:
                moves += f"; the gradient changes by {r.after['grad_rel_change']:.3g} (relative L2)"
            gone = "[green]yes[/]" if r.fixes_all else ("partly" if r.resolved else "[red]no[/]")
            d.add_row(r.factor, escape(moves), gone)
        out.print(d)
    v = result.verdict
    colour = "green" if v.root_cause == "healthy" else "bold red"
    out.print(f"[bold]verdict:[/] [{colour}]{v.root_cause}[/]"
              + (f"  (also: {', '.join(c.id for c in v.causes[1:])})" if len(v.causes) > 1 else ""))
    stack_words = assumed_stack_words(assumed)
    if stack_words:
        out.print(f"[yellow]verdict on an assumed stack:[/] {escape(stack_words)}", soft_wrap=True)
    out.print(escape(v.summary))
    out.print(f"[bold]fix:[/] {escape(v.fix)}")
    fails = sum(c.status == FAIL for c in result.checks)
    warns = sum(c.status == WARN for c in result.checks)
    failed = [c.title for c in result.checks if c.status == FAIL]
    why = "" if exit_code == 0 else \
        (f" (failed: {', '.join(failed)})" if failed else " (a check warned and --fail-on warn is set)")
    out.print(f"{fails} failed, {warns} warned, {len(result.checks) - fails - warns} passed: exit code "
              f"{exit_code}{why}; {result.timings.get('total', 0.0):.1f} s of checks")

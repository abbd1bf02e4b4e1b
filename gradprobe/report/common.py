"""What every report shares: number formatting, the checkpoint block, and the optimizer step in words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import GradprobeError
from ..files import write_atomic


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or x != x:
        return "n/a"
    x = x + 0.0  # -0.0 prints as 0: a sign without a magnitude is noise
    return f"{x:.{digits}e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.{digits}g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def render_checkpoint(out: Console, info: Any) -> None:
    """One block on what was read from the training run (a CheckpointInfo), or nothing."""
    if info is None:
        return
    step = f"step {info.global_step}" if info.global_step is not None else f"Adam step {info.adam_step}"
    where = info.path or info.optimizer_state
    out.print(f"checkpoint {where}: {step}; next learning rate {fmt(info.learning_rate)} from "
              f"{info.learning_rate_source}; base {info.base_model} (from {info.base_model_source})", soft_wrap=True)
    for line in settings_lines(getattr(info, "settings", {})):
        out.print(line, soft_wrap=True, markup=False)
    for note in info.notes:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def settings_lines(settings: dict[str, dict[str, Any]]) -> list[str]:
    """The run's settings by where they came from: 'read from training_args.bin: probe.loss_type dapo, ...',
    then one line for each setting given (--set) or assumed, with why."""
    read: dict[str, list[str]] = {}
    other: list[str] = []
    for key, entry in settings.items():
        kind, _, why = entry["source"].partition(": ")
        if kind == "read":
            read.setdefault(why.split(" (")[0], []).append(f"{key} {entry['value']}")
        else:
            other.append(f"  {kind}: {key} {entry['value']} ({why})")
    return [f"  read from {where}: {', '.join(items)}" for where, items in read.items()] + other


def assumed_stack_words(assumed: dict[str, Any] | None) -> str | None:
    """The stack settings the run did not record, for a report's headline; None when every one was read."""
    if not assumed:
        return None
    keys = ", ".join(f"{k} {v}" for k, v in assumed.items())
    first = next(iter(assumed))
    return (f"ASSUMED, not read from the run: {keys}. The numbers describe this stack; if the run loaded "
            f"another, say so with --set (e.g. --set {first}=...)")


def step_words(step: dict[str, Any]) -> str:
    """'AdamW lr 1e-05, betas (0.9, 0.999), eps 1e-08, weight decay 0.01, step 4, no clipping'."""
    if not step:
        return "n/a"
    bits = [f"{step['optimizer']} lr {fmt(step['lr'], 3)}"]
    if step.get("family") == "adam":
        bits.append(f"betas ({step['betas'][0]:g}, {step['betas'][1]:g}), eps {step['eps']:g}")
        if step.get("amsgrad"):
            bits.append("amsgrad")
    bits.append(f"weight decay {step['weight_decay']:g}, step {step['step']}")
    clip = step.get("max_grad_norm")
    bits.append(f"max_grad_norm {clip:g}" if clip is not None else "no clipping")
    return ", ".join(bits)


def step_provenance(step: dict[str, Any]) -> list[str]:
    """'read: ...', 'given: ...', 'assumed: ...' lines, each with the fields it covers."""
    kinds: dict[str, dict[str, list[str]]] = {}
    for key, text in step.get("sources", {}).items():
        kind, _, why = text.partition(": ")
        kinds.setdefault(kind, {}).setdefault(why, []).append(key)
    return [f"{kind} {', '.join(keys)}: {why}" for kind in ("read", "given", "assumed")
            for why, keys in kinds.get(kind, {}).items()]


def pyplot(option: str):
    """matplotlib.pyplot with the file-only Agg backend, or the one-line error naming the optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise GradprobeError(f"{option} needs matplotlib: pip install 'gradprobe[plot]'") from exc
    return plt


def write_png(fig, path: str | Path) -> None:
    """A figure to PNG atomically (files.write_atomic), closed whatever happens."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"), "the plot")
    finally:
        plt.close(fig)

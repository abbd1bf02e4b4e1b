"""What every subcommand shares: options, consoles, error handling and JSON output."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import load_config
from ..errors import CheckFailed, GradprobeError

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).",
                                                   show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Dotted override key=value; repeatable.",
                                                     show_default=False)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the config's).",
                                                show_default=False)]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the result as JSON to PATH, or '-' for stdout.",
                                                show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No table and no progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")]
RolloutsOpt = Annotated[Path | None, typer.Option("--rollouts", help="Teacher-force this rollouts JSONL file "
                                                     "instead of generating (same as --set batch.rollouts=PATH).",
                                                     show_default=False)]

CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="Probe the step this run is about to take: a checkpoint directory written by the "
    "transformers Trainer (adapter, optimizer.pt, scheduler.pt, trainer_state.json), or a PEFT adapter directory "
    "with --optimizer-state. The base model comes from adapter_config.json unless model.name_or_path is set.",
    show_default=False)]
OptimizerStateOpt = Annotated[Path | None, typer.Option(
    "--optimizer-state", help="Adam/AdamW optimizer state_dict file (torch.save); a scheduler.pt beside it gives "
    "the learning rate.", show_default=False)]


def consoles(quiet: bool, json_to_stdout: bool) -> tuple[Console, Console]:
    """stdout for the report, stderr for progress and errors; plain when NO_COLOR is set or not a TTY."""
    no_color = bool(os.environ.get("NO_COLOR"))
    out = Console(no_color=no_color, quiet=quiet or json_to_stdout, highlight=False)
    err = Console(stderr=True, no_color=no_color, highlight=False)
    return out, err


def make_config(config: Path | None, overrides: list[str] | None, seed: int | None,
                rollouts: Path | None = None) -> dict[str, Any]:
    sets = list(overrides or [])
    if rollouts is not None:
        sets.append(f"batch.rollouts={rollouts}")
    return load_config(config, sets, seed)


def apply_checkpoint(cfg: dict[str, Any], checkpoint: Path | None, optimizer_state: Path | None):
    """--checkpoint / --optimizer-state as config keys; returns (cfg, CheckpointInfo or None)."""
    if checkpoint is None and optimizer_state is None:
        return cfg, None
    from ..trainer_checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, cfg, optimizer_state)


def _clean(value: Any) -> Any:
    """JSON has no NaN or Infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def emit(out: Console, ckpt: Any, render: Callable[[], None], payload: dict[str, Any], target: str | None) -> None:
    """What the training run gave (if a checkpoint was read), the command's own rendering, then the JSON."""
    from ..report import render_checkpoint

    render_checkpoint(out, ckpt)
    render()
    if ckpt is not None:
        payload["checkpoint"] = ckpt.to_dict()
    write_json(payload, target)


def write_json(payload: dict[str, Any], target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(_clean(payload), indent=2, allow_nan=False)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        try:
            Path(target).write_text(text + "\n")
        except OSError as exc:
            raise GradprobeError(f"cannot write JSON to {target}: {exc.strerror}") from exc


@contextmanager
def progress_bar(err: Console, enabled: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A bar on stderr over units, shown only on a terminal."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def guarded(debug: bool, err: Console, body: Callable[[], int]) -> None:
    """Run a command body; map errors to one line and an exit code (2 bad input, 1 check failed)."""
    try:
        code = body()
    except GradprobeError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except CheckFailed as exc:
        err.print(f"[bold red]check failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug of ours or of a library: one line, details with --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {first} (rerun with --debug for the "
                  f"traceback)", soft_wrap=True)
        raise typer.Exit(3) from None
    raise typer.Exit(code)

"""What every subcommand shares: options, consoles, error handling and JSON output."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import Config, load_config, parse_override
from ..errors import CheckFailed, GradprobeError, Interrupted, is_out_of_memory
from ..files import check_outputs, write_atomic
from ..runs import Tracker

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).",
                                                   show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Dotted override key=value; repeatable.",
                                                     show_default=False)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the config's).",
                                                show_default=False)]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the result as JSON to PATH, or '-' for stdout.",
                                                show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No table and no progress bar.", metavar="")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.", metavar="")]
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


# One table of exit codes (README "Scripts and exit codes"); `gradprobe --help` prints it too.
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OUT_OF_MEMORY = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED_EARLY = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_CODES = {
    EXIT_OK: "done (diagnose: no check failed, or --exit-zero)",
    EXIT_CHECK_FAILED: "diagnose: a check failed (or warned, with --fail-on warn)",
    EXIT_BAD_INPUT: "bad input or usage: one line on stderr, nothing written",
    EXIT_INTERNAL: "internal error: one line on stderr (--debug adds the traceback)",
    EXIT_INTERRUPTED: 'interrupted by SIGTERM or SIGINT: a partial result ("complete": false) was written',
    EXIT_OUT_OF_MEMORY: "out of memory: the line names the probe.microbatch_size to try next",
    EXIT_INTERRUPTED_EARLY: "interrupted by SIGINT before the work began (inputs still being read): nothing "
                            "written (128 + the signal: 143 for SIGTERM)",
}
WIDE = 200  # columns when stdout is not a terminal: a pipe or a log file has no width to wrap to


def consoles(quiet: bool, json_to_stdout: bool) -> tuple[Console, Console]:
    """stdout for the report, stderr for progress and errors; plain when NO_COLOR is set or not a TTY.
    Not on a terminal (and no COLUMNS), nothing wraps at 80 columns: a fix or a code line piped to a file
    must stay one piece that can be copied."""
    from .. import distributed  # torch: only once a command runs

    no_color = bool(os.environ.get("NO_COLOR"))
    other_rank = not distributed.is_main()  # under torchrun rank 0 alone prints (and names a failing rank)
    quiet = quiet or json_to_stdout or other_rank
    out = Console(no_color=no_color, quiet=quiet, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(no_color=no_color, quiet=quiet, highlight=False, width=WIDE, soft_wrap=True)
    err = Console(stderr=True, no_color=no_color, highlight=False, soft_wrap=True, quiet=other_rank)
    return out, err


def make_config(config: Path | None, overrides: list[str] | None, seed: int | None,
                rollouts: Path | None = None) -> dict[str, Any]:
    sets = list(overrides or [])
    if rollouts is not None:
        sets.append(f"batch.rollouts={rollouts}")
    return load_config(config, sets, seed)


def apply_checkpoint(cfg: Config, checkpoint: Path | None, optimizer_state: Path | None,
                     overrides: list[str] | None = None):
    """--checkpoint / --optimizer-state as config keys; returns (cfg, CheckpointInfo or None). The keys of
    `overrides` (--set) win over the run's settings the checkpoint records."""
    if checkpoint is None and optimizer_state is None:
        return cfg, None
    from ..trainer_checkpoint import load_checkpoint

    given = {parse_override(text)[0] for text in overrides or []}
    return load_checkpoint(checkpoint, cfg, optimizer_state, given=given)


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
    from ..report.common import render_checkpoint

    render_checkpoint(out, ckpt)
    render()
    if ckpt is not None:
        payload["checkpoint"] = ckpt.to_dict()
    write_json({**payload, "complete": True}, target)


def write_json(payload: dict[str, Any], target: str | None) -> None:
    """To stdout ('-') or atomically to a file (files.write_atomic): a crash leaves the previous file.
    Under torchrun rank 0 alone writes."""
    from .. import distributed

    if target is None or not distributed.is_main():
        return
    text = json.dumps(_clean(payload), indent=2, allow_nan=False)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        write_atomic(target, text + "\n", "JSON")


def check_paths(outputs: dict[str, str | Path | None], cfg: Config | None = None,
                extra_inputs: tuple[str | Path | None, ...] = (), probe: bool = True) -> None:
    """Every output path writable and none of them an input and, with a config, every input it names
    opened and checked (inputs.check_inputs): all before the model loads."""
    if cfg is None:
        check_outputs(outputs, extra_inputs)
        return
    from ..inputs import check_inputs

    check_inputs(cfg, outputs, extra_inputs, probe=probe)


@dataclass
class Run(Tracker):
    """How far a command got: what an interruption or an out-of-memory error reports and writes."""

    command: str = ""
    json_target: str | None = None
    cfg: Config | None = None
    state_dir: str | None = None
    what: str = "units"  # what progress counts (validate: the points of its sweep)

    def done(self) -> str:
        units = f", {self.units_done}/{self.units} {self.what} done" if self.units else ""
        return f"{self.stage}{units}"

    def partial(self, signame: str) -> dict[str, Any]:
        if self.state_dir is not None and self.stage == "probe":  # the units a resumed run will not recompute
            self.units_done = len(list(Path(self.state_dir).glob("unit-*.pt")))
        return {"schema": PARTIAL_SCHEMA, "command": self.command, "complete": False, "interrupted_by": signame,
                "config": self.cfg.to_dict() if self.cfg else None,
                "progress": {"stage": self.stage, "units_done": self.units_done, "units": self.units},
                "resume": {"state_dir": self.state_dir, **self.facts} if self.state_dir else None}


@dataclass
class Inputs:
    """The options every probing command takes: where the configuration, the batch and the training run come
    from, and where the result goes."""

    config: Path | None = None
    set_: list[str] | None = None
    seed: int | None = None
    rollouts: Path | None = None
    checkpoint: Path | None = None
    optimizer_state: Path | None = None
    json_: str | None = None
    quiet: bool = False
    debug: bool = False

    def consoles(self) -> tuple[Console, Console]:
        return consoles(self.quiet, self.json_ == "-")

    def given(self) -> list[str]:
        """The configuring options given, by flag (a resumed run refuses them)."""
        return [flag for flag, v in (("--config", self.config), ("--set", self.set_), ("--seed", self.seed),
                                     ("--rollouts", self.rollouts), ("--checkpoint", self.checkpoint),
                                     ("--optimizer-state", self.optimizer_state)) if v]

    def load(self, base: list[str] | tuple[str, ...] = (), outputs: dict[str, str | Path | None] | None = None,
             values: dict[str, Any] | None = None, probe: bool = True):
        """(cfg, CheckpointInfo or None): the config with the run's checkpoint applied, every input checked and
        every output path tried, all before the model loads. `base`: overrides under the user's --set;
        `values`: the command's own options as config keys, over everything; `probe`: see check_inputs."""
        cfg, ckpt = apply_checkpoint(make_config(self.config, [*base, *(self.set_ or [])], self.seed, self.rollouts),
                                     self.checkpoint, self.optimizer_state, self.set_)
        if values:
            cfg = cfg.with_values(values)
        check_paths({"--json": self.json_, **(outputs or {})}, cfg, (self.config, self.checkpoint,
                                                                   self.optimizer_state), probe=probe)
        return cfg, ckpt


_FIRST = (("config", ConfigOpt, None), ("set_", SetOpt, None), ("seed", SeedOpt, None),
          ("rollouts", RolloutsOpt, None), ("checkpoint", CheckpointOpt, None),
          ("optimizer_state", OptimizerStateOpt, None))
_LAST = (("json_", JsonOpt, None), ("quiet", QuietOpt, False), ("debug", DebugOpt, False))


def with_inputs(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared options (Inputs) around its own, so that each is declared once: Typer reads
    the signature built here; the command receives `inputs` and its own options."""
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "inputs"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in (*_FIRST, *_LAST)]
    params = [*shared[:len(_FIRST)], *own, *shared[len(_FIRST):]]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        inputs = Inputs(**{name: kwargs.pop(name) for name, _, _ in (*_FIRST, *_LAST)})
        fn(inputs, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


PARTIAL_SCHEMA = "gradprobe.partial/1"


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise Interrupted in the main thread, so the command can write what it has."""
    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave the process's handlers alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


PROGRESS_EVERY_S = 5.0  # off a terminal: at most one progress line this often within a stage
PROGRESS_LINE = re.compile(r"^gradprobe [\w-]+ \[ *\d+\.\d s\] ")  # what a log filter (or a test) can skip


class PlainProgress:
    """Progress for a log (CI, SLURM, a pipe): one plain stderr line when a stage begins and, within a stage,
    at most one every PROGRESS_EVERY_S seconds with the units done (and the last one)."""

    def __init__(self, err: Console, command: str, what: str, every: float = PROGRESS_EVERY_S):
        self.err, self.command, self.what, self.every = err, command, what, every
        self.t0 = time.monotonic()
        self.last = -math.inf
        self.stage_name = "starting"

    def _line(self, text: str) -> None:
        self.err.print(f"gradprobe {self.command} [{time.monotonic() - self.t0:6.1f} s] {text}", markup=False,
                       highlight=False)

    def stage(self, name: str) -> None:
        self.stage_name = name
        self.last = time.monotonic()
        self._line(name)

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or done == total:
            self.last = now
            self._line(f"{self.stage_name}: {done}/{total} {self.what}")


@contextmanager
def progress_bar(err: Console, enabled: bool, label: str,
                 run: Run | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A bar on stderr over units on a terminal; off a terminal plain lines (PlainProgress), each stage of
    `run` announced as it begins."""
    if not enabled:
        yield None
        return
    if not err.is_terminal:
        lines = PlainProgress(err, run.command if run is not None and run.command else "run",
                              run.what if run is not None else "units")
        if run is not None:
            run.on_stage = lines.stage
        try:
            yield lines.update
        finally:
            if run is not None:
                run.on_stage = None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task(label, total=None)
        if run is not None:  # the stage in the label until the units begin: not "0/?" for a minute
            run.on_stage = lambda name: prog.update(task, description=f"{label}: {name}")

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        try:
            yield update
        finally:
            if run is not None:
                run.on_stage = None


def _oom_hint(run: Run | None) -> str:
    mb = run.cfg.probe.microbatch_size if run is not None and run.cfg is not None else None
    if isinstance(mb, int) and mb > 1:
        return f"at probe.microbatch_size={mb}; try --set probe.microbatch_size={mb // 2}"
    return ("at probe.microbatch_size=1; try --set probe.accumulate_on=cpu, probe.mode=blocks, shorter responses "
            "or fewer prompts")


def _interruption_inside(exc: BaseException) -> Interrupted | None:
    """The signal behind an exception that a library raised while handling it (its cause or context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(exc: Interrupted, err: Console, run: Run | None) -> int:
    """Write the partial result (to --json and into the state directory), say where, return exit code 4.
    Before the work began (inputs still being checked) nothing is written: 128 + the signal's number."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the partial file short
        with contextlib.suppress(ValueError):
            signal.signal(sig, signal.SIG_IGN)
    if run is None or run.stage == "starting":
        err.print(f"interrupted by {exc.signame} before the work began; nothing written", markup=False,
                  highlight=False)
        return 128 + int(signal.Signals[exc.signame])
    where: list[str] = []
    if run is not None:
        payload = run.partial(exc.signame)
        with contextlib.suppress(GradprobeError):
            if run.state_dir is not None and Path(run.state_dir).is_dir():
                write_json(payload, str(Path(run.state_dir) / "partial.json"))
                where.append(str(Path(run.state_dir) / "partial.json"))
            if run.json_target is not None:
                write_json(payload, run.json_target)
                where.append("stdout" if run.json_target == "-" else run.json_target)
    saved = f"; partial result in {', '.join(where)}" if where else "; no --json given, nothing written"
    resume = (f"; continue with: gradprobe {run.command} --resume {run.state_dir}"
              if run is not None and run.state_dir else "")
    err.print(f"interrupted by {exc.signame} during {run.done() if run else 'the run'}{saved}{resume}",
              markup=False, highlight=False)
    return EXIT_INTERRUPTED


def guarded(debug: bool, err: Console, body: Callable[[], int], run: Run | None = None) -> None:
    """Run a command body; map errors to one line and an exit code (EXIT_CODES). --debug adds the traceback
    on stderr and keeps the code."""
    finished = False
    try:
        with signals_interrupt():
            code = body()
        finished = True
    except GradprobeError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except CheckFailed as exc:
        err.print(f"[bold red]check failed:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_CHECK_FAILED) from None
    except Interrupted as exc:
        raise typer.Exit(_interrupted(exc, err, run)) from None
    except KeyboardInterrupt:  # outside the handler's reach (another thread's signal setup)
        raise typer.Exit(_interrupted(Interrupted("SIGINT"), err, run)) from None
    except Exception as exc:  # a bug of ours or of a library: one line, details with --debug
        cause = _interruption_inside(exc)
        if cause is not None:  # a library turned the signal into its own error (transformers' lazy imports)
            raise typer.Exit(_interrupted(cause, err, run)) from None
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if is_out_of_memory(exc):
            err.print(f"[bold red]out of memory[/] during {run.done() if run else 'the run'} "
                      f"{_oom_hint(run)}: {escape(first[:200])}")
            raise typer.Exit(EXIT_OUT_OF_MEMORY) from None
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first)} (rerun with --debug for the "
                  f"traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None
    finally:
        if "gradprobe.distributed" in sys.modules:  # leave a torchrun process group cleanly
            sys.modules["gradprobe.distributed"].shutdown(finished)
    raise typer.Exit(code)

"""`gradprobe diagnose`: gradient-flow checks, a differential experiment and a root-cause verdict."""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated

import typer

from .common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CheckpointOpt,
    ConfigOpt,
    DebugOpt,
    JsonOpt,
    OptimizerStateOpt,
    QuietOpt,
    RolloutsOpt,
    Run,
    SeedOpt,
    SetOpt,
    apply_checkpoint,
    check_paths,
    consoles,
    emit,
    guarded,
    make_config,
)

EPILOG = """Exit codes: 0 no check failed (or --exit-zero), 1 a check failed (or warned, with --fail-on warn),
2 bad input, 3 internal error, 4 interrupted, 5 out of memory.

The embedded default exits 1 on purpose: reentrant checkpointing breaks autograd.grad there
(--exit-zero: 0 once the diagnosis completed).

The verdict then also says whether the backward() probe path (delta-h1) is healthy.

Examples:

  gradprobe diagnose

  gradprobe diagnose --set checkpointing=non_reentrant

  gradprobe diagnose --config configs/qwen2.5-1.5b-qlora.yaml --rollouts batch.jsonl --json report.json

  gradprobe diagnose --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl
"""


class FailOn(str, Enum):
    fail = "fail"
    warn = "warn"


def command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: SeedOpt = None,
    rollouts: RolloutsOpt = None,
    checkpoint: CheckpointOpt = None,
    optimizer_state: OptimizerStateOpt = None,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 on any FAIL (default) or on any WARN too.",
                                            case_sensitive=False)] = FailOn.fail,
    exit_zero: Annotated[bool, typer.Option(
        "--exit-zero", help="Exit 0 when the diagnosis ran to its verdict, whatever the checks found (the JSON's "
        "exit_code still says 1); bad input, errors and interruptions keep their codes.")] = False,
    json_: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find why gradients do not flow: strict autograd.grad, S alive, parameter identity, coverage, the stack."""
    out, err = consoles(quiet, json_ == "-")
    run = Run("diagnose", json_)

    def body() -> int:
        from ..api import build_batch  # heavy imports (torch) only when the command runs
        from ..diagnose import diagnose
        from ..diagnose.core import load_optimizer_state
        from ..report.diagnose import payload, render
        from ..stack import load_stack

        cfg, ckpt = apply_checkpoint(make_config(config, set_, seed, rollouts), checkpoint, optimizer_state, set_)
        check_paths({"--json": json_}, cfg, (config, checkpoint, optimizer_state))
        run.cfg = cfg
        state, source = load_optimizer_state(cfg)  # a bad path fails now, not after the model load
        run.stage = "model load"
        t0 = time.perf_counter()
        stack = load_stack(cfg)
        t1 = time.perf_counter()
        run.stage = "batch"
        batch = build_batch(stack, cfg)
        t2 = time.perf_counter()
        run.stage = "checks"
        if not quiet and err.is_terminal:
            err.print(f"[dim]stack {t1 - t0:.1f} s, batch {t2 - t1:.1f} s; running checks[/]")
        result = diagnose(stack=stack, batch=batch, cfg=cfg, optimizer_state=state,
                          optimizer_source=source or "optimizer state_dict")
        result.timings.update(stack=t1 - t0, batch=t2 - t1)
        code = result.exit_code(fail_on.value)
        run.stage = "report"
        emit(out, ckpt, lambda: render(out, result, code), payload(result, cfg, code), json_)
        if exit_zero and code == EXIT_CHECK_FAILED and not quiet:
            out.print(f"diagnosis complete; --exit-zero: exit code 0 instead of {code}")
        return EXIT_OK if exit_zero else code

    guarded(debug, err, body, run)

"""`gradprobe diagnose`: gradient-flow checks, a differential experiment and a root-cause verdict."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from .common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Inputs,
    Run,
    emit,
    guarded,
    progress_bar,
    with_inputs,
)

EPILOG = """Exit codes: 0 no check failed (or --exit-zero), 1 a check failed (or warned, with --fail-on warn),
2 bad input, 3 internal error, 4 interrupted, 5 out of memory, 130 interrupted before the work began.

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


@with_inputs
def command(
    inputs: Inputs,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 on any FAIL (default) or on any WARN too.",
                                            case_sensitive=False)] = FailOn.fail,
    exit_zero: Annotated[bool, typer.Option(
        "--exit-zero", help="Exit 0 when the diagnosis ran to its verdict, whatever the checks found (the JSON's "
        "exit_code still says 1); bad input, errors and interruptions keep their codes.", metavar="")] = False,
) -> None:
    """Find why gradients do not flow: strict autograd.grad, S alive, parameter identity, coverage, the stack."""
    out, err = inputs.consoles()
    run = Run(command="diagnose", json_target=inputs.json_)

    def body() -> int:
        from ..report.diagnose import payload, render
        from ..runs import run_diagnose

        cfg, ckpt = inputs.load(probe=False)
        run.cfg = cfg
        announce = (lambda line: err.print(f"[dim]{line}[/]")) if not inputs.quiet and err.is_terminal else None
        with progress_bar(err, not inputs.quiet and not err.is_terminal, "diagnose", run):  # a log's stage lines
            result = run_diagnose(cfg, tracker=run, announce=announce)
        code = result.exit_code(fail_on.value)
        run.stage = "report"
        assumed = ckpt.assumed_stack() if ckpt is not None else None
        emit(out, ckpt, lambda: render(out, result, code, assumed), payload(result, cfg, code), inputs.json_)
        if exit_zero and code == EXIT_CHECK_FAILED and not inputs.quiet:
            out.print(f"diagnosis complete; --exit-zero: exit code 0 instead of {code}")
        return EXIT_OK if exit_zero else code

    guarded(inputs.debug, err, body, run)

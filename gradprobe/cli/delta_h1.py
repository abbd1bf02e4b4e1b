"""`gradprobe delta-h1`: the backward()-only probe of the first-order entropy change."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CheckpointOpt,
    ConfigOpt,
    DebugOpt,
    JsonOpt,
    OptimizerStateOpt,
    QuietOpt,
    RolloutsOpt,
    SeedOpt,
    SetOpt,
    apply_checkpoint,
    consoles,
    emit,
    guarded,
    make_config,
    progress_bar,
)

EPILOG = """Examples:

  gradprobe delta-h1

  gradprobe delta-h1 --set probe.schedule=literal --set probe.microbatch_size=2

  gradprobe delta-h1 --config configs/qwen2.5-1.5b-qlora.yaml --rollouts batch.jsonl --json result.json

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl --entropy-rollouts other.jsonl
"""


def command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: SeedOpt = None,
    rollouts: RolloutsOpt = None,
    checkpoint: CheckpointOpt = None,
    optimizer_state: OptimizerStateOpt = None,
    save_rollouts: Annotated[Path | None, typer.Option("--save-rollouts", help="Write the batch used as JSONL.",
                                                          show_default=False)] = None,
    entropy_rollouts: Annotated[Path | None, typer.Option(
        "--entropy-rollouts", help="An independent entropy batch (JSONL, same policy, other samples): deltaH = "
        "-mean X_E . step, no U-statistic (sets probe.entropy_batch=independent).", show_default=False)] = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predict how much the next optimizer step changes the policy's entropy (deltaH, the step the run's
    optimizer will take: momentum, weight decay, clipping) with an SE; deltaH1 (the plain step) beside it."""
    out, err = consoles(quiet, json_ == "-")

    def body() -> int:
        from ..api import (  # heavy imports (torch) only when the command runs
            build_batch,
            delta_h1,
            live_preconditioner,
            preconditioner,
            warm_up,
            warmup_steps,
        )
        from ..report import delta_h1_payload, render_delta_h1
        from ..rollouts import write_rollouts
        from ..stack import load_stack

        cfg, ckpt = apply_checkpoint(make_config(config, set_, seed, rollouts), checkpoint, optimizer_state)
        if entropy_rollouts is not None:
            cfg["batch"]["entropy_rollouts"], cfg["probe"]["entropy_batch"] = str(entropy_rollouts), "independent"
        t0 = time.perf_counter()
        stack = load_stack(cfg)
        precond = preconditioner(stack, cfg)  # a mismatched optimizer state fails here, before sampling
        tw = time.perf_counter()
        optimizer, warm = None, warmup_steps(cfg)
        if warm:  # the embedded default: a few real AdamW steps, so that the step has momentum to show
            optimizer = warm_up(stack, cfg, warm)
            precond = live_preconditioner(stack, optimizer, cfg, f"the AdamW of {warm} warm-up steps")
        t1 = time.perf_counter()
        batch = build_batch(stack, cfg)
        t2 = time.perf_counter()
        if save_rollouts is not None:
            write_rollouts(batch, save_rollouts)
        with progress_bar(err, not quiet, "probing units") as progress:
            result = delta_h1(stack, batch, cfg, progress=progress, precond=precond, optimizer=optimizer)
        result.warmup_steps = warm
        result.timings.update(stack=tw - t0, batch=t2 - t1)
        if warm:
            result.timings["warm-up"] = t1 - tw
        emit(out, ckpt, lambda: render_delta_h1(out, result, cfg), delta_h1_payload(result, cfg), json_)
        return 0

    guarded(debug, err, body)

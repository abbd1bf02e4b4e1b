"""`gradprobe validate`: delta-H1 against the entropy change an update really causes."""

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
    Run,
    SeedOpt,
    SetOpt,
    apply_checkpoint,
    check_paths,
    consoles,
    emit,
    guarded,
    make_config,
    progress_bar,
)

EPILOG = ("Without --config or --checkpoint it runs on the micro ground-truth model (configs/micro.yaml): every "
          "response is enumerated, so the entropy change is exact. Otherwise the truth is exact when the model is "
          "small enough (validate.max_enumerate), else importance-sampled."
          """

Examples:

  gradprobe validate

  gradprobe validate --set validate.points=9 --set validate.step_max=0.1 --plot sweep.png

  gradprobe validate --config configs/tiny.yaml --set autocast=off --set quant.compute_dtype=float32 --json r.json

  gradprobe validate --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl --set autocast=off
""")


def command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: SeedOpt = None,
    rollouts: RolloutsOpt = None,
    checkpoint: CheckpointOpt = None,
    optimizer_state: OptimizerStateOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also save a log-log plot as PNG (needs matplotlib).",
                                                 show_default=False)] = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Step along the batch's real optimizer step (or the plain step, validate.direction=plain) and compare the
    true entropy change with the probe's prediction."""
    out, err = consoles(quiet, json_ == "-")
    run = Run("validate", json_, what="points")

    def body() -> int:
        from ..api import warm_up, warmup_steps
        from ..report.validate import render_validate, save_plot, validate_payload
        from ..stack import load_stack
        from ..validate import GROUND_TRUTH, check_config, run_validate

        # the micro ground-truth model unless the user names a model (a config file or a training run)
        base = list(GROUND_TRUTH) if config is None and checkpoint is None else []
        cfg, ckpt = apply_checkpoint(make_config(config, [*base, *(set_ or [])], seed, rollouts), checkpoint,
                                     optimizer_state, set_)
        check_config(cfg)
        check_paths({"--json": json_, "--plot": plot}, cfg, (config, checkpoint, optimizer_state))
        run.cfg = cfg
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                from ..errors import GradprobeError

                raise GradprobeError("--plot needs matplotlib (pip install matplotlib, or the extra 'plot')") from None
        run.stage = "model load"
        t0 = time.perf_counter()
        stack = load_stack(cfg)
        t1 = time.perf_counter()
        optimizer, warm = None, warmup_steps(cfg)
        if warm:  # as delta-h1 does: a few real AdamW steps, so that the real step has momentum
            run.stage = "warm-up"
            optimizer = warm_up(stack, cfg, warm)
        t2 = time.perf_counter()
        run.stage = "sweep"
        with progress_bar(err, not quiet, "sweeping eta") as bar:
            result = run_validate(stack, cfg, progress=run.progress(bar), optimizer=optimizer)
        run.stage = "report"
        result.timings = {"stack": t1 - t0, **({"warm-up": t2 - t1} if warm else {}), **result.timings}
        emit(out, ckpt, lambda: render_validate(out, result), validate_payload(result, cfg), json_)
        if plot is not None:
            save_plot(result, plot)
        return 0

    guarded(debug, err, body, run)

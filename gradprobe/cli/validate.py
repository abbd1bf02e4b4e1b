"""`gradprobe validate`: delta-H1 against the entropy change an update really causes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    Inputs,
    Run,
    emit,
    guarded,
    progress_bar,
    with_inputs,
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


@with_inputs
def command(
    inputs: Inputs,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also save a log-log plot as PNG (needs matplotlib).",
                                                 show_default=False)] = None,
) -> None:
    """Step along the batch's real optimizer step (or the plain step, validate.direction=plain) and compare the
    true entropy change with the probe's prediction."""
    out, err = inputs.consoles()
    run = Run(command="validate", json_target=inputs.json_, what="points")

    def body() -> int:
        from ..report.validate import render_validate, save_plot, validate_payload
        from ..runs import run_validate
        from ..validate import GROUND_TRUTH, check_config

        # the micro ground-truth model unless the user names a model (a config file or a training run)
        base = list(GROUND_TRUTH) if inputs.config is None and inputs.checkpoint is None else []
        cfg, ckpt = inputs.load(base, {"--plot": plot})
        check_config(cfg)
        run.cfg = cfg
        if plot is not None:
            from ..report.common import pyplot

            pyplot("--plot")  # missing matplotlib is exit 2 before any work
        with progress_bar(err, not inputs.quiet, "sweeping eta", run) as bar:
            result = run_validate(cfg, tracker=run, progress=bar)
        run.stage = "report"
        emit(out, ckpt, lambda: render_validate(out, result), validate_payload(result, cfg), inputs.json_)
        if plot is not None:
            save_plot(result, plot)
        return 0

    guarded(inputs.debug, err, body, run)

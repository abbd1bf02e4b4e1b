"""`gradprobe delta-h1`: the backward()-only probe of the first-order entropy change."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import Config
from ..errors import GradprobeError
from .common import (
    Inputs,
    Run,
    check_paths,
    emit,
    guarded,
    progress_bar,
    with_inputs,
)

EPILOG = """Examples:

  gradprobe delta-h1

  gradprobe delta-h1 --set probe.schedule=literal --set probe.microbatch_size=2

  gradprobe delta-h1 --config configs/qwen2.5-1.5b-qlora.yaml --rollouts batch.jsonl --json result.json

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl --entropy-rollouts other.jsonl

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts step-501.jsonl --save-update step.safetensors

  gradprobe delta-h1 --state run1/ --json r.json     # after a SIGTERM (exit 4): gradprobe delta-h1 --resume run1/
"""


@with_inputs
def command(
    inputs: Inputs,
    save_rollouts: Annotated[Path | None, typer.Option("--save-rollouts", help="Write the batch used as JSONL.",
                                                          show_default=False)] = None,
    entropy_rollouts: Annotated[Path | None, typer.Option(
        "--entropy-rollouts", help="An independent entropy batch (JSONL, same policy, other samples): deltaH = "
        "-mean X_E . step, no U-statistic (sets probe.entropy_batch=independent).", show_default=False)] = None,
    save_update: Annotated[Path | None, typer.Option(
        "--save-update", help="Write the step deltaH describes (theta' - theta of the next optimizer step, as the "
        "run's dtype rounds it) as safetensors, under the adapter's own tensor names.", show_default=False)] = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="Keep each finished unit's gradients in this new directory (2 x trainable values x 4 bytes "
        "per unit) so that an interrupted run can continue with --resume.", show_default=False)] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue an interrupted run: its partial JSON or its --state directory. The "
        "configuration and the batch come from there; the result equals an uninterrupted run's.",
        show_default=False)] = None,
) -> None:
    """Predict how much the next optimizer step changes the policy's entropy (deltaH, the step the run's
    optimizer will take: momentum, weight decay, clipping) with an SE; deltaH1 (the plain step) beside it."""
    out, err = inputs.consoles()
    run = Run(command="delta-h1", json_target=inputs.json_)

    def body() -> int:
        from .. import distributed
        from ..report.delta_h1 import delta_h1_payload, render_delta_h1
        from ..resume import prepare_state_dir, read_resume
        from ..runs import run_delta_h1

        outputs = {"--save-rollouts": save_rollouts, "--save-update": save_update}
        if distributed.launched() and (state is not None or resume is not None):
            raise GradprobeError(distributed.NO_RESUME)
        if resume is not None:
            given = inputs.given() + [flag for flag, v in (("--entropy-rollouts", entropy_rollouts),
                                                             ("--state", state)) if v]
            if given:
                raise GradprobeError(f"--resume continues a run as it was configured; drop {', '.join(given)}")
            state_dir, stored = read_resume(resume)
            cfg, ckpt = Config.from_dict(stored, str(state_dir / "meta.json")), None
            # the partial JSON given to --resume may be replaced by the final result
            # the batch is read back from the state directory: the config's files are guarded, not re-read
            check_paths({"--json": inputs.json_, **outputs}, None,
                        (state_dir / "meta.json", cfg.batch.rollouts, cfg.batch.entropy_rollouts,
                         cfg.probe.optimizer_state, cfg.lora.adapter_path, cfg.model.name_or_path))
        else:
            cfg, ckpt = inputs.load(outputs=outputs, values={"batch.entropy_rollouts": str(entropy_rollouts),
                                                             "probe.entropy_batch": "independent"}
                                    if entropy_rollouts is not None else None)
            state_dir = prepare_state_dir(state, cfg) if state is not None else None
        run.cfg, run.state_dir = cfg, (str(state_dir) if state_dir is not None else None)
        with progress_bar(err, not inputs.quiet, "probing units", run) as bar:
            result = run_delta_h1(cfg, state_dir=state_dir, save_rollouts=save_rollouts, tracker=run, progress=bar,
                                  save_update=save_update)
        clip_source = ckpt.source("probe.max_grad_norm") if ckpt is not None else None
        if clip_source and result.step.get("sources"):  # read from training_args.bin, or given over it
            result.step["sources"]["max_grad_norm"] = clip_source
        run.stage = "report"
        assumed = ckpt.assumed_stack() if ckpt is not None else None
        emit(out, ckpt, lambda: render_delta_h1(out, result, assumed=assumed), delta_h1_payload(result, cfg),
             inputs.json_)
        return 0

    guarded(inputs.debug, err, body, run)

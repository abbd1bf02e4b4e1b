"""`gradprobe delta-h1`: the backward()-only probe of the first-order entropy change."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..config import config_from_dict
from ..errors import GradprobeError
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

EPILOG = """Examples:

  gradprobe delta-h1

  gradprobe delta-h1 --set probe.schedule=literal --set probe.microbatch_size=2

  gradprobe delta-h1 --config configs/qwen2.5-1.5b-qlora.yaml --rollouts batch.jsonl --json result.json

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl

  gradprobe delta-h1 --checkpoint outputs/checkpoint-500 --rollouts batch.jsonl --entropy-rollouts other.jsonl

  gradprobe delta-h1 --state run1/ --json r.json     # after a SIGTERM (exit 4): gradprobe delta-h1 --resume run1/
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
    state: Annotated[Path | None, typer.Option(
        "--state", help="Keep each finished unit's gradients in this new directory (2 x trainable values x 4 bytes "
        "per unit) so that an interrupted run can continue with --resume.", show_default=False)] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue an interrupted run: its partial JSON or its --state directory. The "
        "configuration and the batch come from there; the result equals an uninterrupted run's.",
        show_default=False)] = None,
    json_: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predict how much the next optimizer step changes the policy's entropy (deltaH, the step the run's
    optimizer will take: momentum, weight decay, clipping) with an SE; deltaH1 (the plain step) beside it."""
    out, err = consoles(quiet, json_ == "-")
    run = Run("delta-h1", json_)

    def body() -> int:
        from .. import distributed
        from ..api import (  # heavy imports (torch) only when the command runs
            build_batch,
            delta_h1,
            live_preconditioner,
            preconditioner,
            warm_up,
            warmup_steps,
        )
        from ..probe.engine import planned_units, units_of
        from ..report.delta_h1 import delta_h1_payload, render_delta_h1
        from ..resume import ROLLOUTS, UnitStore, fingerprint, prepare_state_dir, read_resume
        from ..rollouts import read_rollouts, write_rollouts
        from ..stack import load_stack

        if distributed.launched() and (state is not None or resume is not None):
            raise GradprobeError("--state and --resume keep one process's units: run a resumable probe without "
                                 "torchrun")
        if resume is not None:
            given = [name for name, v in (("--config", config), ("--set", set_), ("--seed", seed),
                                          ("--rollouts", rollouts), ("--checkpoint", checkpoint),
                                          ("--optimizer-state", optimizer_state), ("--state", state)) if v]
            if given:
                raise GradprobeError(f"--resume continues a run as it was configured; drop {', '.join(given)}")
            state_dir, stored = read_resume(resume)
            cfg, ckpt = config_from_dict(stored, str(state_dir / "meta.json")), None
            # the partial JSON given to --resume may be replaced by the final result
            check_paths({"--json": json_, "--save-rollouts": save_rollouts}, cfg, (state_dir / "meta.json",))
        else:
            cfg, ckpt = apply_checkpoint(make_config(config, set_, seed, rollouts), checkpoint, optimizer_state)
            check_paths({"--json": json_, "--save-rollouts": save_rollouts}, cfg, (config, checkpoint, optimizer_state))
            if state is not None and cfg["probe"]["schedule"] == "literal":
                raise GradprobeError("--state needs probe.schedule=packed, fused or one_backward: the literal schedule "
                                     "sums every unit before its per-unit loop, so it cannot resume")
            state_dir = prepare_state_dir(state, cfg) if state is not None else None
        if distributed.launched():  # torchrun: refused before the model loads, then join the process group
            distributed.check_units(planned_units(cfg))
            distributed.init()
        run.cfg, run.state_dir = cfg, (str(state_dir) if state_dir is not None else None)
        run.stage = "model load"
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
        run.stage = "batch"
        saved_batch = state_dir / ROLLOUTS if state_dir is not None else None
        if resume is not None and saved_batch.is_file():
            vocab = stack.model.get_input_embeddings().num_embeddings
            batch = read_rollouts(saved_batch, stack.tokenizer, vocab, temperature=cfg["batch"]["temperature"])
        else:
            batch = build_batch(stack, cfg)
        t2 = time.perf_counter()
        if save_rollouts is not None:
            write_rollouts(batch, save_rollouts)
        store = None
        if state_dir is not None:
            if not saved_batch.is_file():
                write_rollouts(batch, saved_batch)
            store = UnitStore(state_dir, fingerprint(cfg, batch, stack.params, precond.scales))
            run.facts = {"fingerprint": store.fingerprint, "units_saved": store.done()}
        run.stage, run.units = "probe", len(units_of(batch, cfg["probe"]["mode"], cfg["probe"]["block_size"]))
        with progress_bar(err, not quiet, "probing units") as bar:
            result = delta_h1(stack, batch, cfg, progress=run.progress(bar), precond=precond, store=store,
                              optimizer=optimizer)
        result.warmup_steps = warm
        result.timings.update(stack=tw - t0, batch=t2 - t1)
        if warm:
            result.timings["warm-up"] = t1 - tw
        run.stage = "report"
        emit(out, ckpt, lambda: render_delta_h1(out, result, cfg), delta_h1_payload(result, cfg), json_)
        return 0

    guarded(debug, err, body, run)

"""One library entry per command: a validated config in, a result out, the same path the CLI takes.

    from gradprobe import load_config, run_delta_h1, run_diagnose, run_validate
    result = run_delta_h1(load_config(overrides=["probe.microbatch_size=4"]))
    print(result.deltaH, result.se_deltaH)

Each entry loads the stack, builds the batch, runs the command's core and fills its timings; the CLI adds
only argument parsing, rendering and exit codes. A `Tracker` (optional) records the stage and the units
done, which is what an interruption reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GradprobeError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    """How far a run got: its stage and, within the stage, the units (or points) done."""

    stage: str = "starting"
    units_done: int = 0
    units: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    on_stage: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def enter(self, stage: str) -> None:
        """A new stage begins: logged (logger "gradprobe.runs", INFO) and told to on_stage (the CLI's lines)."""
        self.stage = stage
        log.info("%s", stage)
        if self.on_stage is not None:
            self.on_stage(stage)

    def progress(self, inner: Callable[[int, int], None] | None = None) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            self.units_done, self.units = done, total
            if done == total:
                log.info("%s: %d/%d done", self.stage, done, total)
            if inner is not None:
                inner(done, total)
        return update


class _Clock:
    """Stage timings, each also announced to the tracker as the stage it is in."""

    def __init__(self, tracker: Tracker | None) -> None:
        self.tracker = tracker if tracker is not None else Tracker()
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, timing: str | None = None) -> Iterator[None]:
        self.tracker.enter(name)
        t0 = time.perf_counter()
        yield
        if timing is not None:
            self.timings[timing] = time.perf_counter() - t0


def _warmed_stack(cfg: Config, clock: _Clock, build_precond: bool):
    """The stack, the preconditioner (built before the warm-up so that a mismatched optimizer state fails
    before any sampling) and, on the embedded default, the AdamW of a few warm-up steps."""
    from .api import live_preconditioner, preconditioner, warm_up, warmup_steps
    from .stack import load_stack

    with clock.stage("model load", "stack"):
        stack = load_stack(cfg)
        precond = preconditioner(stack, cfg) if build_precond else None
    optimizer, warm = None, warmup_steps(cfg)
    if warm:  # a few real AdamW steps, so that the real step has momentum to show
        with clock.stage("warm-up", "warm-up"):
            optimizer = warm_up(stack, cfg, warm)
        if build_precond:
            precond = live_preconditioner(stack, optimizer, cfg, f"the AdamW of {warm} warm-up steps")
    return stack, precond, optimizer, warm


def run_delta_h1(cfg: Config, *, state_dir: str | Path | None = None,
                 save_rollouts: str | Path | None = None, tracker: Tracker | None = None,
                 progress: Callable[[int, int], None] | None = None, save_update: str | Path | None = None):
    """`gradprobe delta-h1`: deltaH of the next real step and deltaH1 of the plain one, with their SEs.

    state_dir: a directory prepared by resume.prepare_state_dir (or one being resumed): each finished unit's
    gradients are kept there and reused, and the batch is read back from it when it holds one.
    save_rollouts: also write the batch used as JSONL. save_update: also write the step deltaH describes
    (api.save_update: safetensors, the adapter's names)."""
    from . import distributed
    from .api import build_batch, delta_h1
    from .api import save_update as save_update_file
    from .probe.engine import planned_units, units_of
    from .resume import ROLLOUTS, UnitStore, fingerprint
    from .rollouts import read_rollouts, write_rollouts

    if distributed.launched():  # torchrun (docs/distributed.md): refused before the model loads, then joined
        if state_dir is not None:
            raise GradprobeError(distributed.NO_RESUME)
        distributed.check_units(planned_units(cfg))
        distributed.init()
    clock = _Clock(tracker)
    stack, precond, optimizer, warm = _warmed_stack(cfg, clock, build_precond=True)
    saved_batch = Path(state_dir) / ROLLOUTS if state_dir is not None else None
    with clock.stage("batch", "batch"):
        if saved_batch is not None and saved_batch.is_file():  # a resumed run probes the batch it began with
            vocab = stack.model.get_input_embeddings().num_embeddings
            batch = read_rollouts(saved_batch, stack.tokenizer, vocab, temperature=cfg.batch.temperature)
        else:
            batch = build_batch(stack, cfg)
    if save_rollouts is not None:
        write_rollouts(batch, save_rollouts)
    store = None
    if saved_batch is not None:
        if not saved_batch.is_file():
            write_rollouts(batch, saved_batch)
        store = UnitStore(Path(state_dir), fingerprint(cfg, batch, stack.params, precond.scales))
        clock.tracker.facts.update(fingerprint=store.fingerprint, units_saved=store.done())
    clock.tracker.enter("probe")
    clock.tracker.units = len(units_of(batch, cfg.probe.mode, cfg.probe.block_size))
    result = delta_h1(stack, batch, cfg, progress=clock.tracker.progress(progress), precond=precond, store=store,
                      optimizer=optimizer, keep_update=save_update is not None)
    if save_update is not None and distributed.is_main():
        save_update_file(result, stack.model, save_update)
    result.warmup_steps = warm
    result.timings.update(clock.timings)
    return result


def run_diagnose(cfg: Config, *, tracker: Tracker | None = None,
                 announce: Callable[[str], None] | None = None):
    """`gradprobe diagnose`: every gradient-flow check, the differential runs and the verdict.
    announce: told, once the stack and batch are ready, how long they took."""
    from .api import build_batch
    from .diagnose import diagnose
    from .diagnose.core import load_optimizer_state
    from .stack import load_stack

    state, source = load_optimizer_state(cfg)  # a bad path fails now, not after the model load
    clock = _Clock(tracker)
    with clock.stage("model load", "stack"):
        stack = load_stack(cfg)
    with clock.stage("batch", "batch"):
        batch = build_batch(stack, cfg)
    if announce is not None:
        announce(f"stack {clock.timings['stack']:.1f} s, batch {clock.timings['batch']:.1f} s; running checks")
    clock.tracker.enter("checks")
    result = diagnose(stack=stack, batch=batch, cfg=cfg, optimizer_state=state,
                      optimizer_source=source or "optimizer state_dict")
    result.timings.update(clock.timings)
    return result


def run_validate(cfg: Config, *, tracker: Tracker | None = None,
                 progress: Callable[[int, int], None] | None = None):
    """`gradprobe validate`: the true entropy change along the real (or plain) step against the prediction."""
    from .validate import check_config, sweep

    check_config(cfg)
    clock = _Clock(tracker)
    stack, _, optimizer, _ = _warmed_stack(cfg, clock, build_precond=False)
    result = sweep(stack, cfg, progress=clock.tracker.progress(progress), optimizer=optimizer,
                   stage=clock.tracker.enter)
    result.timings = {**clock.timings, **result.timings}
    return result

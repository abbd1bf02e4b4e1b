"""Inside a training run: forecast each step's entropy change, then measure the change it made.

A transformers TrainerCallback (the plain Trainer and TRL's GRPOTrainer). Every `every_n_steps` steps:
- on_pre_optimizer_step: the trainable parameters' .grad hold the gradient the trainer is about to step
  with (its own loss, accumulated and clipped) and the optimizer is live. The step Delta theta is the
  optimizer's own arithmetic on copies (optim/update.py real_update), split into its parts (decompose:
  fresh gradient, momentum, weight decay). The forecast is deltaH = -mean_u X_E[u] . Delta theta with X_E
  from an entropy batch sampled from the current policy on fixed evaluation prompts (real_step.independent:
  unbiased, plain SE over the prompts); the truth at theta is recorded (validate.EntropyChange).
- on_step_end: the realised H(theta') - H(theta) on the same prompts (exact by enumeration on a small
  vocabulary, else importance-sampled with draws made at theta), with its SE.
Both go to the trainer's log (log_history and every report_to integration) under gradprobe/... keys and to
a JSONL file, one object per forecast. The measurements run in eval mode (no dropout) under saved and
restored RNG streams, .grad, train/eval flags and grad mode: the training trajectory does not change.

With diagnose="first_step" (or "every_n_steps"), the step's first call of the trainer's compute_loss first
runs gradprobe.diagnose on the trainer's own loss, model and optimizer at those inputs (diagnose/trainer.py):
the verdict is `callback.diagnosis`, logged under gradprobe/diagnose/..., printed on the main process, and
with on_fault="raise" a fault stops the run before its first backward.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .api import independent_step
from .config import ProbeSection
from .diagnose.check import FAIL, WARN
from .diagnose.core import DiagnoseResult
from .diagnose.trainer import diagnose_step, faults
from .entropy import count_responses
from .errors import GradprobeError
from .files import write_atomic
from .optim.update import decompose, mapped_state, real_update, rounds, step_settings, with_rounding
from .rollouts import encode_prompt
from .run_model import record_checkpoint
from .stack import Stack, live_stack
from .validate import EntropyChange, Policy, exact_entropy_grad, sampled_batch

METHODS = ("auto", "exact", "importance")
DIAGNOSE = ("first_step", "every_n_steps")
ON_FAULT = ("warn", "raise")
LOGGED = ("deltaH", "se_deltaH", "realised", "realised_se", "deltaH_exact", "seconds", "cost_ratio")


class GradprobeCallback(TrainerCallback):
    """Forecast deltaH of a training step and measure the realised change (module docstring).

        trainer = GRPOTrainer(...)             # or transformers.Trainer(...)
        GradprobeCallback(eval_prompts=[...], every_n_steps=10, jsonl="gradprobe.jsonl").attach(trainer)
        trainer.train()
    """

    def __init__(self, eval_prompts: Sequence[str] | None = None, *, every_n_steps: int = 10,
                 jsonl: str | Path | None = None, forecast: bool = True, diagnose: str | bool = "first_step",
                 on_fault: str = "warn", diagnose_json: str | Path | None = None,
                 group_size: int = 8, max_new_tokens: int | None = None, temperature: float | None = None,
                 method: str = "auto", is_samples: int = 256, max_enumerate: int = 20000,
                 exact_first_order: bool = False, microbatch_size: int = 8, seed: int = 0, tokenizer: Any = None,
                 trainer: Any = None):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise GradprobeError(f"every_n_steps must be an integer >= 1; got {every_n_steps!r}")
        if not (diagnose is False or (isinstance(diagnose, str) and diagnose in DIAGNOSE)):
            raise GradprobeError(f"diagnose must be 'first_step', 'every_n_steps' or False; got {diagnose!r}")
        if on_fault not in ON_FAULT:
            raise GradprobeError(f"on_fault must be 'warn' or 'raise'; got {on_fault!r}")
        if not isinstance(forecast, bool) or not (forecast or diagnose):
            raise GradprobeError("GradprobeCallback needs forecast=True or a diagnose mode (both are off)")
        self.forecast, self.diagnose, self.on_fault = forecast, diagnose, on_fault
        self.diagnose_json = Path(diagnose_json) if diagnose_json is not None else None
        self.diagnosis: DiagnoseResult | None = None
        self.diagnoses: list[dict[str, Any]] = []
        self._diagnose_due, self._diagnosed, self._diagnose_seconds, self._diagnose_step = False, False, 0.0, 0
        self._wrapped: Any = None
        if forecast and eval_prompts is None:
            raise GradprobeError("eval_prompts is required to forecast (or pass forecast=False)")
        if forecast and (isinstance(eval_prompts, str) or not all(isinstance(p, str) and p for p in eval_prompts)):
            raise GradprobeError("eval_prompts must be a list of non-empty prompt strings")
        if forecast and len(eval_prompts) < 2:
            raise GradprobeError(f"eval_prompts needs at least 2 prompts (the forecast's SE is over prompts); "
                                 f"got {len(eval_prompts)}")
        for name, value, low in (("group_size", group_size, 2), ("is_samples", is_samples, 2),
                                 ("max_enumerate", max_enumerate, 1), ("microbatch_size", microbatch_size, 1),
                                 ("max_new_tokens", 1 if max_new_tokens is None else max_new_tokens, 1),
                                 ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise GradprobeError(f"{name} must be an integer >= {low}; got {value!r} ({type(value).__name__})")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise GradprobeError(f"temperature must be a number > 0; got {temperature!r}")
        if group_size < 2:
            raise GradprobeError(f"group_size must be >= 2 (X needs a leave-one-out baseline); got {group_size}")
        if method not in METHODS:
            raise GradprobeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if is_samples < 2 or max_enumerate < 1 or microbatch_size < 1:
            raise GradprobeError("is_samples must be >= 2, max_enumerate and microbatch_size >= 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise GradprobeError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if temperature is not None and not temperature > 0:
            raise GradprobeError(f"temperature must be > 0; got {temperature}")
        self.eval_prompts = list(eval_prompts or [])
        self.every_n_steps, self.group_size, self.method_asked = every_n_steps, group_size, method
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.is_samples, self.max_enumerate, self.exact_first_order = is_samples, max_enumerate, exact_first_order
        self.seed, self.tokenizer, self.trainer = seed, tokenizer, trainer
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.probe_cfg = ProbeSection(microbatch_size=microbatch_size)
        self.records: list[dict[str, Any]] = []
        self.stack: Stack | None = None
        self._pending: dict[str, Any] | None = None
        self._step_started = 0.0

    def attach(self, trainer: Any) -> GradprobeCallback:
        """Log through `trainer` and add this callback to it (once); returns self. With a diagnose mode, the
        trainer's compute_loss is wrapped on this instance (diagnose/trainer.py): the step's first call runs
        the checks on its real inputs first; every other call goes straight through."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        if self.diagnose and self._wrapped is None:
            self._wrapped = own = trainer.compute_loss  # bound: a subclass's override is the one that runs

            def compute_loss(model, inputs, *args, **kwargs):
                if self._diagnose_due:
                    self._diagnose_due = False
                    self._run_diagnosis(own, model, inputs, args, kwargs)
                return own(model, inputs, *args, **kwargs)

            trainer.compute_loss = compute_loss
        return self

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise GradprobeError("GradprobeCallback logs through its trainer: use callback.attach(trainer) "
                                 "(or pass trainer=) before trainer.train()")
        self.optimizer = _unwrap(optimizer)
        if self.optimizer is None:
            raise GradprobeError("the trainer has no optimizer at train begin")
        self._diagnosed, self.diagnoses = False, []
        if self.diagnose and self._wrapped is None:
            raise GradprobeError("GradprobeCallback diagnoses through its trainer's compute_loss: use "
                                 "callback.attach(trainer) before trainer.train()")
        if self.diagnose_json is not None and not self.diagnose_json.parent.is_dir():
            raise GradprobeError(f"cannot write the gradprobe diagnose JSON {self.diagnose_json}: "
                                 f"{self.diagnose_json.parent} is not a directory")
        if self.forecast:
            self._forecast_begin(args, model, processing_class)

    def _forecast_begin(self, args, model, processing_class) -> None:
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        if tokenizer is None:
            raise GradprobeError("GradprobeCallback needs a tokenizer: the trainer has no processing_class; "
                                 "pass tokenizer=")
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.stack = live_stack(model, tokenizer, autocast)
        # an optimizer that real_update cannot model fails here, not mid-run
        step_settings(self.optimizer, self.stack.names, self.stack.params)
        self.tau = self.temperature or float(getattr(args, "temperature", None) or 1.0)
        self.max_len = self.max_new_tokens or int(getattr(args, "max_completion_length", None) or 16)
        self.prompt_ids = []
        for i, text in enumerate(self.eval_prompts):
            try:
                self.prompt_ids.append(encode_prompt(tokenizer, text))
            except (ValueError, TypeError, KeyError) as exc:
                raise GradprobeError(f"eval_prompts[{i}] {text[:60]!r} cannot be tokenized: {exc}") from None
        if any(not ids for ids in self.prompt_ids):
            raise GradprobeError("an evaluation prompt tokenizes to nothing")
        vocab = model.get_input_embeddings().num_embeddings
        n = count_responses(vocab, self.max_len)
        if self.method_asked == "exact" and n > self.max_enumerate:
            raise GradprobeError(f"method=exact would enumerate {n:,} responses per prompt; use method=importance")
        self.method = self.method_asked if self.method_asked != "auto" else \
            "exact" if n <= self.max_enumerate else "importance"
        self.max_grad_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.records = []
        if self.jsonl is not None:
            write_atomic(self.jsonl, "", what="the gradprobe JSONL")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()
        step = state.global_step + 1
        due = not self._diagnosed if self.diagnose == "first_step" else \
            self.diagnose == "every_n_steps" and step % self.every_n_steps == 0
        # under several processes, the main one only (the checks' loss runs on its own data, no collective)
        self._diagnose_due, self._diagnose_seconds = bool(due and state.is_world_process_zero), 0.0
        self._diagnose_step = step

    def _run_diagnosis(self, compute_loss, model, inputs, args, kwargs) -> None:
        """gradprobe.diagnose on this step's real inputs (diagnose/trainer.py); report it, and with
        on_fault='raise' stop the run here, before the trainer's own backward and optimizer step."""
        from .report.diagnose import payload, render

        result, seconds = diagnose_step(self.trainer, compute_loss, model, inputs, args, kwargs, self.optimizer)
        self.diagnosis, self._diagnosed, self._diagnose_seconds = result, True, seconds
        code, harmful = result.exit_code(), faults(result)
        rec = dict(step=self._diagnose_step, root_cause=result.verdict.root_cause, exit_code=code,
                   fault=int(bool(harmful)),
                   failed=sum(c.status == FAIL for c in result.checks),
                   warned=sum(c.status == WARN for c in result.checks), seconds=seconds)
        self.diagnoses.append(rec)
        if self.diagnose_json is not None:
            write_atomic(self.diagnose_json, json.dumps(payload(result, None, code), indent=2) + "\n",
                         what="the gradprobe diagnose JSON")
        from .cli.common import consoles

        render(consoles(quiet=False, json_to_stdout=False)[0], result, code)
        if harmful and self.on_fault == "raise":
            self._log_diagnosis(rec)
            cause = next(c for c in result.verdict.causes if c.id == harmful[0])
            failed = ", ".join(c.name for c in result.checks if c.status == FAIL)
            raise GradprobeError(f"gradprobe diagnose at step {rec['step']}: {cause.id} (failed: {failed}); "
                                 f"fix: {' '.join(cause.fix.split())}")

    def _log_diagnosis(self, rec: dict[str, Any]) -> None:
        self._trainer_log({f"gradprobe/diagnose/{k}": v for k, v in rec.items() if k != "step" and v is not None})

    def on_save(self, args, state, control, model=None, **kwargs):
        """Beside each checkpoint, how the live model was loaded (run_model.RUN_RECORD): what `--checkpoint`
        reads instead of assuming the quantisation."""
        record_checkpoint(args, state, model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step about to be taken, as log_history will number it
        if not self.forecast or step % self.every_n_steps:
            return
        t0 = time.perf_counter()
        stack, clock = self.stack, _Clock()
        with untouched(stack.model):
            skipped = [p.grad is None for p in stack.params]  # the optimizer's step() leaves these alone
            grads = [torch.zeros_like(p) if s else p.grad.detach() for p, s in zip(stack.params, skipped)]
            lr = float(self.optimizer.param_groups[0]["lr"])
            update = real_update(self.optimizer, stack.params, grads, names=stack.names)
            settings = step_settings(self.optimizer, stack.names, stack.params)
            mapped = mapped_state(self.optimizer, stack.names, stack.params)
            parts = decompose(settings, mapped, stack.names, stack.params, grads)
            for j in (j for j, s in enumerate(skipped) if s):
                update[j] = torch.zeros_like(update[j])
                for ts in (parts.fresh, parts.momentum, parts.decay):
                    ts[j] = torch.zeros_like(ts[j])
            flat_update = torch.cat([d.reshape(-1).double() for d in update])
            flat_parts = torch.cat([t.reshape(-1).double() for t in parts.unrounded(grads)])
            if rounds(stack.params, mapped):  # the forecast is of the step as the weights' dtype rounds it
                parts = with_rounding(parts, update, grads)
            grad_norm = float(torch.cat([g.reshape(-1).double().cpu() for g in grads]).norm())
            clock.lap("step")
            stack.model.eval()
            policy = Policy(stack, self.method, self.tau, self.max_len)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            batch = sampled_batch(stack, policy, self.prompt_ids, self.group_size, gen, self.tau)
            clock.lap("entropy batch")
            est = independent_step(stack, batch, self.probe_cfg, parts, grads)
            clock.lap("X_E")
            exact = None
            if self.method == "exact" and self.exact_first_order:
                _, grad_h = exact_entropy_grad(stack, self.prompt_ids, self.tau, self.max_len)
                exact = float(grad_h.double() @ flat_update)
                clock.lap("exact grad H")
            truth = EntropyChange(stack, policy, self.prompt_ids, self.is_samples, self.seed * 1_000_003 + step + 7)
        theta_norm = float(torch.cat([p.detach().reshape(-1).double().cpu() for p in stack.params]).norm())
        self._pending = dict(
            step=step, deltaH=est.deltaH, se_deltaH=est.se_deltaH, parts=est.parts(), deltaH_exact=exact,
            realised=None, realised_se=None, entropy=truth.h0, method=self.method, lr=lr,
            update_norm=float(flat_update.norm()), update_rel=float(flat_update.norm()) / (theta_norm or 1.0),
            parts_residual=float((flat_parts - flat_update).norm() / (flat_update.norm() or 1.0)),
            rounded_away=parts.rounded_away,
            grad_norm=grad_norm, max_grad_norm=self.max_grad_norm,
            clipped=self.max_grad_norm is not None and grad_norm >= self.max_grad_norm * (1 - 1e-4),
            params_without_grad=sum(skipped), eval_prompts=len(self.prompt_ids), group_size=self.group_size,
            max_new_tokens=self.max_len, temperature=self.tau, optimizer=settings.optimizer,
            optimizer_step=settings.step)
        clock.lap("truth at theta")
        self._pending["_truth"], self._pending["timings"] = truth, clock.laps
        self._pending["_forecast_seconds"] = time.perf_counter() - t0

    def on_step_end(self, args, state, control, **kwargs):
        if self.diagnoses and self.diagnoses[-1]["step"] == state.global_step and "step_seconds" not in \
                self.diagnoses[-1]:
            drec = self.diagnoses[-1]  # its cost against the training step's own time (the checks' excluded)
            drec["step_seconds"] = max(time.perf_counter() - self._step_started - drec["seconds"], 0.0)
            drec["cost_ratio"] = drec["seconds"] / drec["step_seconds"] if drec["step_seconds"] > 0 else None
            self._log_diagnosis(drec)
        rec, self._pending = self._pending, None
        if rec is None:
            return
        t0 = time.perf_counter()
        truth = rec.pop("_truth")
        with untouched(self.stack.model):
            self.stack.model.eval()
            realised, realised_se, ess = truth.measure()
        measure = time.perf_counter() - t0
        forecast = rec.pop("_forecast_seconds")
        step_seconds = max(time.perf_counter() - self._step_started - forecast - measure - self._diagnose_seconds,
                           0.0)
        rec.update(realised=realised, realised_se=realised_se, is_min_ess=None if math.isnan(ess) else ess,
                   seconds=forecast + measure, forecast_seconds=forecast, realised_seconds=measure,
                   step_seconds=step_seconds,
                   cost_ratio=(forecast + measure) / step_seconds if step_seconds > 0 else None)
        self.records.append(rec)
        if self.jsonl is not None:
            write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records), what="the gradprobe JSONL")
        self._log(rec)

    def _log(self, rec: dict[str, Any]) -> None:
        """Through transformers.Trainer.log itself: log_history and every report_to integration see it, and a
        subclass's log (TRL's averages and clears its own metrics there) is left to the trainer's own calls.
        on_log clears control.should_log, which would drop the trainer's own log of this step: it is put back."""
        logs = {f"gradprobe/{k}": rec[k] for k in LOGGED if rec.get(k) is not None}
        for part in ("fresh", "momentum", "weight_decay"):
            logs[f"gradprobe/{part}"] = rec["parts"][part]["value"]
        self._trainer_log(logs)

    def _trainer_log(self, logs: dict[str, Any]) -> None:
        from transformers import Trainer

        should_log = self.trainer.control.should_log
        Trainer.log(self.trainer, logs)
        self.trainer.control.should_log = should_log


class _Clock:
    """Seconds per phase of a forecast (the cost breakdown in the JSONL)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = now - self.t, now


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@contextlib.contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run a measurement and leave no trace on training: every RNG stream (torch CPU and CUDA, python, numpy),
    each module's train/eval flag, the trainable parameters' .grad objects, grad mode, and bitsandbytes' CPU
    4-bit layers kept out of their inference-only repacking (stack._keep_trainable_4bit_layout)."""
    import numpy as np

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py, npy = random.getstate(), np.random.get_state()
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters() if p.requires_grad]
    packed = [(m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    grad_mode = torch.is_grad_enabled()
    for m, _ in packed:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_mode)
        for m, flag in packed:
            m.support_avx512bf16_for_cpu = flag
        for p, g in grads:
            p.grad = g
        for m, flag in modes:
            m.training = flag
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)

"""diagnose(): gather facts, run the checks, run the differential experiment, decide the verdict.

Everything it changes on the model (gradients, checkpointing, adapter flags, requires_grad) is put
back before it returns, so it can run inside a user's training script between two steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..attention import without_cudnn_attention
from ..errors import GradprobeError
from ..objective import LossSpec
from ..params import param_names
from ..rollouts import Batch
from . import battery, differential
from .check import FAIL, SEVERITY, WARN, Check
from .facts import gather, wants_gradient
from .measure import measure
from .subject import (
    Subject,
    batch_loss_fn,
    default_params,
    list_adapters,
    measured_batch,
    pick_groups,
    stack_autocast_off,
    user_autocast_off,
)
from .verdict import Verdict, decide

if TYPE_CHECKING:
    from ..config import Config

SCHEMA = "gradprobe.diagnose/1"


@dataclass
class DiagnoseResult:
    checks: list[Check]
    verdict: Verdict
    differential: list[differential.DiffRun]
    n_params: int
    n_values: int
    params_source: str
    measured: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def exit_code(self, fail_on: str = "fail") -> int:
        """1 when a check fails (or warns, with fail_on='warn'), else 0."""
        limit = SEVERITY[FAIL if fail_on == "fail" else WARN]
        return int(any(SEVERITY[c.status] >= limit for c in self.checks))

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [c.to_dict() for c in self.checks], "verdict": self.verdict.to_dict(),
                "differential": [r.to_dict() for r in self.differential],
                "params": {"tensors": self.n_params, "values": self.n_values, "source": self.params_source},
                "measured": self.measured, "timings": self.timings}


def _subject_from_stack(stack, batch: Batch, cfg: Config | None, groups: list[int] | None) -> Subject:
    rows = cfg.probe.microbatch_size if cfg else 8
    loss = LossSpec.from_config(cfg.probe) if cfg else LossSpec()
    groups = groups if groups is not None else pick_groups(batch, rows)
    return Subject(model=stack.model, params=list(stack.params), names=list(stack.names),
                   loss_fn=batch_loss_fn(stack, batch, groups, loss), batch=batch, measured_groups=groups,
                   autocast_off=stack_autocast_off(stack), params_source="the stack's trainable parameters",
                   expect_4bit=(cfg.quant.mode != "none") if cfg else None)


def load_optimizer_state(cfg: Config | None) -> tuple[dict[str, Any] | None, str]:
    """The optimizer state_dict the config names (precondition=adam), with its path; (None, '') otherwise."""
    if not cfg or cfg.probe.precondition != "adam":
        return None, ""
    path = cfg.probe.optimizer_state
    if not path:
        raise GradprobeError("probe.precondition=adam needs probe.optimizer_state (an optimizer state_dict file)")
    from ..optim.state import load_state_dict

    return load_state_dict(path), str(path)


@without_cudnn_attention()
def diagnose(model: torch.nn.Module | None = None, params: list[torch.Tensor] | None = None,
             loss_fn: Callable[[], Any] | None = None, *, optimizer: torch.optim.Optimizer | None = None,
             optimizer_state: dict[str, Any] | None = None, optimizer_source: str = "optimizer state_dict",
             batch: Batch | None = None, groups: list[int] | None = None,
             rewards: list[list[float]] | None = None, lengths: list[list[int]] | None = None,
             advantages: list[list[float]] | None = None, old_logprobs: Any = None, stack=None,
             cfg: Config | None = None, run_differential: bool = True) -> DiagnoseResult:
    """Run every gradient-flow check and name the root cause.

    Point it at your own code:  diagnose(model, params, loss_fn, optimizer=opt)
      model      the module your loss runs (a PEFT model, or any nn.Module)
      params     the list your probe or optimizer reads (default: the model's trainable parameters)
      loss_fn    () -> S [n] per-sequence log-probs, a scalar loss, or {"S": ..., "LX": ..., "LY": ...} (or "loss"),
                 with "terms": {name: tensor} for the terms the loss sums (each checked to reach the gradient);
                 called several times, each call must build a fresh graph
      optimizer  its param_groups and Adam state are checked against params, and its next step (on clones)
                 against half-precision tensors whose updates would round away
      optimizer_state  or a saved optimizer state_dict (mapped by param_names or index, as the probe does)
      What the loss measured (so expected zeros are told from faults: identical rewards, empty responses):
      rewards    one list per group the loss measured, its responses' rewards
      lengths    the same shape: each response's generated length (the tokens S sums over)
      advantages the same shape, when the loss uses given advantages instead of group-centred rewards
      batch      or a gradprobe Batch, with groups= the indices of its groups the loss measured (default all)
      old_logprobs  the sampling-time log-probs of the sequences S covers (per-sequence sums, or one list of
                 per-token values per sequence): compared with the recomputed S, a gap is named and sized
    Or at a stack gradprobe built:  diagnose(stack=stack, batch=batch, cfg=cfg)
    (params=, loss_fn= and optimizer= still override the stack's, e.g. to test your own list).
    """
    t0 = time.perf_counter()
    caller_grad, caller_inf = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    if groups is not None and (batch is None or any(not 0 <= g < batch.B for g in groups)):
        raise GradprobeError(f"groups= must index the groups of batch= ({batch.B if batch else 'none given'}); "
                             f"got {groups}")
    if stack is not None:
        if batch is None and loss_fn is None:
            raise GradprobeError("diagnose(stack=...) needs batch= (or loss_fn=)")
        base = _subject_from_stack(stack, batch, cfg, groups) if batch is not None else None
        model = stack.model
        state, source = (optimizer_state, optimizer_source) if optimizer_state is not None else \
            load_optimizer_state(cfg)
    else:
        if model is None or loss_fn is None:
            raise GradprobeError("diagnose() needs model= and loss_fn= (or stack= and batch=)")
        base, state, source = None, optimizer_state, optimizer_source
    told = measured_batch(rewards, lengths, advantages)
    if told is not None:
        if batch is not None:
            raise GradprobeError("give either batch= (with groups=) or rewards=/lengths=/advantages=, not both")
        batch, groups = told, list(range(told.B))
    if groups is None and batch is not None:
        groups = base.measured_groups if base is not None else list(range(batch.B))
    if params is None and base is not None and base.params:
        plist, psource, note = base.params, base.params_source, ""
    elif params is None:
        plist, psource, note = default_params(model)
    else:
        plist, psource, note = list(params), "the list given", ""
    if not plist:
        raise GradprobeError("the parameter list is empty")
    names = param_names(model, plist)
    subject = Subject(model=model, params=plist, names=names, adapters=list_adapters(names),
                      old_logprobs=old_logprobs,
                      loss_fn=loss_fn or base.loss_fn, optimizer=optimizer, optimizer_state=state,
                      optimizer_source=source, optimizer_order=cfg.probe.optimizer_order if cfg else "auto",
                      batch=batch, measured_groups=groups,
                      autocast_off=(base.autocast_off if base and loss_fn is None else user_autocast_off(plist)),
                      expect_4bit=base.expect_4bit if base else None, params_note=note, params_source=psource)

    saved_grads = [(p, p.grad) for p in {id(p): p for p in [*model.parameters(), *plist]}.values()]
    try:
        m = measure(model, plist, subject.loss_fn, adapters=subject.adapters, capture=old_logprobs is not None,
                    keep=True if wants_gradient(subject) else None)
        t1 = time.perf_counter()
        facts = gather(subject, m, caller_grad, caller_inf)
        facts.differential = differential.run(facts) if run_differential else []
        t2 = time.perf_counter()
    finally:
        for p, g in saved_grads:
            p.grad = g
    checks = battery.run_all(facts)
    verdict = decide(facts)
    measured = {"loss": m.primary, "groups": subject.measured_groups, "params_note": note} if note else \
        {"loss": m.primary, "groups": subject.measured_groups}
    return DiagnoseResult(checks=checks, verdict=verdict, differential=facts.differential,
                          n_params=len(plist), n_values=sum(p.numel() for p in plist), params_source=psource,
                          measured=measured,
                          timings={"measure": t1 - t0, "differential": t2 - t1,
                                   "total": time.perf_counter() - t0})

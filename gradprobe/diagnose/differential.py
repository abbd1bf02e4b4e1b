"""The differential experiment: re-run the failing measurement with one factor changed at a time.

A symptom that disappears when exactly one factor changes names that factor as its cause; every
change is undone before the next run, so each run differs from the baseline in one factor only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..params import param_names
from .facts import Facts
from .measure import Measurement, measure
from .model_state import adapters_trainable, checkpointing_as, input_grads_enabled, lora_b_zero


@dataclass
class DiffRun:
    factor: str  # stable id, e.g. "checkpointing=non_reentrant"
    change: str  # the change in words
    applied: bool
    note: str = ""
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    resolved: list[str] = field(default_factory=list)  # baseline symptoms gone after the change
    remaining: list[str] = field(default_factory=list)

    @property
    def fixes_all(self) -> bool:
        return self.applied and bool(self.resolved) and not self.remaining

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fixes_all"] = self.fixes_all
        return out


def symptoms(m: Measurement, n: int, expected_zero: set[int]) -> set[str]:
    """What is wrong with the primary loss's gradients in one measurement."""
    if m.loss_error:
        return {"loss_error"}
    out = set()
    if m.raised is not None:
        out.add("backward_error")
    t = m.tensors[m.primary]
    if not (t.requires_grad and t.grad_fn is not None):
        out.add("no_graph")
    bw = m.get(m.primary, "backward")
    ag = m.get(m.primary, "autograd.grad")
    if bw is not None and (bw.missing or set(bw.zero) - expected_zero):
        out.add("backward_missing")
    if bw is not None and bw.raised is None and set(bw.zero) - expected_zero:
        out.add("backward_zero")  # exactly zero, not None: reached by the graph, but nothing arrived
    if bw is not None and bw.nonfinite:
        out.add("nonfinite")
    if ag is not None and bw is not None and ag.nonnull < bw.nonnull:
        out.add("autograd_grad_gap")
    return out


def summary(m: Measurement, n: int) -> dict[str, Any]:
    if m.loss_error:
        return {"loss_error": m.loss_error}
    t = m.tensors[m.primary]
    bw = m.get(m.primary, "backward")
    ag = m.get(m.primary, "autograd.grad")
    out: dict[str, Any] = {"loss": m.primary, "requires_grad": t.requires_grad,
                           "forward_grad_enabled": m.trace.grad_enabled, "forward_autocast": m.trace.autocast}
    if bw is not None:
        out["backward_nonnull"] = bw.nonnull
        out["backward_nonzero"] = bw.nonzero
    if ag is not None:
        out["autograd_grad_nonnull"] = ag.nonnull
    if m.raised is not None:
        out["raised"] = m.raised.text()[:200]
    out["params"] = n
    return out


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module) -> Iterator[bool]:
    """model.train() for one re-run; every module's own flag is put back after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield True
    finally:
        for m, flag in flags:
            m.training = flag


def _rel_change(before: torch.Tensor | None, after: torch.Tensor | None) -> float | None:
    if before is None or after is None or before.shape != after.shape:
        return None
    ref = float(before.double().norm())
    return float((after.double() - before.double()).norm()) / ref if ref > 0 else None


@contextlib.contextmanager
def _grad_on() -> Iterator[bool]:
    with torch.inference_mode(False), torch.enable_grad():
        yield True


def _factors(f: Facts) -> list[tuple[str, str, Callable[[], contextlib.AbstractContextManager] | None, str]]:
    """(id, change, context, where it goes): 'model' contexts wrap the whole re-run and yield whether they
    could switch; 'loss' contexts wrap only the call of the loss function; 'params' swaps the list."""
    s = f.subject
    trace = f.m.trace
    out = []
    mode = f.ckpt["mode"]
    if f.ckpt["layers_checkpointed"] and mode != "non_reentrant":
        out.append(("checkpointing=non_reentrant", "activation checkpointing switched to use_reentrant=False",
                    lambda: checkpointing_as(s.model, "non_reentrant"), "model"))
    if f.ckpt["layers_checkpointed"]:
        out.append(("checkpointing=off", "activation checkpointing switched off",
                    lambda: checkpointing_as(s.model, "off"), "model"))
    if mode == "reentrant" and trace.inputs_require_grad is False:
        out.append(("inputs_require_grad", "input embeddings made to require grad (enable_input_require_grads)",
                    lambda: input_grads_enabled(s.model), "model"))
    if trace.autocast not in (None, "off"):
        out.append(("autocast=off", "autocast switched off", s.autocast_off, "loss"))
    a = f.adapters
    if a["disabled_layers"] or a["trainable_adapter_tensors"] < a["adapter_tensors"]:
        out.append(("adapters_trainable", "adapter layers enabled and their weights set to require grad",
                    lambda: adapters_trainable(s.model), "model"))
    idn = f.identity
    if idn.not_in_model or idn.trainable_not_in_list or idn.frozen_not_adapter:
        out.append(("params=model_trainable", "the list replaced by the model's current trainable parameters",
                    contextlib.nullcontext, "params"))
    if trace.grad_enabled is False or trace.inference_mode or trace.calls == 0:
        out.append(("grad_mode=on", "grad mode forced on (torch.enable_grad, inference_mode off) around the loss",
                    _grad_on, "loss"))
    return out


GRADIENT_SYMPTOMS = {"no_graph", "backward_missing", "autograd_grad_gap", "loss_error", "backward_error"}
SCALES = (2.0 ** 16, 2.0 ** 32)  # GradScaler's initial scale, then a larger one for very small losses


def _in_eval(f: Facts) -> bool:
    t = f.m.trace
    return bool((t.training is False or any(s.calls and s.training is False for s in t.layers.values()))
                and f.dropout and f.m.raised is None)


def run(f: Facts) -> list[DiffRun]:
    """One re-measurement per applicable factor, only when the baseline shows a symptom: a gradient symptom,
    exactly-zero gradients (the loss-scaling run), or eval mode with dropout configured (the train-mode run)."""
    base = symptoms(f.m, f.n, f.expected(f.m.primary))
    eval_case = _in_eval(f)
    if eval_case:
        base.add("eval_mode")
    if not (base & (GRADIENT_SYMPTOMS | {"eval_mode"})):
        return []
    s = f.subject
    factors = _factors(f) if base & GRADIENT_SYMPTOMS else []
    if eval_case:
        factors.append(("train_mode", "the model switched to train mode (model.train()) for the forward",
                        lambda: _train_mode(s.model), "model"))
    g = f.generation
    all_empty = g.given and g.lengths_known and g.rows and g.empty_rows == g.rows
    if "backward_zero" in base and not all_empty:  # empty responses: zero is the exact answer, not underflow
        factors += [(f"loss_scale={int(k)}", f"the loss multiplied by {int(k)} before backward (loss scaling)",
                     contextlib.nullcontext, "scale") for k in SCALES]
    before = summary(f.m, f.n)
    runs: list[DiffRun] = []
    with torch.random.fork_rng(devices=[]):
        for factor, change, make, where in factors:
            if where == "scale" and any(r.factor.startswith("loss_scale=") and "backward_zero" in r.resolved
                                        for r in runs):
                continue  # a smaller scale already brought the gradients back
            r = _one(f, factor, change, make, where, before, base)
            runs.append(r)
    return runs


def _one(f: Facts, factor: str, change: str, make, where: str, before: dict[str, Any], base: set[str]) -> DiffRun:
    s = f.subject
    r = DiffRun(factor=factor, change=change, applied=False, before=before)
    n, expected = f.n, f.expected(f.m.primary)
    keys = (f.m.primary,)
    if where == "loss":
        m = measure(s.model, s.params, s.loss_fn, losses=keys, strict=False, wrap=make, adapters=s.adapters)
    elif where == "scale":
        m = measure(s.model, s.params, s.loss_fn, losses=keys, strict=False, adapters=s.adapters,
                    scale=float(factor.split("=")[1]))
    elif where == "params":
        params = [p for p in s.model.parameters() if p.requires_grad]
        if not params:
            r.note = "the model has no trainable parameters"
            return r
        zero_a = lora_b_zero(s.model)
        n, expected = len(params), {i for i, nm in enumerate(param_names(s.model, params)) if nm in zero_a}
        m = measure(s.model, params, s.loss_fn, losses=keys, strict=False)
    else:
        with make() as applied:
            if not applied:
                r.note = "this model offers no way to switch it"
                return r
            m = measure(s.model, s.params, s.loss_fn, losses=keys, strict=False, adapters=s.adapters,
                        keep=factor == "train_mode")
    r.applied = True
    if factor == "autocast=off" and m.trace.autocast not in (None, "off"):
        r.applied = False
        r.note = f"the loss code enters autocast itself (the forward still ran in {m.trace.autocast})"
    r.after = summary(m, n)
    after = symptoms(m, n, expected)
    if "eval_mode" in base:
        rel = None
        if factor == "train_mode":
            bw0, bw1 = f.m.get(f.m.primary, "backward"), m.get(m.primary, "backward")
            rel = _rel_change(bw0.vector if bw0 else None, bw1.vector if bw1 else None)
            r.after["grad_rel_change"] = rel
            if m.trace.training is not True:
                r.applied, r.note = False, "the loss code switches the model to eval mode itself"
        if not (rel and rel > 1e-6):
            after.add("eval_mode")
    if "loss_error" in after and "loss_error" not in base:  # the re-run failed earlier: it removed nothing
        r.note = f"the re-run's loss raised: {m.loss_error[:200]}"
        after = set(base)
    r.resolved = sorted(base - after)
    r.remaining = sorted(base & after)
    return r

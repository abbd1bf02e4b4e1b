"""The verdict: which root causes hold (causes.py, in rank order), in plain words with the fix and the
differential run's confirmation; every confirmed cause is reported, the upstream one first."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .causes import BY_ID, CAUSES, EXPLAINS_MISSING, RANK
from .differential import DiffRun
from .facts import Facts
from .rules import Cause, _count, unexplained


@dataclass
class Verdict:
    root_cause: str
    causes: list[Cause]
    summary: str
    fix: str
    probe_path_healthy: bool
    expected_zeros: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["causes"] = [c.to_dict() for c in self.causes]
        return out


def _rank(found: list[Cause]) -> list[Cause]:
    """Rank order, except that a cause implied by another (`after`) follows it directly when both hold."""
    ids = {c.id for c in found}
    key = {c.id: (RANK[c.after], 1) if c.after in ids else (RANK[c.id], 0) for c in found}
    return sorted(found, key=lambda c: key[c.id])


def _causes(f: Facts) -> list[Cause]:
    """Every rule that holds, ranked, each with its fix."""
    rules = {id(c.rule): c.rule for c in CAUSES if c.rule is not None}  # one rule may return either of two ids
    found = [c for rule in rules.values() if (c := rule(f)) is not None]
    extra = unexplained(f, found, EXPLAINS_MISSING)
    found += [extra] if extra else []
    by_id = {c.id: c for c in found}
    for c in found:
        c.fix = BY_ID[c.id].fix
        for consequence in BY_ID[c.id].implies:  # listed right under the cause that brings it about
            if consequence in by_id:
                by_id[consequence].after = c.id
    for c in found:
        if c.after not in by_id:
            c.after = None
    return _rank(found)


def _probe_path(f: Facts) -> tuple[bool, str]:
    n = f.n
    parts, healthy = [], True
    for loss, label in (("LX", "X"), ("LY", "Y")):
        st = f.stats(loss, "backward")
        if st is None:
            continue
        ok = not f.unexplained(st, loss) and not st.nonfinite and st.error is None
        healthy &= ok
        parts.append(f"{label} {st.nonnull}/{n} filled ({st.nonzero}/{n} non-zero)")
    if not parts:
        st = f.stats(f.m.primary, "backward")
        healthy = st is not None and not f.unexplained(st, f.m.primary) and not st.nonfinite
        parts.append(f"{f.m.primary} {_count(st, n)} filled")
    healthy &= f.identity.not_in_model == [] and not f.identity.trainable_not_in_list
    what = "healthy" if healthy else "affected too"
    return healthy, (f"The backward()-based probe path (what `gradprobe delta-h1` uses) is {what}: "
                     f"{', '.join(parts)}.")


def _outcome(r: DiffRun) -> str:
    """What the change did to the symptom it removed, in the API that showed the symptom."""
    a, n = r.after, r.after.get("params")
    parts = []
    if "no_graph" in r.resolved:
        parts.append("the loss gets a graph")
    if "autograd_grad_gap" in r.resolved:
        parts.append(f"autograd.grad returns {a.get('autograd_grad_nonnull')}/{n}")
    if "loss_error" in r.resolved or "backward_error" in r.resolved:
        parts.append("the loss and its backward run without raising")
    if "eval_mode" in r.resolved:
        parts.append(f"the gradient changes by {a.get('grad_rel_change', 0.0):.3g} (relative L2)")
    if r.resolved and set(r.resolved) & {"backward_missing", "no_graph", "backward_zero", "loss_error",
                                         "backward_error"}:
        parts.append(f"backward() fills {a.get('backward_nonnull')}/{n} ({a.get('backward_nonzero')} non-zero)")
    return " and ".join(parts) or "the symptom goes away"


def _confirmation(c: Cause, runs: list[DiffRun]) -> str:
    tried = [r for r in runs if r.applied]
    if not BY_ID[c.id].confirmable and not c.confirmed_by:
        return ""
    if c.confirmed_by:
        detail = [f"with {r.change}, {_outcome(r)}" for r in runs if r.factor in c.confirmed_by]
        others = [r.factor for r in tried if r.factor not in c.confirmed_by]
        tail = f"; changing {', '.join(others)} alone does not" if others else ""
        return f" Confirmed by the differential run: {'; '.join(detail)}{tail}."
    if tried:
        return f" No single change among {', '.join(r.factor for r in tried)} removes the symptom."
    return ""


def decide(f: Facts) -> Verdict:
    causes = _causes(f)
    healthy, path = _probe_path(f)
    expected = []
    if f.expected_zero:
        expected.append(f"{len(f.expected_zero)} lora_A tensors have exactly zero gradient because their lora_B is "
                        f"zero (a fresh adapter, lora.init=zero_b): dL/dA = B^T (...) = 0. Expected, not a bug; B "
                        f"moves first and A follows after the first step.")
    if not causes:
        n = f.n
        summary = (f"No gradient-flow problem found: autograd.grad and backward() agree on all {n} parameter tensors, "
                   f"S carries a graph and the list is the model's trainable parameters. {path}")
        if expected:
            summary += " " + " ".join(expected)
        if f.m.trace.training is False:
            summary += (" The model ran its forward in eval mode; no dropout with p > 0 is configured, so the "
                        "gradient equals a train-mode one (activation checkpointing is off in eval mode, which costs "
                        "memory only).")
        return Verdict("healthy", [], summary, BY_ID["healthy"].fix, healthy, expected)
    first = causes[0]
    summary = first.summary + _confirmation(first, f.differential)
    if first.id in ("reentrant_checkpointing_hides_params", "autograd_grad_mismatch") or healthy:
        summary += " " + path
    if len(causes) > 1:
        summary += " Also (in order of impact): " + " ".join(
            f"[{c.id}]{f' (a consequence of {c.after})' if c.after else ''} {c.summary}"
            f"{_confirmation(c, f.differential)}" for c in causes[1:])
    if expected:
        summary += " " + " ".join(expected)
    return Verdict(first.id, causes, summary, first.fix, healthy, expected)

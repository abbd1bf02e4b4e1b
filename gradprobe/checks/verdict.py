"""The verdict: which documented root causes hold, in order of impact, in plain words with the fix.

ROOT_CAUSES is the stable list (ids never change meaning; new ones go in at their rank). Impact order:
causes that stop every gradient come first, then those that corrupt what does arrive, then those
that only break `torch.autograd.grad` while backward() still works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .differential import DiffRun
from .facts import Facts

ROOT_CAUSES: dict[str, str] = {
    "grad_disabled": "the loss was built with gradient recording off (torch.no_grad / inference_mode)",
    "graph_detached": "S is cut from the graph between the model's logits and the loss",
    "adapter_disabled": "the adapter layers are disabled or merged, so their weights take no part in the forward",
    "adapter_not_trainable": "the adapter weights do not require grad (loaded without is_trainable=True)",
    "param_identity_mismatch": "the parameter list is not the model's current trainable parameters",
    "checkpoint_inputs_no_grad": "reentrant checkpointing without an input that requires grad",
    "empty_generation": "every response is empty, so S has no generated token to differentiate",
    "nonfinite_gradients": "NaN/Inf in the weights, the loss or the gradients",
    "optimizer_state_mismatch": "the optimizer state belongs to another model or adapter (counts or shapes differ)",
    "missing_optimizer_state": "the optimizer state lacks Adam moments for some parameters",
    "no_learning_signal": "every measured group has identical rewards, so Y is exactly zero",
    "unexplained_missing_gradients": "backward() leaves parameters without gradient and no check explains it",
    "reentrant_checkpointing_hides_params": "reentrant activation checkpointing hides the parameters from "
                                            "torch.autograd.grad (backward() still fills them)",
    "autograd_grad_mismatch": "torch.autograd.grad misses parameters that backward() fills, cause not identified",
    "healthy": "no gradient-flow problem found",
}

FIXES: dict[str, str] = {
    "grad_disabled": "Build the loss outside torch.no_grad()/torch.inference_mode(); keep those for generation only.",
    "graph_detached": "Compute S from the logits with torch operations end to end; use .detach()/.item() only for "
                      "logging.",
    "adapter_disabled": "Build the loss with the adapters enabled and unmerged (outside `with model.disable_adapter()`,"
                        " after model.unmerge_adapter()).",
    "adapter_not_trainable": "Load the adapter with PeftModel.from_pretrained(base, path, is_trainable=True) (or call "
                             "requires_grad_(True) on its weights) before building the optimizer and the list.",
    "param_identity_mismatch": "Take the list from the model you run, after every wrapper: [p for n, p in "
                               "model.named_parameters() if p.requires_grad]; build the optimizer from the same list.",
    "checkpoint_inputs_no_grad": "Call model.enable_input_require_grads(), or enable checkpointing with "
                                 "use_reentrant=False.",
    "empty_generation": "Fix generation or the rollouts file: max_new_tokens, EOS handling, prompt truncation and the "
                        "mask marking the generated region.",
    "nonfinite_gradients": "Reload the last finite checkpoint and find the step that produced NaN/Inf (learning rate, "
                           "fp16 overflow without a GradScaler).",
    "optimizer_state_mismatch": "Give the optimizer state saved with this adapter (the same checkpoint directory); "
                                "a state from another rank or target modules cannot precondition this one.",
    "missing_optimizer_state": "Use the state of an optimizer that has stepped every trainable parameter, or probe "
                               "with precondition=identity; never fill the gap with zeros (P = 1/eps ≈ 1e8).",
    "no_learning_signal": "Use groups whose rewards differ (a larger G or a reward with spread): a flat group "
                          "contributes nothing to the update.",
    "unexplained_missing_gradients": "Compare the parameters listed as missing with the modules your forward runs "
                                     "(hooks, wrappers, frozen submodules).",
    "reentrant_checkpointing_hides_params": "Read gradients from backward() and param.grad (as `gradprobe delta-h1` "
                                            "does), or enable checkpointing with use_reentrant=False: "
                                            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                                            "{'use_reentrant': False}).",
    "autograd_grad_mismatch": "Read gradients from backward() and param.grad; report the model to the gradprobe "
                              "issue tracker with this JSON.",
    "healthy": "Nothing to fix.",
}

IMPACT = list(ROOT_CAUSES)


@dataclass
class Cause:
    id: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    confirmed_by: list[str] = field(default_factory=list)  # differential factors that remove the symptom
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _fixers(runs: list[DiffRun], symptom: str) -> list[str]:
    return [r.factor for r in runs if r.applied and symptom in r.resolved]


def _count(st, n: int) -> str:
    return f"{st.nonnull}/{n}" if st is not None else "n/a"


def _grad_disabled(f: Facts) -> Cause | None:
    t, n, prim = f.m.trace, f.n, f.m.tensors[f.m.primary]
    if not (t.calls and (t.grad_enabled is False or t.inference_mode)):
        return None
    where = "diagnose was called inside a no-grad block" if not f.caller_grad_enabled or \
        f.caller_inference_mode else "the no-grad block is inside the loss code"
    return Cause("grad_disabled",
                 f"The model's forward ran with gradient recording off (grad enabled: {t.grad_enabled}, inference "
                 f"mode: {t.inference_mode}); {where}. S has no graph, so no gradient can reach the {n} parameters.",
                 {"grad_enabled_at_forward": t.grad_enabled, "inference_mode_at_forward": t.inference_mode,
                  "S_requires_grad": prim.requires_grad, "caller_grad_enabled": f.caller_grad_enabled},
                 _fixers(f.differential, "no_graph"))


def _graph_detached(f: Facts) -> Cause | None:
    t, key = f.m.trace, f.m.primary
    prim = f.m.tensors[key]
    grad_on = t.grad_enabled is not False and not t.inference_mode
    if prim.requires_grad and prim.grad_fn is not None or not grad_on or not (t.logits_require_grad or t.calls == 0):
        return None
    how = "the loss function returned a Python number" if prim.python_number else \
        ("the model's forward never ran inside the loss function" if t.calls == 0 else
         "the logits carry a graph but S does not")
    return Cause("graph_detached",
                 f"{key} has no graph (requires_grad={prim.requires_grad}, grad_fn={prim.grad_fn}) although grad mode "
                 f"was on: {how}. Something between the logits and S cuts the graph (.detach(), .item()/float() round "
                 f"trip, torch.tensor(list)).",
                 {"logits_require_grad": t.logits_require_grad, f"{key}_requires_grad": prim.requires_grad,
                  "grad_fn": prim.grad_fn, "python_number": prim.python_number},
                 _fixers(f.differential, "no_graph"))


def _adapter_disabled(f: Facts) -> Cause | None:
    a = f.adapters
    if not (a["adapter_layers"] and (a["disabled_layers"] or a["merged_layers"])):
        return None
    return Cause("adapter_disabled",
                 f"{a['disabled_layers']} of {a['adapter_layers']} adapter layers are disabled and "
                 f"{a['merged_layers']} merged: their LoRA weights do not take part in the forward.",
                 {"disabled_layers": a["disabled_layers"], "merged_layers": a["merged_layers"]},
                 _fixers(f.differential, "backward_missing") + _fixers(f.differential, "no_graph"))


def _adapter_not_trainable(f: Facts) -> Cause | None:
    a, n, bw = f.adapters, f.n, f.m.get(f.m.primary, "backward")
    if not (a["adapter_tensors"] and a["trainable_adapter_tensors"] < a["adapter_tensors"]):
        return None
    return Cause("adapter_not_trainable",
                 f"{a['adapter_tensors'] - a['trainable_adapter_tensors']} of {a['adapter_tensors']} adapter weights "
                 f"have requires_grad=False (an adapter loaded without is_trainable=True), so backward() fills "
                 f"{_count(bw, n)} and autograd.grad refuses them.",
                 {"trainable_adapter_tensors": f"{a['trainable_adapter_tensors']}/{a['adapter_tensors']}",
                  "frozen_in_list": len(f.identity.frozen_in_list), "backward_fills": _count(bw, n)},
                 _fixers(f.differential, "backward_missing") + _fixers(f.differential, "no_graph"))


def _param_identity(f: Facts) -> Cause | None:
    idn, n, bw = f.identity, f.n, f.m.get(f.m.primary, "backward")
    if not (idn.not_in_model or idn.trainable_not_in_list or idn.not_in_optimizer or idn.frozen_not_adapter):
        return None
    parts = []
    if idn.not_in_model:
        parts.append(f"{len(idn.not_in_model)} of the {n} tensors in the list are not parameters of the model "
                     f"(stale copies, or a model rebuilt after the list was taken)")
    if idn.trainable_not_in_list:
        parts.append(f"{len(idn.trainable_not_in_list)} of the model's {idn.model_trainable} trainable tensors are "
                     f"missing from the list" + (f" (it holds {len(idn.frozen_in_list)} frozen base tensors instead: "
                                                 f"captured before the PEFT wrapper?)" if idn.frozen_in_list else ""))
    elif idn.frozen_not_adapter:
        parts.append(f"{len(idn.frozen_not_adapter)} of the {n} tensors in the list are frozen (requires_grad=False): "
                     f"{', '.join(f.label(idn.frozen_not_adapter, 4))}")
    if idn.not_in_optimizer:
        parts.append(f"{len(idn.not_in_optimizer)} tensors of the list are not in the optimizer's param_groups")
    return Cause("param_identity_mismatch",
                 "; ".join(parts) + f". Through this list backward() shows {_count(bw, n)} gradients.",
                 {"in_model": f"{idn.in_model}/{n}", "not_in_model": len(idn.not_in_model),
                  "trainable_not_in_list": len(idn.trainable_not_in_list), "frozen_in_list": len(idn.frozen_in_list),
                  "not_in_optimizer": len(idn.not_in_optimizer), "backward_fills_list": _count(bw, n)},
                 [r.factor for r in f.differential if r.factor == "params=model_trainable" and r.fixes_all])


def _checkpoint_inputs(f: Facts) -> Cause | None:
    n, bw = f.n, f.m.get(f.m.primary, "backward")
    live_reentrant = f.ckpt["mode"] == "reentrant" and f.ckpt["active"]
    starved = bw is not None and f.unexplained(bw, f.m.primary)
    if not (live_reentrant and f.m.trace.inputs_require_grad is False and starved):
        return None
    return Cause("checkpoint_inputs_no_grad",
                 f"Reentrant checkpointing is live and no input of the checkpointed blocks requires grad, so their "
                 f"recomputation records no graph: backward() fills {_count(bw, n)}.",
                 {"inputs_require_grad": False, "backward_fills": _count(bw, n)},
                 _fixers(f.differential, "backward_missing"))


def _empty_generation(f: Facts) -> Cause | None:
    g, n, bw = f.generation, f.n, f.m.get(f.m.primary, "backward")
    all_zero = bw is not None and bw.nonnull > 0 and bw.nonzero == 0
    if not (g.given and g.rows and (g.empty_rows == g.rows or (g.empty_rows and all_zero))):
        return None
    nonzero = bw.nonzero if bw else None
    return Cause("empty_generation",
                 f"{g.empty_rows} of {g.rows} responses are empty (mean generated length {g.mean_length:.2f}): S sums "
                 f"over no token, so every gradient is exactly zero (backward() non-zero: {nonzero}/{n}).",
                 {"empty_rows": f"{g.empty_rows}/{g.rows}", "mean_length": round(g.mean_length, 2),
                  "backward_nonzero": nonzero})


def _nonfinite(f: Facts) -> Cause | None:
    m, n, bw = f.m, f.n, f.m.get(f.m.primary, "backward")
    bad_grads = sum(st.nonfinite for st in m.stats.values())
    finite_losses = all(ti.finite for ti in m.tensors.values() if ti.present)
    if not (f.nonfinite_params or bad_grads or not finite_losses):
        return None
    names = f.label(f.nonfinite_params, 4)
    where = f"{len(f.nonfinite_params)} parameter tensor(s) hold NaN/Inf ({', '.join(names)}); " \
        if f.nonfinite_params else ""
    return Cause("nonfinite_gradients",
                 f"{where}the loss is {'finite' if finite_losses else 'NaN/Inf'} and backward() returns non-finite "
                 f"gradients for {bw.nonfinite if bw else 'n/a'}/{n} tensors.",
                 {"nonfinite_weights": len(f.nonfinite_params), "nonfinite_weight_names": names,
                  "finite_loss": finite_losses, "nonfinite_grads": bw.nonfinite if bw else None})


def _optimizer_state(f: Facts) -> Cause | None:
    o, n = f.optimizer, f.n
    if not (o.given and (o.missing or o.error) and not o.not_adam):
        return None
    if o.mismatch and not o.missing:
        return Cause("optimizer_state_mismatch", f"The optimizer state does not fit the parameters: {o.error}.",
                     {"error": o.error})
    fresh = " (it has not taken a step yet)" if o.covered == 0 and o.never_stepped else ""
    missing = [f.names.index(nm) for nm in o.missing if nm in f.names]
    return Cause("missing_optimizer_state",
                 f"The optimizer state ({o.source}) has Adam moments for {o.covered} of {n} parameters{fresh}"
                 + (f"; {len(o.missing)} have none" if o.missing else "")
                 + (f": {o.error}" if o.error and not o.missing else "")
                 + ". A missing v would give P = 1/eps ≈ 1e8 for those parameters.",
                 {"covered": f"{o.covered}/{n}", "missing": len(o.missing), "missing_names": f.label(missing, 4)})


def _no_learning_signal(f: Facts) -> Cause | None:
    g, ly = f.generation, f.m.get("LY", "backward")
    if not (g.given and g.measured_flat and ly is not None and ly.nonzero == 0 and g.empty_rows < g.rows):
        return None
    return Cause("no_learning_signal",
                 f"Every group in the batch has identical rewards ({g.flat_groups}/{g.groups}), so every advantage "
                 f"and every Y gradient is exactly zero; deltaH1 = 0 is then the right answer.",
                 {"flat_reward_groups": f"{g.flat_groups}/{g.groups}"})


def _autograd_gap(f: Facts) -> Cause | None:
    n, m = f.n, f.m
    bw, ag = m.get(m.primary, "backward"), m.get(m.primary, "autograd.grad")
    if not (ag is not None and bw is not None and ag.nonnull < bw.nonnull):
        return None
    counts = {"autograd_grad_nonnull": f"{ag.nonnull}/{n}", "backward_nonnull": f"{bw.nonnull}/{n}"}
    fixers = _fixers(f.differential, "autograd_grad_gap")
    c = f.ckpt
    if not (c["mode"] == "reentrant" and c["active"]):
        return Cause("autograd_grad_mismatch",
                     f"torch.autograd.grad returns {ag.nonnull}/{n} while backward() fills {bw.nonnull}/{n}; "
                     f"checkpointing is {c['mode']}, so the cause is not identified.", counts, fixers)
    return Cause("reentrant_checkpointing_hides_params",
                 f"torch.autograd.grad returns None for {bw.nonnull - ag.nonnull} of {n} parameters while backward() "
                 f"fills {bw.nonnull}/{n}: reentrant activation checkpointing (use_reentrant={c['use_reentrant']}, "
                 f"{c['layers_checkpointed']} of {c['layers']} layers) runs each block's forward without recording a "
                 f"graph and writes the block's parameter gradients from a nested backward on recomputation, which "
                 f"autograd.grad never sees.",
                 {**counts, "checkpointing": "reentrant", "strict_error": m.strict_error}, fixers)


RULES = [_grad_disabled, _graph_detached, _adapter_disabled, _adapter_not_trainable, _param_identity,
         _checkpoint_inputs, _empty_generation, _nonfinite, _optimizer_state, _no_learning_signal, _autograd_gap]

# Causes that account for missing backward() gradients; without one of them the gap is reported as unexplained.
EXPLAINS_MISSING = {"grad_disabled", "graph_detached", "adapter_disabled", "adapter_not_trainable",
                    "param_identity_mismatch", "checkpoint_inputs_no_grad", "empty_generation", "no_learning_signal"}


def _unexplained(f: Facts, found: list[Cause]) -> Cause | None:
    bw = f.m.get(f.m.primary, "backward")
    missing = f.unexplained(bw, f.m.primary)
    if not missing or EXPLAINS_MISSING & {c.id for c in found}:
        return None
    return Cause("unexplained_missing_gradients",
                 f"backward() leaves {len(missing)}/{f.n} tensors without a non-zero gradient and no check explains "
                 f"it: {', '.join(f.label(missing, 4))}.",
                 {"missing": len(missing), "names": f.label(missing, 8)},
                 _fixers(f.differential, "backward_missing"))


def _causes(f: Facts) -> list[Cause]:
    """Every rule that holds, in order of impact, each with its fix."""
    found = [c for rule in RULES if (c := rule(f)) is not None]
    extra = _unexplained(f, found)
    found += [extra] if extra else []
    for c in found:
        c.fix = FIXES[c.id]
    return sorted(found, key=lambda c: IMPACT.index(c.id))


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
    if "backward_missing" in r.resolved or "no_graph" in r.resolved:
        parts.append(f"backward() fills {a.get('backward_nonnull')}/{n} ({a.get('backward_nonzero')} non-zero)")
    return " and ".join(parts) or "the symptom goes away"


# Causes no factor of the differential run could remove: it says nothing about them.
OUTSIDE_DIFFERENTIAL = {"empty_generation", "nonfinite_gradients", "optimizer_state_mismatch",
                        "missing_optimizer_state", "no_learning_signal"}


def _confirmation(c: Cause, runs: list[DiffRun]) -> str:
    tried = [r for r in runs if r.applied]
    if c.id in OUTSIDE_DIFFERENTIAL and not c.confirmed_by:
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
        return Verdict("healthy", [], summary, FIXES["healthy"], healthy, expected)
    first = causes[0]
    summary = first.summary + _confirmation(first, f.differential)
    if first.id in ("reentrant_checkpointing_hides_params", "autograd_grad_mismatch") or healthy:
        summary += " " + path
    if len(causes) > 1:
        summary += " Also (in order of impact): " + " ".join(
            f"[{c.id}] {c.summary}{_confirmation(c, f.differential)}" for c in causes[1:])
    if expected:
        summary += " " + " ".join(expected)
    return Verdict(first.id, causes, summary, first.fix, healthy, expected)

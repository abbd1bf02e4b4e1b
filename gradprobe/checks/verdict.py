"""The verdict: which documented root causes hold, in order of impact, in plain words with the fix.

ROOT_CAUSES is the stable list (ids never change meaning; new ones are appended). Impact order:
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


def _causes(f: Facts) -> list[Cause]:
    m, n, runs = f.m, f.n, f.differential
    t = m.trace
    prim = m.tensors[m.primary]
    bw = m.get(m.primary, "backward")
    ag = m.get(m.primary, "autograd.grad")
    out: list[Cause] = []

    if t.calls and (t.grad_enabled is False or t.inference_mode):
        where = "diagnose was called inside a no-grad block" if not f.caller_grad_enabled or \
            f.caller_inference_mode else "the no-grad block is inside the loss code"
        out.append(Cause("grad_disabled",
                         f"The model's forward ran with gradient recording off (grad enabled: {t.grad_enabled}, "
                         f"inference mode: {t.inference_mode}); {where}. S has no graph, so no gradient can reach "
                         f"the {n} parameters.",
                         {"grad_enabled_at_forward": t.grad_enabled, "inference_mode_at_forward": t.inference_mode,
                          "S_requires_grad": prim.requires_grad, "caller_grad_enabled": f.caller_grad_enabled},
                         _fixers(runs, "no_graph")))
    elif not (prim.requires_grad and prim.grad_fn is not None) and (t.logits_require_grad or t.calls == 0):
        how = "the loss function returned a Python number" if prim.python_number else \
            ("the model's forward never ran inside the loss function" if t.calls == 0 else
             "the logits carry a graph but S does not")
        out.append(Cause("graph_detached",
                         f"{m.primary} has no graph (requires_grad={prim.requires_grad}, grad_fn={prim.grad_fn}) "
                         f"although grad mode was on: {how}. Something between the logits and S cuts the graph "
                         f"(.detach(), .item()/float() round trip, torch.tensor(list)).",
                         {"logits_require_grad": t.logits_require_grad, f"{m.primary}_requires_grad":
                          prim.requires_grad, "grad_fn": prim.grad_fn, "python_number": prim.python_number},
                         _fixers(runs, "no_graph")))

    a = f.adapters
    if a["adapter_layers"] and (a["disabled_layers"] or a["merged_layers"]):
        out.append(Cause("adapter_disabled",
                         f"{a['disabled_layers']} of {a['adapter_layers']} adapter layers are disabled and "
                         f"{a['merged_layers']} merged: their LoRA weights do not take part in the forward.",
                         {"disabled_layers": a["disabled_layers"], "merged_layers": a["merged_layers"]},
                         _fixers(runs, "backward_missing") + _fixers(runs, "no_graph")))
    frozen_list = [i for i, p in enumerate(f.subject.params) if not p.requires_grad]
    if a["adapter_tensors"] and a["trainable_adapter_tensors"] < a["adapter_tensors"]:
        out.append(Cause("adapter_not_trainable",
                         f"{a['adapter_tensors'] - a['trainable_adapter_tensors']} of {a['adapter_tensors']} adapter "
                         f"weights have requires_grad=False (an adapter loaded without is_trainable=True), so "
                         f"backward() fills {_count(bw, n)} and autograd.grad refuses them.",
                         {"trainable_adapter_tensors": f"{a['trainable_adapter_tensors']}/{a['adapter_tensors']}",
                          "frozen_in_list": len(frozen_list), "backward_fills": _count(bw, n)},
                         _fixers(runs, "backward_missing") + _fixers(runs, "no_graph")))

    idn = f.identity
    if idn.not_in_model or idn.trainable_not_in_list or idn.not_in_optimizer or idn.frozen_not_adapter:
        parts = []
        if idn.not_in_model:
            parts.append(f"{len(idn.not_in_model)} of the {n} tensors in the list are not parameters of the model "
                         f"(stale copies, or a model rebuilt after the list was taken)")
        if idn.trainable_not_in_list:
            parts.append(f"{len(idn.trainable_not_in_list)} of the model's {idn.model_trainable} trainable tensors "
                         f"are missing from the list" + (f" (it holds {len(idn.frozen_in_list)} frozen base tensors "
                                                         f"instead: captured before the PEFT wrapper?)"
                                                         if idn.frozen_in_list else ""))
        elif idn.frozen_not_adapter:
            parts.append(f"{len(idn.frozen_not_adapter)} of the {n} tensors in the list are frozen "
                         f"(requires_grad=False): {', '.join(f.label(idn.frozen_not_adapter, 4))}")
        if idn.not_in_optimizer:
            parts.append(f"{len(idn.not_in_optimizer)} tensors of the list are not in the optimizer's param_groups")
        out.append(Cause("param_identity_mismatch",
                         "; ".join(parts) + f". Through this list backward() shows {_count(bw, n)} gradients.",
                         {"in_model": f"{idn.in_model}/{n}", "not_in_model": len(idn.not_in_model),
                          "trainable_not_in_list": len(idn.trainable_not_in_list),
                          "frozen_in_list": len(idn.frozen_in_list), "not_in_optimizer": len(idn.not_in_optimizer),
                          "backward_fills_list": _count(bw, n)},
                         [r.factor for r in runs if r.factor == "params=model_trainable" and r.fixes_all]))

    if f.ckpt["mode"] == "reentrant" and f.ckpt["active"] and t.inputs_require_grad is False and bw is not None \
            and f.unexplained(bw):
        out.append(Cause("checkpoint_inputs_no_grad",
                         f"Reentrant checkpointing is live and no input of the checkpointed blocks requires grad, "
                         f"so their recomputation records no graph: backward() fills {_count(bw, n)}.",
                         {"inputs_require_grad": False, "backward_fills": _count(bw, n)},
                         _fixers(runs, "backward_missing")))

    g = f.generation
    bw_zero = bw is not None and bw.nonnull > 0 and bw.nonzero == 0
    if g.given and g.rows and (g.empty_rows == g.rows or (g.empty_rows and bw_zero)):
        out.append(Cause("empty_generation",
                         f"{g.empty_rows} of {g.rows} responses are empty (mean generated length "
                         f"{g.mean_length:.2f}): S sums over no token, so every gradient is exactly zero "
                         f"(backward() non-zero: {bw.nonzero if bw else 'n/a'}/{n}).",
                         {"empty_rows": f"{g.empty_rows}/{g.rows}", "mean_length": round(g.mean_length, 2),
                          "backward_nonzero": bw.nonzero if bw else None}))

    nonfinite_grads = sum(st.nonfinite for st in m.stats.values())
    finite_losses = all(ti.finite for ti in m.tensors.values() if ti.present)
    if f.nonfinite_params or nonfinite_grads or not finite_losses:
        names = f.label(f.nonfinite_params, 4)
        out.append(Cause("nonfinite_gradients",
                         (f"{len(f.nonfinite_params)} parameter tensor(s) hold NaN/Inf ({', '.join(names)}); "
                          if f.nonfinite_params else "") +
                         f"the loss is {'finite' if finite_losses else 'NaN/Inf'} and backward() returns non-finite "
                         f"gradients for {bw.nonfinite if bw else 'n/a'}/{n} tensors.",
                         {"nonfinite_weights": len(f.nonfinite_params), "nonfinite_weight_names": names,
                          "finite_loss": finite_losses, "nonfinite_grads": bw.nonfinite if bw else None}))

    o = f.optimizer
    if o.given and (o.missing or o.error) and not o.not_adam:
        fresh = " (it has not taken a step yet)" if o.covered == 0 and o.never_stepped else ""
        out.append(Cause("missing_optimizer_state",
                         f"The optimizer state ({o.source}) has Adam moments for {o.covered} of {n} parameters{fresh}"
                         + (f"; {len(o.missing)} have none" if o.missing else "")
                         + (f": {o.error}" if o.error and not o.missing else "")
                         + ". A missing v would give P = 1/eps ≈ 1e8 for those parameters.",
                         {"covered": f"{o.covered}/{n}", "missing": len(o.missing),
                          "missing_names": [x for x in f.label([f.names.index(nm) for nm in o.missing
                                                                if nm in f.names], 4)]}))

    ly = m.get("LY", "backward")
    if g.given and g.measured_flat and ly is not None and ly.nonzero == 0 and not any(
            c.id == "empty_generation" for c in out):
        out.append(Cause("no_learning_signal",
                         f"Every group in the batch has identical rewards ({g.flat_groups}/{g.groups}), so every "
                         f"advantage and every Y gradient is exactly zero; deltaH1 = 0 is then the right answer.",
                         {"flat_reward_groups": f"{g.flat_groups}/{g.groups}"}))

    explained = {"grad_disabled", "graph_detached", "adapter_disabled", "adapter_not_trainable",
                 "param_identity_mismatch", "checkpoint_inputs_no_grad", "empty_generation", "no_learning_signal"}
    if bw is not None and f.unexplained(bw) and not explained & {c.id for c in out}:
        missing = f.unexplained(bw)
        out.append(Cause("unexplained_missing_gradients",
                         f"backward() leaves {len(missing)}/{n} tensors without a non-zero gradient and no check "
                         f"explains it: {', '.join(f.label(missing, 4))}.",
                         {"missing": len(missing), "names": f.label(missing, 8)}, _fixers(runs, "backward_missing")))

    if ag is not None and bw is not None and ag.nonnull < bw.nonnull:
        gap = bw.nonnull - ag.nonnull
        if f.ckpt["mode"] == "reentrant" and f.ckpt["active"]:
            fixers = _fixers(runs, "autograd_grad_gap")
            out.append(Cause("reentrant_checkpointing_hides_params",
                             f"torch.autograd.grad returns None for {gap} of {n} parameters while backward() "
                             f"fills {bw.nonnull}/{n}: reentrant activation checkpointing "
                             f"(use_reentrant={f.ckpt['use_reentrant']}, {f.ckpt['layers_checkpointed']} of "
                             f"{f.ckpt['layers']} layers) runs each block's forward without recording a graph and "
                             f"writes the block's parameter gradients from a nested backward on recomputation, which "
                             f"autograd.grad never sees.",
                             {"autograd_grad_nonnull": f"{ag.nonnull}/{n}", "backward_nonnull": f"{bw.nonnull}/{n}",
                              "checkpointing": "reentrant", "strict_error": m.strict_error}, fixers))
        else:
            out.append(Cause("autograd_grad_mismatch",
                             f"torch.autograd.grad returns {ag.nonnull}/{n} while backward() fills {bw.nonnull}/{n}; "
                             f"checkpointing is {f.ckpt['mode']}, so the cause is not identified.",
                             {"autograd_grad_nonnull": f"{ag.nonnull}/{n}", "backward_nonnull": f"{bw.nonnull}/{n}"},
                             _fixers(runs, "autograd_grad_gap")))

    for c in out:
        c.fix = FIXES[c.id]
    return sorted(out, key=lambda c: IMPACT.index(c.id))


def _probe_path(f: Facts) -> tuple[bool, str]:
    n = f.n
    parts, healthy = [], True
    for loss, label in (("LX", "X"), ("LY", "Y")):
        st = f.stats(loss, "backward")
        if st is None:
            continue
        ok = not f.unexplained(st) and not st.nonfinite and st.error is None
        healthy &= ok
        parts.append(f"{label} {st.nonnull}/{n} filled ({st.nonzero}/{n} non-zero)")
    if not parts:
        st = f.stats(f.m.primary, "backward")
        healthy = st is not None and not f.unexplained(st) and not st.nonfinite
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


def _confirmation(c: Cause, runs: list[DiffRun]) -> str:
    tried = [r for r in runs if r.applied]
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

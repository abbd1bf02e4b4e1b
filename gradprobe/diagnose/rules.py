"""The rules: each reads the gathered facts and, when its root cause holds, returns it with its evidence.

A rule states what it saw in numbers and names; the fix, the rank and whether the differential run can
confirm it live in the cause's record (causes.py). Rules read the state the model was in *during* the
user's forward (the adapter-layer hooks of measure.py), not only the state after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .differential import DiffRun
from .facts import Facts
from .model_state import short_name


@dataclass
class Cause:
    id: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    confirmed_by: list[str] = field(default_factory=list)  # differential factors that remove the symptom
    fix: str = ""
    after: str | None = None  # ranked right after this cause when both hold (it is implied by it)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["consequence_of"] = out.pop("after")
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
    if f.m.loss_error:
        return None
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
    """Adapter layers that ran disabled or merged in every call of the user's forward, their weights starved."""
    a, t = f.adapters, f.m.trace
    if f.m.loss_error:
        return None  # the forward did not finish
    # under live checkpointing the gradients come from a recomputation that may see other adapter state:
    # a layer that ran disabled is a finding even when its weights get a gradient
    recomputed = f.ckpt["active"]
    ran_disabled = f.layers_where(lambda s: s.calls and not s.effective and s.disabled, not recomputed)
    ran_merged = f.layers_where(lambda s: s.calls and not s.effective and s.merged, not recomputed)
    seen = any(s.calls for s in t.layers.values())
    after = a["disabled_layers"] or a["merged_layers"]
    if not (ran_disabled or ran_merged or (not seen and after and f.starved())):
        return None
    if not seen:
        ran_disabled, ran_merged = [f"{a['disabled_layers']} layers (read after the loss)"], []
    only_in_loss = seen and not after
    where = ("only while the loss ran (they are enabled again now: the loss code disables or merges them, e.g. "
             "`with model.disable_adapter()` around the forward that should train them)") if only_in_loss else \
        "and still are"
    starved = set(f.layers_where(lambda s: s.calls and not s.effective))
    if f.m.raised is not None and f.m.raised.kind == "checkpoint_recompute_mismatch":
        effect = ("and checkpointing's recomputation in backward, which runs them enabled again, differs from the "
                  "forward and raises")
    elif starved:
        effect = "so backward() leaves them without gradient"
    else:
        effect = \
        ("yet backward() fills them: checkpointing recomputes the blocks during backward with the adapters as they "
         "are then, so the gradient is not the one of the output the loss saw")
    return Cause("adapter_disabled",
                 f"{len(ran_disabled)} of {len(t.layers) or a['adapter_layers']} adapter layers ran disabled and "
                 f"{len(ran_merged)} merged during the forward, {where}: their LoRA weights take no part in the "
                 f"output, {effect}: {', '.join((ran_disabled + ran_merged)[:4])}.",
                 {"ran_disabled": ran_disabled, "ran_merged": ran_merged, "adapter_layers": len(t.layers),
                  "disabled_only_in_loss": only_in_loss, "disabled_after_loss": a["disabled_layers"],
                  "merged_after_loss": a["merged_layers"]},
                 _fixers(f.differential, "backward_missing") + _fixers(f.differential, "no_graph"))


def _adapter_bypassed(f: Facts) -> Cause | None:
    """Adapter layers that never ran, or ran with the list's adapter inactive or scaled to zero."""
    t = f.m.trace
    if not t.layers or f.m.loss_error:
        return None  # no adapter layers, or the forward did not finish
    absent = f.layers_where(lambda s: s.calls == 0)
    inactive = f.layers_where(lambda s: s.calls and not s.effective and s.inactive and not (s.disabled or s.merged))
    zero = f.layers_where(lambda s: s.calls and not s.effective and s.zero_scaling and not s.inactive)
    if not (absent or inactive or zero):
        return None
    total = len(t.layers)
    parts = []
    if absent:
        how = "the loss runs another module (a copy, or the model before it was wrapped)" if t.calls == 0 else \
            "the forward went around them (a module swapped for its base layer, a hook or a custom forward)"
        parts.append(f"{len(absent)} of {total} adapter layers never ran during the loss: {how}")
    if inactive:
        active = sorted({a for s in t.layers.values() for a in s.active})
        parts.append(f"{len(inactive)} ran with another adapter active ({', '.join(active) or 'none'}) than the one "
                     f"whose weights are in the list")
    if zero:
        parts.append(f"{len(zero)} of {total} adapter layers ran with their LoRA scaling at 0")
    names = absent + inactive + zero
    return Cause("adapter_bypassed",
                 "; ".join(parts) + f". Their weights get no gradient: {', '.join(names[:4])}.",
                 {"never_ran": absent, "other_adapter_active": inactive, "zero_scaling": zero,
                  "adapter_layers": total, "model_forward_calls": t.calls},
                 _fixers(f.differential, "backward_missing"))


def _params_from_inactive_adapter(f: Facts) -> Cause | None:
    """The list holds one adapter, the model has switched to another (set_adapter) and stays there."""
    listed, active = set(f.subject.adapters or ()), set(f.adapters["active_adapters"])
    if not listed or not active or listed & active or f.m.loss_error:
        return None
    ran_other = f.layers_where(lambda s: s.calls and s.inactive and not (s.disabled or s.merged), False)
    if not ran_other:
        return None
    idn = f.identity
    return Cause("params_from_inactive_adapter",
                 f"The parameter list holds the weights of adapter {', '.join(sorted(listed))}, but the model's active "
                 f"adapter is {', '.join(sorted(active))}, before and after the loss: {len(ran_other)} adapter layers "
                 f"ran with it, so the listed weights take no part and the {len(idn.trainable_not_in_list)} trainable "
                 f"tensors of the active adapter are missing from the list. The list was taken before set_adapter "
                 f"switched adapters.",
                 {"list_adapters": sorted(listed), "active_adapters": sorted(active), "ran_with_other": ran_other,
                  "active_trainable_not_in_list": [short_name(n) for n in idn.trainable_not_in_list[:8]],
                  "list_frozen": len(idn.frozen_in_list)})


def _dead_adapter(f: Facts) -> Cause | None:
    """lora_A and lora_B both zero: the gradients of both are exactly zero (not None) and stay so."""
    bw = f.m.get(f.m.primary, "backward")
    if bw is None or f.m.raised is not None or not f.dead:
        return None
    zero = sorted(f.dead & set(bw.zero))
    if not zero:
        return None
    layers = sorted({f.short[i].split(".lora_")[0] for i in zero})
    return Cause("dead_adapter",
                 f"{len(zero)} of {f.n} tensors belong to adapter layers whose lora_A and lora_B are both all zero "
                 f"({len(layers)} layers: {', '.join(layers[:4])}): dL/dA = B^T(...) = 0 and dL/dB = (...)(A x)^T = 0, "
                 f"so backward() returns exactly zero for both on this and every later step; the adapter is dead, "
                 f"not fresh (a fresh one has a random lora_A).",
                 {"dead_layers": len(layers), "dead_layer_names": layers[:8], "zero_tensors": len(zero),
                  "backward_nonzero": f"{bw.nonzero}/{f.n}"})


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
    only_optimizer = not (idn.not_in_model or idn.trainable_not_in_list or idn.frozen_not_adapter)
    return Cause("param_identity_mismatch",
                 "; ".join(parts) + f". Through this list backward() shows {_count(bw, n)} gradients.",
                 {"in_model": f"{idn.in_model}/{n}", "not_in_model": len(idn.not_in_model),
                  "trainable_not_in_list": len(idn.trainable_not_in_list), "frozen_in_list": len(idn.frozen_in_list),
                  "not_in_optimizer": len(idn.not_in_optimizer), "backward_fills_list": _count(bw, n)},
                 [r.factor for r in f.differential if r.factor == "params=model_trainable" and r.fixes_all],
                 after="missing_optimizer_state" if only_optimizer else None)


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


def _empty_loss_mask(f: Facts) -> Cause | None:
    """No logit position takes part in the loss: its gradient at the logits is zero everywhere (a masked sum over
    no token), or NaN everywhere with finite logits (a token mean of 0/0)."""
    m, g, t = f.m, f.generation, f.m.trace
    bw, lg = m.get(m.primary, "backward"), m.logit_grad
    if bw is None or lg is None or m.raised is not None:
        return None
    positions, reached, nonfinite = lg
    s_bw = m.get("S", "backward") if m.primary != "S" else None
    s_alive = s_bw is not None and s_bw.nonzero > 0  # the weights of S are zero (advantages), not its tokens
    scaled_back = any(r.factor.startswith("loss_scale=") and "backward_zero" in r.resolved for r in f.differential)
    zero = reached == 0 and bw.nonzero == 0 and not s_alive and not scaled_back
    nan_mean = reached > 0 and nonfinite == reached and t.logits_finite  # NaN wherever it reaches: 0/0
    if not (zero or nan_mean) or (g.given and g.rows and g.empty_rows == g.rows) or (zero and g.measured_flat):
        return None
    tokens = int(round(g.mean_length * g.rows)) if g.given and g.lengths_known else None
    if t.labels_given and t.label_tokens == 0:
        how = (f"every label is the ignore index -100 (0 of {t.label_positions} label positions count): the "
               f"completion template was not found, or truncation cut the response")
    else:
        how = "the loss's token mask selects no position (truncation inside the loss, or a mask for another range)"
        b = f.subject.batch
        if zero and (b is None or b.meta.get("rewards_unknown")):
            how += ", or every token's weight is zero (all advantages 0: pass rewards= to tell the two apart)"
    value = "NaN (a token mean of 0/0)" if nan_mean else "exactly zero"
    if tokens:
        given = f"; the batch holds {tokens} response tokens (lengths=)"
    else:
        given = "" if g.given else "; pass lengths= to compare with the response tokens the batch holds"
    return Cause("empty_loss_mask",
                 f"The loss's gradient reaches {0 if nan_mean else reached} of the {positions} logit "
                 f"positions the model produced and its gradient is {value}: {how}{given}. backward() returns "
                 f"{'NaN' if nan_mean else 'zero'} for every tensor ({bw.nonzero - bw.nonfinite}/{f.n} finite and "
                 f"non-zero).",
                 {"logit_positions": positions, "positions_in_loss": 0 if nan_mean else reached,
                  "nan_positions": nonfinite, "labels_given": t.labels_given,
                  "label_tokens": t.label_tokens if t.labels_given else None, "response_tokens": tokens,
                  "loss_finite": m.tensors[m.primary].finite})


def _loss_term_detached(f: Facts) -> Cause | None:
    """A term the loss says it sums that carries no graph. (A term with a graph whose gradient is zero here, e.g. a
    KL at the reference point, is not cut: the next step's gradient is not.)"""
    if not f.m.terms or f.m.raised is not None or not f.m.tensors[f.m.primary].requires_grad:
        return None
    cut = {k: t for k, t in f.m.terms.items() if not t.requires_grad}
    if not cut:
        return None
    alive = [k for k in f.m.terms if k not in cut]
    desc = "; ".join(k if t.value is None else f"{k} = {t.value:.4g}" for k, t in cut.items())
    return Cause("loss_term_detached",
                 f"{len(cut)} of {len(f.m.terms)} named loss terms are cut from the graph (requires_grad=False): "
                 f"{desc}. They move the loss value (and its logged number) but add nothing to the gradient, which "
                 f"comes from {', '.join(alive) or 'no term'} alone: computed under torch.no_grad(), .detach()ed or "
                 f".item()ed.",
                 {"cut_terms": sorted(cut), "terms_in_gradient": alive,
                  "term_values": [f"{k}={t.value:.6g}" for k, t in f.m.terms.items() if t.value is not None]})


def _update_lost(f: Facts) -> Cause | None:
    """Half-precision trainable tensors whose next optimizer step (the optimizer's own, on clones) rounds away."""
    p = f.precision
    if not p or not p.get("lost"):
        return None
    lost = p["lost"]
    first = lost[0]
    return Cause("update_lost_to_precision",
                 f"{len(lost)} trainable tensors are held in {first['dtype']} and the optimizer's next step (its own "
                 f"{p['optimizer']} step on clones, lr {p['lr']:.3g}) leaves {first['unchanged']} of their elements "
                 f"unchanged although their gradient is non-zero: the update is smaller than half a unit in the last "
                 f"place of the weight (|w| median {first['abs_median']:.3g}, half ulp {first['half_ulp']:.3g}), so "
                 f"the gradient is fine and the weight never moves: {', '.join(d['name'] for d in lost[:4])}.",
                 {"tensors": [d["name"] for d in lost], "dtype": first["dtype"], "lr": p["lr"],
                  "unchanged_elements": sum(d["unchanged_n"] for d in lost),
                  "elements": sum(d["numel"] for d in lost), "optimizer": p["optimizer"]})


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



def unexplained(f: Facts, found: list[Cause], explains: set[str]) -> Cause | None:
    """The catch-all: gradients missing while no cause in `explains` (those that account for it) holds."""
    bw = f.m.get(f.m.primary, "backward")
    missing = f.unexplained(bw, f.m.primary)
    if not missing or explains & {c.id for c in found}:
        return None
    return Cause("unexplained_missing_gradients",
                 f"backward() leaves {len(missing)}/{f.n} tensors without a non-zero gradient and no check explains "
                 f"it: {', '.join(f.label(missing, 4))}.",
                 {"missing": len(missing), "names": f.label(missing, 8)},
                 _fixers(f.differential, "backward_missing"))



def _eval_mode(f: Facts) -> Cause | None:
    """The forward ran in eval mode while dropout with p > 0 is configured: the gradient is not a training one."""
    t = f.m.trace
    layers_eval = sum(1 for s in t.layers.values() if s.calls and s.training is False)
    if not ((t.training is False or layers_eval) and f.dropout):
        return None
    run = next((r for r in f.differential if r.factor == "train_mode" and r.applied), None)
    change = f" With model.train() the gradient changes by {run.after['grad_rel_change']:.3g} (relative L2)." \
        if run and "grad_rel_change" in run.after else ""
    return Cause("eval_mode",
                 f"The model ran its forward in eval mode (model.training={t.training}, {layers_eval} of "
                 f"{len(t.layers)} adapter layers in eval) although dropout is configured "
                 f"({', '.join(f.dropout[:4])}): dropout is off, so the gradient is not the one a training step "
                 f"takes; activation checkpointing is off as well.{change}",
                 {"training_at_forward": t.training, "adapter_layers_in_eval": layers_eval,
                  "dropout": f.dropout[:8], **({"grad_rel_change": run.after.get("grad_rel_change")} if run else {})},
                 _fixers(f.differential, "eval_mode"))


def _gradient_underflow(f: Facts) -> Cause | None:
    """Gradients exactly zero that become non-zero when the loss is scaled: they underflowed in half precision."""
    run = next((r for r in f.differential if r.factor.startswith("loss_scale=") and "backward_zero" in r.resolved),
               None)
    if run is None:
        return None
    bw = f.m.get(f.m.primary, "backward")
    dtypes = sorted({d for s in f.m.trace.layers.values() for d in s.input_dtypes})
    return Cause("gradient_underflow",
                 f"backward() returns exactly zero for {len(bw.zero) if bw else 'n/a'} of {f.n} tensors, and "
                 f"{run.after.get('backward_nonzero')}/{f.n} are non-zero when the loss is multiplied by "
                 f"{run.factor.split('=')[1]}: the gradients underflow to zero in half precision (autocast "
                 f"{f.m.trace.autocast}, adapter-layer inputs {', '.join(dtypes) or 'unseen'}) because the loss is "
                 f"too small to survive the backward without loss scaling.",
                 {"zero_tensors": len(bw.zero) if bw else None,
                  "nonzero_after_scaling": run.after.get("backward_nonzero"),
                  "scale": run.factor.split("=")[1], "autocast_at_forward": f.m.trace.autocast,
                  "adapter_input_dtypes": dtypes},
                 [run.factor])


ERROR_TEXT = {
    "inference_tensors": "a tensor the loss uses was created under torch.inference_mode() (generation-time "
                         "tensors, cached inputs or logits): autograd cannot record or save it for backward",
    "checkpoint_recompute_mismatch": "activation checkpointing recomputed a block during backward and it did not "
                                     "see what the original forward saw: something the forward depends on changed "
                                     "in between (adapters enabled/disabled or merged, train/eval, autocast)",
    "dtype_mismatch": "two tensors of the loss meet with dtypes that do not fit (index tensors must be int64, "
                      "activations and weights must agree or run under autocast)",
    "device_mismatch": "the loss combines tensors on different devices",
    "loss_exception": "the loss code failed for a reason of its own",
}


def _raised(kind: str):
    def rule(f: Facts) -> Cause | None:
        r = f.m.raised
        if r is None or r.kind != kind:
            return None
        t = f.m.trace
        ev: dict[str, Any] = {"phase": r.phase, "exception": r.type, "message": r.message}
        tail = ""
        if r.phase == "backward":  # the forward finished: say how the adapter layers ran in it
            changed = f.layers_where(lambda s: s.calls and not s.effective)
            absent = f.layers_where(lambda s: s.calls == 0)
            if changed:
                ev["adapter_layers_off_at_forward"] = changed
                tail += (f" During the forward {len(changed)} adapter layers ran disabled, merged or with another "
                         f"adapter active ({', '.join(changed[:3])}); "
                         + ("they are back to normal now, so a recomputation in backward sees other weights."
                            if not (f.adapters["disabled_layers"] or f.adapters["merged_layers"]) else
                            "they still are."))
            if absent:
                ev["adapter_layers_bypassed_at_forward"] = absent
                tail += (f" The forward went around {len(absent)} adapter layers ({', '.join(absent[:3])}), which a "
                         f"recomputation in backward runs again.")
        if kind == "checkpoint_recompute_mismatch":
            ev["checkpointing"] = f.ckpt["mode"]
            ev["training_at_forward"] = t.training
        where = "The loss function raised" if r.phase == "loss" else "backward() through the loss raised"
        measured = "no gradient could be measured" if r.phase == "loss" else \
            "the gradient checks saw no gradient through backward()"
        return Cause(kind, f"{where} {r.type}: {r.message} — {ERROR_TEXT[kind]}; {measured}.{tail}", ev,
                     _fixers(f.differential, "loss_error") + _fixers(f.differential, "backward_error"))
    rule.__name__ = f"_raised_{kind}"
    return rule


def _by_layer(names: list[str]) -> list[str]:
    """Parameter names grouped by the module that holds them: 'layers.1.self_attn.q_proj (lora_A, lora_B)'."""
    groups: dict[str, list[str]] = {}
    for n in names:
        short = short_name(n)
        layer, _, leaf = short.partition(".lora_")
        groups.setdefault(layer, []).append(f"lora_{leaf.split('.')[0]}" if leaf else short)
    return [f"{k} ({', '.join(v)})" for k, v in groups.items()]


def _ddp_reentrant(f: Facts) -> Cause | None:
    r, d, c = f.m.raised, f.ddp, f.ckpt
    if r is None or r.kind != "ddp_reentrant_checkpointing":
        return None
    layers = sorted({short_name(n).split(".self_attn")[0].split(".mlp")[0] for n in f.m.trace.layers
                     if ".layers." in n})
    return Cause("ddp_reentrant_checkpointing",
                 f"backward() raised {r.type}: {r.message[:160]} — DistributedDataParallel "
                 f"(find_unused_parameters={d['find_unused_parameters'] if d else 'n/a'}, static_graph="
                 f"{d['static_graph'] if d else 'n/a'}) marks each parameter ready when its gradient arrives, and "
                 f"reentrant checkpointing ({c['layers_checkpointed']} of {c['layers']} blocks) produces the "
                 f"gradients of every checkpointed block's LoRA weights in a nested backward during recomputation, "
                 f"after the reducer has already searched the graph for unused parameters: {', '.join(layers[:4])}.",
                 {"ddp": d is not None, "find_unused_parameters": d["find_unused_parameters"] if d else None,
                  "static_graph": d["static_graph"] if d else None, "checkpointing": c["mode"],
                  "checkpointed_blocks": layers, "exception": r.type, "message": r.message, "phase": r.phase})


def _ddp_unused(f: Facts) -> Cause | None:
    """Trainable parameters without gradient under DDP(find_unused_parameters=False), by layer: from the reducer's
    own message (a later forward raises), or from the backward that leaves them without gradient."""
    d, r = f.ddp, f.m.raised
    if d is None or d["find_unused_parameters"]:
        return None
    if r is not None and r.kind == "ddp_unused_parameters":
        names = [d["reducer_names"][i] for i in r.indices if i < len(d["reducer_names"])]
        source = f"the next forward raised {r.type}: {r.message[:120]}"
    else:
        bw = f.m.get(f.m.primary, "backward")
        if bw is None or r is not None or not bw.missing or f.m.loss_error:
            return None
        names = [f.names[i] for i in bw.missing]
        source = ("backward() leaves them without gradient, so DDP's reducer never finishes this step's reduction "
                  "and the next forward raises 'Expected to have finished reduction in the prior iteration'")
    layers = _by_layer(names)
    return Cause("ddp_unused_parameters",
                 f"DistributedDataParallel (find_unused_parameters=False, world size {d['world_size']}) holds "
                 f"{len(names)} trainable tensors the loss never uses: {source}. Unused, by layer: "
                 f"{'; '.join(layers[:6]) or 'not named (set TORCH_DISTRIBUTED_DEBUG=INFO)'}.",
                 {"find_unused_parameters": False, "unused_tensors": len(names), "unused_by_layer": layers,
                  "world_size": d["world_size"], **({"exception": r.type, "message": r.message} if r else {})})


LOGPROB_TEXT = {
    "temperature": "they were taken at another temperature than the loss uses (the old ones fit temperature "
                   "{old_fits_temperature}, the loss's S fits {loss_fits_temperature}, both from the captured logits)",
    "padding": "the gap sits on the {padded_rows} padded rows only (mean {gap_on_padded_rows} nats per token there, at "
               "most {gap_on_unpadded_rows} on the others): padding is handled differently (position ids or attention "
               "mask of left-padded rows)",
    "truncation": "{rows_with_other_token_count} sequences cover another number of tokens in the old log-probs than "
                  "in the loss ({examples}): a truncated or shifted response range",
    "top_p": "the sampler renormalised its log-probs over the mass a top-p filter keeps (they fit top_p "
             "{old_fits_top_p}: old = recomputed - log(kept mass) per token), the loss over the whole vocabulary",
    "top_k": "the sampler renormalised its log-probs over the mass a top-k filter keeps (they fit top_k "
             "{old_fits_top_k}: old = recomputed - log(kept mass) per token), the loss over the whole vocabulary",
    "shifted": "the old log-probs cover the same number of tokens but a response range one token {shift_direction} "
               "(they match the loss's logits there, shift {old_fits_shift}): an off-by-one in the response start",
    "unclassified": "the gap fits none of temperature, top-p/top-k renormalisation, padding, truncation or a shifted "
                    "range",
}


def _logprob_mismatch(f: Facts) -> Cause | None:
    g = f.logprobs
    if g is None or g.kind in ("match", "not_compared"):
        return None
    ev = dict(g.evidence, kind=g.kind)
    fmt = {k: (("..".join(map(str, v)) if all(isinstance(x, (int, float)) for x in v) else ", ".join(v))
               if isinstance(v, list) else v) for k, v in g.evidence.items()}
    size = f"mean {g.mean_gap:.3g} nats per sequence, max {g.max_gap:.3g}" + \
        (f", {g.per_token:.3g} per token" if g.per_token is not None else "")
    return Cause("logprob_mismatch",
                 f"The sampling-time log-probs differ from the ones the loss recomputes ({size}): "
                 f"{LOGPROB_TEXT[g.kind].format(**fmt)}. The importance ratio and KL are off by this much.", ev)

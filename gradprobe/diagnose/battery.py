"""The checks: each reads the gathered facts and returns one Check (status, evidence, fix).

Order: the seed's Plan B first (strict gradient, S alive, parameter identity, coverage), then the
probe path, the usual suspects and the stack itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .causes import BY_ID
from .check import FAIL, PASS, WARN, Check
from .facts import Facts
from .measure import GradStats
from .model_state import short_name

BACKWARD_FIX = "Take gradients with loss.backward() and read param.grad (as `gradprobe delta-h1` does)."
NON_REENTRANT_FIX = ("or switch checkpointing to non-reentrant: model.gradient_checkpointing_enable("
                     "gradient_checkpointing_kwargs={'use_reentrant': False}).")


def _count(st: GradStats | None, n: int) -> str:
    if st is None:
        return "not measured"
    if st.error and st.nonnull == 0:
        return f"0/{n} ({st.error})"
    return f"{st.nonnull}/{n} (non-zero {st.nonzero})"


def _names(f: Facts, idx: list[int]) -> list[str]:
    return _model_names([f.names[i] for i in idx])


def _model_names(names: list[str]) -> list[str]:
    """Short names, all of them (the table shortens long lists, the JSON keeps them whole)."""
    return [short_name(n) for n in names]


def strict_autograd_grad(f: Facts) -> Check:
    m, n = f.m, f.n
    ev: dict = {"loss": m.primary, "params": n}
    if m.strict_error is None:
        ev["result"] = f"all {n} parameters reached"
        return Check("strict_autograd_grad", "strict autograd.grad", PASS, ev)
    ev["error"] = m.strict_error
    ag = m.get(m.primary, "autograd.grad")
    if ag is not None:
        ev["unused"] = f"{len(ag.missing)}/{n}"
        ev["unused_names"] = _names(f, ag.missing)
    reentrant = f.ckpt["mode"] == "reentrant" and f.ckpt["active"]
    fix = f"{BACKWARD_FIX[:-1]}, {NON_REENTRANT_FIX}" if reentrant else \
        "Find what cuts these parameters out of the graph (the verdict names it); until then use backward()."
    return Check("strict_autograd_grad", "strict autograd.grad", FAIL, ev, fix)


def s_alive(f: Facts) -> Check:
    m, n = f.m, f.n
    key = "S" if m.tensors["S"].present else m.primary
    t = m.tensors[key]
    bw = m.get(key, "backward")
    ev: dict = {"tensor": key if key != "S" else "S", "requires_grad": t.requires_grad, "grad_fn": t.grad_fn,
                "dtype": t.dtype, "device": t.device}
    if t.python_number:
        ev["note"] = "the loss function returned a Python number, not a tensor"
    if bw is not None:
        ev[f"backward({key}{'.sum()' if key == 'S' else ''}) fills"] = f"{bw.nonnull}/{n}"
    alive = t.requires_grad and t.grad_fn is not None
    if not alive or bw is None or bw.nonnull == 0:
        return Check("s_alive", "S is alive", FAIL, ev,
                     "Keep S on the graph from the logits on: no torch.no_grad(), .detach(), .item()/float() round "
                     "trips or torch.tensor(list) between the model's output and S.")
    if bw.nonnull < n:
        return Check("s_alive", "S is alive", WARN, ev, "Some parameters get no gradient from S; see coverage.")
    return Check("s_alive", "S is alive", PASS, ev)


def param_identity(f: Facts) -> Check:
    idn, n = f.identity, f.n
    ev: dict = {"list": n, "in_model": f"{idn.in_model}/{n}", "model_trainable": idn.model_trainable,
                "trainable_in_list": f"{idn.model_trainable - len(idn.trainable_not_in_list)}/{idn.model_trainable}"}
    if idn.not_in_model:
        ev["not_in_model"] = len(idn.not_in_model)
    if idn.trainable_not_in_list:
        ev["trainable_not_in_list_names"] = _model_names(idn.trainable_not_in_list)
    if idn.frozen_in_list:
        ev["frozen_in_list"] = len(idn.frozen_in_list)
    if idn.duplicates:
        ev["duplicates"] = idn.duplicates
    if idn.optimizer_given:
        ev["in_optimizer"] = f"{n - len(idn.not_in_optimizer)}/{n}"
        if idn.not_in_optimizer:
            ev["not_in_optimizer_names"] = _names(f, idn.not_in_optimizer)
        if idn.optimizer_extra:
            ev["optimizer_extra"] = idn.optimizer_extra
    fix = ("Build the parameter list (and the optimizer) from the model you run, after every wrapper: "
           "[p for n, p in model.named_parameters() if p.requires_grad].")
    if idn.not_in_model or idn.trainable_not_in_list or idn.not_in_optimizer or idn.frozen_not_adapter:
        return Check("param_identity", "parameter identity", FAIL, ev, fix)
    if idn.frozen_in_list or idn.duplicates or idn.optimizer_extra:
        return Check("param_identity", "parameter identity", WARN, ev,
                     "The list holds frozen or repeated tensors; see the adapters check.")
    return Check("param_identity", "parameter identity", PASS, ev)


def coverage(f: Facts) -> Check:
    n = f.n
    ev: dict = {}
    rows = {}
    for loss, label in (("LX", "X"), ("LY", "Y")):
        for api in ("backward", "autograd.grad"):
            st = f.stats(loss, api)
            if st is not None:
                ev[f"{label} {api}"] = _count(st, n)
                rows[(label, api)] = st
    if not rows:
        key = f.m.primary
        for api in ("backward", "autograd.grad"):
            st = f.stats(key, api)
            if st is not None:
                ev[f"{key} {api}"] = _count(st, n)
                rows[(key, api)] = st
    if f.expected_zero:
        ev["expected_zero"] = f"{len(f.expected_zero)} lora_A (their lora_B is zero)"
    bx, by = rows.get(("X", "backward")), rows.get(("Y", "backward"))
    if bx is not None and by is not None and (bx.nonnull != by.nonnull):
        return Check("coverage", "coverage X vs Y", FAIL, ev,
                     "X and Y get different parameters through the same API: compare how the two losses are built.")
    gap = [(k, st) for k, st in rows.items() if k[1] == "autograd.grad"
           and rows.get((k[0], "backward")) is not None and st.nonnull != rows[(k[0], "backward")].nonnull]
    if gap:
        return Check("coverage", "coverage X vs Y", WARN, ev,
                     "autograd.grad and backward() disagree: trust backward() + param.grad (see the verdict).")
    return Check("coverage", "coverage X vs Y", PASS, ev)


def probe_path(f: Facts) -> Check:
    """Plan A's path: backward() with zero_grad isolation, read from param.grad."""
    n = f.n
    ev: dict = {}
    bad: list[int] = []
    nonfinite = 0
    measured = False
    for loss, label in (("LX", "X"), ("LY", "Y")):
        st = f.stats(loss, "backward")
        if st is None:
            continue
        measured = True
        miss = f.unexplained(st, loss)
        bad.extend(miss)
        nonfinite += st.nonfinite
        ev[label] = f"{st.nonnull}/{n} filled, ‖{label}‖ = {st.norm:.3g}"
        if st.error:
            ev[f"{label} error"] = st.error
    if not measured:
        st = f.stats(f.m.primary, "backward")
        if st is not None:
            bad.extend(f.unexplained(st, f.m.primary))
            nonfinite += st.nonfinite
            ev[f.m.primary] = f"{st.nonnull}/{n} filled, norm {st.norm:.3g}"
    if f.expected_zero:
        ev["expected_zero"] = len(f.expected_zero)
    bad = sorted(set(bad))
    if bad or nonfinite:
        if bad:
            ev["no_gradient"] = _names(f, bad)
        if nonfinite:
            ev["nonfinite"] = nonfinite
        return Check("probe_path", "backward() probe path", FAIL, ev,
                     "The backward() path misses gradients too: fix the cause the verdict names before probing.")
    return Check("probe_path", "backward() probe path", PASS, ev)


def generation(f: Facts) -> Check:
    g = f.generation
    if not g.given:
        return Check("generation", "generated lengths", PASS,
                     {"batch": "not given (pass rewards=/lengths= or batch= to check)"})
    ev = {"rows": g.rows, "mean_length": round(g.mean_length, 2) if g.lengths_known else "not given",
          "max_length": g.max_length if g.lengths_known else "not given",
          "empty_rows": f"{g.empty_rows}/{g.rows}" if g.lengths_known else "not given",
          "flat_reward_groups": f"{g.flat_groups}/{g.groups}",
          "measured_groups": len(g.measured_groups)}
    fix = ("Check generation: max_new_tokens, EOS handling, prompt truncation and the mask that marks the "
           "generated region.")
    if g.rows and g.empty_rows == g.rows:
        return Check("generation", "generated lengths", FAIL, ev, fix)
    if g.empty_rows:
        return Check("generation", "generated lengths", WARN, ev, fix)
    if g.groups and g.flat_groups == g.groups:
        return Check("generation", "generated lengths", WARN, ev,
                     "Every group has identical rewards, so every Y is exactly zero: use rewards with spread.")
    return Check("generation", "generated lengths", PASS, ev)


def grad_mode(f: Facts) -> Check:
    t = f.m.trace
    ev = {"grad_enabled_at_forward": t.grad_enabled, "inference_mode_at_forward": t.inference_mode,
          "forward_calls": t.calls, "caller_grad_enabled": f.caller_grad_enabled,
          "caller_inference_mode": f.caller_inference_mode}
    if t.calls == 0:
        return Check("grad_mode", "grad mode at loss time", FAIL, ev,
                     "The model's forward never ran inside the loss function: build S from a fresh forward.")
    if not t.grad_enabled or t.inference_mode:
        return Check("grad_mode", "grad mode at loss time", FAIL, ev,
                     "Build the loss outside torch.no_grad()/torch.inference_mode(); keep those for generation.")
    return Check("grad_mode", "grad mode at loss time", PASS, ev)


def train_mode(f: Facts) -> Check:
    t = f.m.trace
    layers_eval = sum(1 for s in t.layers.values() if s.calls and s.training is False)
    ev = {"training_at_forward": t.training, "adapter_layers_in_eval": f"{layers_eval}/{len(t.layers)}",
          "dropout": f.dropout or "none with p > 0", "autocast_at_forward": t.autocast}
    if t.training is False or layers_eval:
        if f.dropout:
            return Check("train_mode", "train mode, autocast", FAIL, ev,
                         "The model ran in eval mode with dropout configured: its gradient is not a training step's; "
                         "call model.train() before building the loss.")
        ev["note"] = "no dropout with p > 0: the gradient equals the train-mode one; checkpointing is off in eval mode"
        return Check("train_mode", "train mode, autocast", WARN, ev,
                     "Call model.train() before building the loss (eval mode turns activation checkpointing off).")
    return Check("train_mode", "train mode, autocast", PASS, ev)


def loss_runs(f: Facts) -> Check:
    r = f.m.raised
    if r is None:
        return Check("loss_runs", "loss and backward run", PASS, {"loss": f.m.primary})
    ev = {"phase": r.phase, "exception": r.type, "message": r.message, "class": r.kind}
    return Check("loss_runs", "loss and backward run", FAIL, ev, BY_ID[r.kind].fix)


def old_logprobs(f: Facts) -> Check:
    g = f.logprobs
    if g is None:
        return Check("old_logprobs", "old log-probs", PASS, {"old_logprobs": "not given"})
    ev = dict(g.evidence, result=g.kind)
    if g.kind == "not_compared":
        return Check("old_logprobs", "old log-probs", WARN, ev, "Return S (per-sequence log-probs) from the loss "
                     "function, e.g. {'S': s, 'LY': loss}, to compare it with the old log-probs.")
    if g.kind != "match":
        return Check("old_logprobs", "old log-probs", FAIL, ev, BY_ID["logprob_mismatch"].fix)
    return Check("old_logprobs", "old log-probs", PASS, ev)


def adapter_forward(f: Facts) -> Check:
    """The adapter layers as the user's forward met them (hooks while the loss ran)."""
    layers = f.m.trace.layers
    if not layers:
        return Check("adapter_forward", "adapter layers in the forward", PASS, {"adapter_layers": 0})
    ran = [n for n, s in layers.items() if s.calls]
    effective = [n for n, s in layers.items() if s.effective]

    def names(pick) -> list[str]:
        return [short_name(n) for n, s in layers.items() if pick(s)]

    dtypes = sorted({d for s in layers.values() for d in s.input_dtypes})
    active = sorted({a for s in layers.values() for a in s.active})
    scales = sorted({v for s in layers.values() for v in s.scaling.values()})
    ev: dict = {"adapter_layers": len(layers), "ran": f"{len(ran)}/{len(layers)}",
                "took_part": f"{len(effective)}/{len(layers)}", "active_adapters": ",".join(active) or "none",
                "scaling": ",".join(f"{v:g}" for v in scales) or "n/a", "input_dtypes": ",".join(dtypes) or "n/a",
                "list_adapters": ",".join(sorted(f.subject.adapters or [])) or "n/a"}
    never = names(lambda s: s.calls == 0)
    off = names(lambda s: s.calls and not s.effective)
    if never:
        ev["never_ran"] = never
    if off:
        ev["ran_without_adapter"] = off
        ev["ran_disabled"] = names(lambda s: s.calls and not s.effective and s.disabled)
        ev["ran_merged"] = names(lambda s: s.calls and not s.effective and s.merged)
    if never or off:
        starved = {c.id for c in _adapter_causes(f)}
        status = FAIL if starved else WARN
        return Check("adapter_forward", "adapter layers in the forward", status, ev,
                     "Run the loss through the model you train with its adapters enabled, unmerged and active "
                     "in every LoRA layer (the verdict names what was off).")
    return Check("adapter_forward", "adapter layers in the forward", PASS, ev)


def _adapter_causes(f: Facts) -> list:
    from .rules import _adapter_bypassed, _adapter_disabled

    return [c for c in (_adapter_disabled(f), _adapter_bypassed(f)) if c is not None]


def checkpointing(f: Facts) -> Check:
    c = f.ckpt
    ev = {"mode": c["mode"], "use_reentrant": c["use_reentrant"],
          "layers_checkpointed": f"{c['layers_checkpointed']}/{c['layers']}", "active": c["active"]}
    if c["mode"] in ("reentrant", "mixed", "unknown") and c["layers_checkpointed"]:
        return Check("checkpointing", "activation checkpointing", WARN, ev,
                     "Reentrant checkpointing hides parameters from autograd.grad; prefer use_reentrant=False.")
    return Check("checkpointing", "activation checkpointing", PASS, ev)


def input_grads(f: Facts) -> Check:
    t = f.m.trace
    ev = {"inputs_require_grad": t.inputs_require_grad, "checkpointing": f.ckpt["mode"]}
    if f.ckpt["mode"] == "reentrant" and f.ckpt["active"] and t.inputs_require_grad is False:
        return Check("input_grads", "inputs require grad", FAIL, ev,
                     "Reentrant checkpointing needs an input that requires grad: call model.enable_input_require_"
                     "grads(), or use use_reentrant=False.")
    return Check("input_grads", "inputs require grad", PASS, ev)


def adapters(f: Facts) -> Check:
    a = f.adapters
    ev = {"adapter_layers": a["adapter_layers"], "active": ",".join(a["active_adapters"]) or "none",
          "disabled_layers": a["disabled_layers"], "merged_layers": a["merged_layers"],
          "trainable": f"{a['trainable_adapter_tensors']}/{a['adapter_tensors']}"}
    if not a["adapter_layers"]:
        ev["note"] = "no PEFT adapter layers found"
        return Check("adapters", "adapters enabled, trainable", PASS, ev)
    if a["disabled_layers"] or a["merged_layers"]:
        return Check("adapters", "adapters enabled, trainable", FAIL, ev,
                     "Enable and unmerge the adapters before building the loss (leave `with model.disable_adapter()`"
                     ", call model.unmerge_adapter()).")
    if f.dead:
        ev["dead"] = _names(f, sorted(f.dead))
        return Check("adapters", "adapters enabled, trainable", FAIL, ev, BY_ID["dead_adapter"].fix)
    if a["trainable_adapter_tensors"] < a["adapter_tensors"]:
        ev["frozen"] = _model_names(a["frozen_adapter_names"])
        return Check("adapters", "adapters enabled, trainable", FAIL, ev,
                     "Load the adapter as trainable: PeftModel.from_pretrained(base, path, is_trainable=True), or "
                     "requires_grad_(True) on its weights, before building the optimizer.")
    return Check("adapters", "adapters enabled, trainable", PASS, ev)


def quantization(f: Facts) -> Check:
    q = f.quant
    ev = {k: (",".join(v) if isinstance(v, list) else v) for k, v in q.items()}
    if f.subject.expect_4bit and not q.get("linear4bit"):
        return Check("quantization", "4-bit layers", FAIL, ev,
                     "The config asks for a 4-bit base but no bitsandbytes Linear4bit layer was found.")
    if q.get("trainable_4bit_weights"):
        return Check("quantization", "4-bit layers", WARN, ev,
                     "4-bit base weights are marked trainable; freeze them (prepare_model_for_kbit_training).")
    return Check("quantization", "4-bit layers", PASS, ev)


def lora_dtype(f: Facts) -> Check:
    dtypes = f.adapters["dtypes"]
    ev = {"dtypes": ",".join(dtypes) or "none"}
    half = [d for d in dtypes if d in ("bfloat16", "float16")]
    if half:
        return Check("lora_dtype", "LoRA dtype", WARN, ev,
                     "Keep LoRA weights in float32 (autocast computes in bf16 anyway); half-precision weights round "
                     "small updates away.")
    return Check("lora_dtype", "LoRA dtype", PASS, ev)


def nonfinite(f: Facts) -> Check:
    ev: dict = {"nonfinite_weights": len(f.nonfinite_params)}
    if f.nonfinite_params:
        ev["nonfinite_weight_names"] = _names(f, f.nonfinite_params)
    for loss, label in (("LX", "X"), ("LY", "Y"), ("S", "S")):
        st = f.stats(loss, "backward")
        if st is not None:
            ev[f"nonfinite_grads_{label}"] = st.nonfinite
    losses = {k: t.finite for k, t in f.m.tensors.items() if t.present}
    ev["finite_losses"] = ",".join(f"{k}={'yes' if v else 'no'}" for k, v in losses.items())
    grads_bad = any(v for k, v in ev.items() if k.startswith("nonfinite_grads"))
    if f.nonfinite_params or grads_bad or not all(losses.values()):
        return Check("nonfinite", "NaN/Inf", FAIL, ev,
                     "Restore finite weights (reload the last good checkpoint) and find the step that produced them "
                     "(learning rate, fp16 overflow without a GradScaler).")
    return Check("nonfinite", "NaN/Inf", PASS, ev)


def optimizer_state(f: Facts) -> Check:
    o, n = f.optimizer, f.n
    if not o.given:
        return Check("optimizer_state", "preconditioner coverage", PASS,
                     {"optimizer": "not given: identity preconditioner"})
    ev: dict = {"source": o.source, "covered": f"{o.covered}/{n}"}
    if o.not_adam:
        ev["note"] = f"{o.not_adam} keeps no Adam second moments"
        return Check("optimizer_state", "preconditioner coverage", WARN, ev,
                     "The preconditioner needs Adam/AdamW state; probe with precondition=identity.")
    if o.never_stepped and not (o.error or o.missing):
        ev["note"] = "the optimizer has not taken a step yet: it has no moments, which is expected before step 1"
        return Check("optimizer_state", "preconditioner coverage", WARN, ev,
                     "Probe with precondition=identity before the first step, or after a step with this optimizer.")
    if o.error or o.missing:
        if o.never_stepped:
            ev["note"] = "the optimizer has not taken a step yet"
        if o.missing:
            ev["missing"] = f"{len(o.missing)}/{n}"
            ev["missing_names"] = _model_names(o.missing)
        if o.error:
            ev["error"] = o.error
        if o.mismatch and not o.missing:
            return Check("optimizer_state", "preconditioner coverage", FAIL, ev, BY_ID["optimizer_state_mismatch"].fix)
        return Check("optimizer_state", "preconditioner coverage", FAIL, ev,
                     "Give the state of an optimizer that has stepped every trainable parameter, or probe with "
                     "precondition=identity; never fill missing state with zeros (P = 1/eps ≈ 1e8).")
    if o.zero_v:
        ev["zero_second_moment"] = len(o.zero_v)
        return Check("optimizer_state", "preconditioner coverage", WARN, ev,
                     "Some exp_avg_sq are all zero: P = 1/eps there, which dominates the probe.")
    return Check("optimizer_state", "preconditioner coverage", PASS, ev)


def loss_mask(f: Facts) -> Check:
    """Which logit positions the loss's gradient reaches (a hook on the logits during the primary backward)."""
    lg, t = f.m.logit_grad, f.m.trace
    if lg is None:
        return Check("loss_mask", "loss reaches tokens", PASS,
                     {"logit_positions": "not measured (the loss carries no graph through the logits)"})
    positions, reached, nonfinite = lg
    ev: dict = {"logit_positions": positions, "reached": reached, "nan_positions": nonfinite}
    if t.labels_given:
        ev["label_tokens"] = f"{t.label_tokens}/{t.label_positions}"
    if any(c.id == "empty_loss_mask" for c in _mask_causes(f)):
        return Check("loss_mask", "loss reaches tokens", FAIL, ev, BY_ID["empty_loss_mask"].fix)
    return Check("loss_mask", "loss reaches tokens", PASS, ev)


def _mask_causes(f: Facts) -> list:
    from .rules import _empty_loss_mask

    return [c for c in (_empty_loss_mask(f),) if c is not None]


def loss_terms(f: Facts) -> Check:
    terms = f.m.terms
    if not terms:
        return Check("loss_terms", "loss terms reach the gradient", PASS,
                     {"terms": "not given (return {'loss': total, 'terms': {'pg': ..., 'entropy': ...}} from the loss "
                               "function to check that each term reaches the gradient)"})
    ev: dict = {k: (f"{t.value:.4g}" if t.value is not None else "n/a") + (
        f", reaches {t.grad_nonzero}/{f.n} tensors" if t.requires_grad else ", no graph") for k, t in terms.items()}
    cut = [k for k, t in terms.items() if not t.requires_grad]
    if cut:
        ev["cut"] = cut
        return Check("loss_terms", "loss terms reach the gradient", FAIL, ev, BY_ID["loss_term_detached"].fix)
    return Check("loss_terms", "loss terms reach the gradient", PASS, ev)


def update_precision(f: Facts) -> Check:
    p = f.precision
    half = [f.short[i] for i, t in enumerate(f.subject.params) if t.requires_grad
            and t.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return Check("update_precision", "updates survive rounding", PASS, {"half_precision_trainable": 0})
    ev: dict = {"half_precision_trainable": len(half)}
    if p is None:
        ev["note"] = "not checked: no optimizer given (pass optimizer= to try its next step on these tensors)"
        return Check("update_precision", "updates survive rounding", PASS, ev)
    ev.update(optimizer=p.get("optimizer", "?"), lr=p.get("lr"))
    if p.get("error"):
        ev["error"] = p["error"]
    if p["lost"]:
        ev["lost"] = [f"{d['name']} ({d['unchanged']} unchanged)" for d in p["lost"]]
        return Check("update_precision", "updates survive rounding", FAIL, ev, BY_ID["update_lost_to_precision"].fix)
    return Check("update_precision", "updates survive rounding", PASS, ev)


ALL: list[Callable[[Facts], Check]] = [
    loss_runs, strict_autograd_grad, s_alive, param_identity, coverage, probe_path, generation, grad_mode,
    train_mode, checkpointing, input_grads, adapters, adapter_forward, quantization, lora_dtype, nonfinite,
    optimizer_state, old_logprobs, loss_mask, loss_terms, update_precision,
]

# what needs a loss to differentiate: not measured when the loss function raised
NEEDS_LOSS = {strict_autograd_grad, s_alive, coverage, probe_path, loss_mask, loss_terms}


def run_all(f: Facts) -> list[Check]:
    out = []
    for check in ALL:
        if f.m.loss_error and check in NEEDS_LOSS:
            c = check.__name__
            out.append(Check(c, TITLES[c], WARN, {"not_measured": "the loss function raised (see loss_runs)"}))
        else:
            out.append(check(f))
    return out


TITLES = {"strict_autograd_grad": "strict autograd.grad", "s_alive": "S is alive", "coverage": "coverage X vs Y",
          "probe_path": "backward() probe path", "loss_mask": "loss reaches tokens",
          "loss_terms": "loss terms reach the gradient"}

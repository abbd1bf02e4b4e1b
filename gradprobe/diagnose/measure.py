"""One measurement: build the loss once, then ask every gradient API what reaches the parameters.

A measurement runs the user's loss function under light hooks (what grad mode, autocast and train mode
the model's forward saw; whether its inputs and logits carried a graph) and then, on that one graph,
takes gradients through `torch.autograd.grad` and through `backward()` + `param.grad`, side by side.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError
from .model_state import tuner_layers

LOSS_KEYS = ("S", "LX", "LY")


@dataclass
class ForwardTrace:
    """What the model's forward saw while the loss was built (None: the forward never ran)."""

    calls: int = 0
    grad_enabled: bool | None = None
    inference_mode: bool | None = None
    autocast: str | None = None  # "off" or the dtype name
    training: bool | None = None
    inputs_require_grad: bool | None = None  # the input embeddings' output
    logits_require_grad: bool | None = None  # the output layer's output
    layers: dict[str, LayerSeen] = field(default_factory=dict)  # every adapter layer, by module name
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # first forward's ids, mask, logits (if asked)
    logits_finite: bool = True  # every logit of every forward was finite
    labels_given: bool = False  # the model's forward got labels= (it computes the loss itself)
    label_tokens: int = 0  # labels that are not the ignore index (-100), over every forward that got labels
    label_positions: int = 0
    logit_grads: list[tuple[int, int, int]] = field(default_factory=list)  # per backward through logits that
    # record a graph: (positions, positions with a non-zero gradient, positions with a NaN/Inf gradient)


@dataclass
class LayerSeen:
    """One adapter layer as the user's forward met it: whether it ran and in which adapter state."""

    calls: int = 0
    effective: int = 0  # calls in which an adapter of the list took part (enabled, unmerged, active, scaling != 0)
    disabled: int = 0
    merged: int = 0
    inactive: int = 0  # calls in which no adapter of the list was active
    zero_scaling: int = 0
    active: list[str] = field(default_factory=list)
    scaling: dict[str, float] = field(default_factory=dict)
    input_dtypes: list[str] = field(default_factory=list)
    grad_enabled: bool | None = None
    inference_mode: bool | None = None
    training: bool | None = None


@dataclass
class Raised:
    """An exception of the user's loss code or of the backward through its graph, classified."""

    phase: str  # "loss" or "backward"
    type: str
    message: str
    kind: str  # one of ERROR_KINDS
    indices: list[int] = field(default_factory=list)  # DDP: the parameter indices its message names

    def text(self) -> str:
        return f"{self.type}: {self.message}"


# exception class -> root-cause id (diagnose/causes.py); the first match wins
ERROR_KINDS = ("inference_tensors", "checkpoint_recompute_mismatch", "ddp_reentrant_checkpointing",
               "ddp_unused_parameters", "device_mismatch", "dtype_mismatch", "loss_exception")
DDP_UNUSED = re.compile(r"did not receive grad for rank \d+:\s*([\d ]+)")


def classify(exc: BaseException, phase: str) -> Raised:
    """Sort an exception into the classes the verdict knows, from its type and torch's message."""
    msg = str(exc).strip()
    low = msg.lower()
    indices: list[int] = []
    if "inference tensor" in low or "inference_mode" in low:
        kind = "inference_tensors"
    elif "mark a variable ready only once" in low or "marked as ready twice" in low:
        kind = "ddp_reentrant_checkpointing"  # DDP's reducer saw a parameter's gradient twice in one backward
    elif "finished reduction in the prior iteration" in low:
        kind = "ddp_unused_parameters"  # DDP's reducer still waits for gradients the last backward never made
        indices = [int(x) for m in DDP_UNUSED.finditer(msg) for x in m.group(1).split()]
    elif isinstance(exc, torch.utils.checkpoint.CheckpointError) or "torch.utils.checkpoint" in low \
            or "recomputed values" in low or "recomputation" in low:
        kind = "checkpoint_recompute_mismatch"
    elif "device" in low and ("same device" in low or "expected" in low or "meta" in low):
        kind = "device_mismatch"
    elif "dtype" in low or "scalar type" in low or re.search(r"(float|half|bfloat16|double|long)", low) and \
            ("expected" in low or "mismatch" in low):
        kind = "dtype_mismatch"
    else:
        kind = "loss_exception"
    first = msg.splitlines()[0] if msg else ""
    return Raised(phase, type(exc).__name__, first[:400], kind, indices)


@dataclass
class TensorInfo:
    present: bool
    requires_grad: bool = False
    grad_fn: str | None = None
    dtype: str = ""
    device: str = ""
    shape: list[int] = field(default_factory=list)
    finite: bool = True
    python_number: bool = False  # the loss function handed back a float, not a tensor

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TermInfo:
    """One named term of the loss: its value and whether (and how much) it reaches the parameters."""

    value: float | None
    requires_grad: bool
    grad_fn: str | None
    grad_nonzero: int = 0  # tensors of the list its own gradient reaches (non-zero)
    grad_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GradStats:
    """Per-API gradient coverage over the probe's parameter list."""

    n: int
    nonnull: int = 0
    nonzero: int = 0
    nonfinite: int = 0
    norm: float = 0.0
    missing: list[int] = field(default_factory=list)  # indices that came back None
    zero: list[int] = field(default_factory=list)  # indices whose gradient is all zero
    bad: list[int] = field(default_factory=list)  # indices with NaN/Inf
    error: str | None = None
    raised: Raised | None = None  # what the backward raised, classified
    vector: torch.Tensor | None = None  # the flat gradient (kept for the primary backward: the differential compares)


@dataclass
class Measurement:
    trace: ForwardTrace
    tensors: dict[str, TensorInfo]
    primary: str  # the loss the strict check and the differential use
    stats: dict[str, GradStats] = field(default_factory=dict)  # "LY/backward", "LY/autograd.grad", ...
    strict_error: str | None = None
    loss_error: str | None = None
    raised: Raised | None = None  # the loss function's exception, or the primary loss's backward's
    terms: dict[str, TermInfo] = field(default_factory=dict)  # the loss's named terms, when it returned them
    logit_grad: tuple[int, int, int] | None = None  # the primary backward at the logits (see ForwardTrace)

    def get(self, loss: str, api: str) -> GradStats | None:
        return self.stats.get(f"{loss}/{api}")


def _autocast_now(device_type: str) -> str:
    try:
        if torch.is_autocast_enabled(device_type):
            return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    except (TypeError, RuntimeError):  # very old torch: no device argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return "float16"
    return "off"


def _io_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Input embeddings and output layer (they run outside any checkpointed block); the model itself if unknown."""
    def get(name: str) -> torch.nn.Module | None:
        fn = getattr(model, name, None)
        try:
            mod = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            mod = None
        return mod if isinstance(mod, torch.nn.Module) else None

    return get("get_input_embeddings") or model, get("get_output_embeddings") or model


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _scaling(layer: torch.nn.Module, adapter: str) -> float | None:
    value = getattr(layer, "scaling", {}).get(adapter) if isinstance(getattr(layer, "scaling", None), dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _layer_hook(seen: LayerSeen, wanted: set[str]):
    """A forward pre-hook recording the adapter state the layer runs in (read at that moment, not after)."""
    def hook(module, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        active = list(getattr(module, "active_adapters", []) or [])
        disabled, merged = bool(getattr(module, "disable_adapters", False)), bool(getattr(module, "merged", False))
        mine = [a for a in active if a in wanted] if wanted else active
        scales = {a: _scaling(module, a) for a in mine}
        zero = bool(mine) and all(v == 0.0 for v in scales.values() if v is not None) and \
            any(v is not None for v in scales.values())
        seen.calls += 1
        seen.disabled += disabled
        seen.merged += merged and not disabled
        seen.inactive += not mine
        seen.zero_scaling += zero
        seen.effective += not (disabled or merged or not mine or zero)
        if seen.calls == 1 or (not _recording(seen) and _recording_now()):
            seen.active = active
            seen.scaling = {a: v for a, v in scales.items() if v is not None}
            seen.grad_enabled = torch.is_grad_enabled()
            seen.inference_mode = torch.is_inference_mode_enabled()
            seen.training = bool(module.training)
        if x is not None and (d := str(x.dtype).removeprefix("torch.")) not in seen.input_dtypes:
            seen.input_dtypes.append(d)
    return hook


IGNORE_INDEX = -100  # transformers' and torch's cross-entropy ignore index


def _logit_grad_hook(trace: ForwardTrace):
    """Which logit positions the loss's gradient reaches: a loss whose token mask is empty reaches none (or,
    with a token mean of 0/0, reaches every one with NaN)."""
    def hook(grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1])
        hi, lo = g.amax(-1), g.amin(-1)  # per position, without a vocabulary-sized temporary (NaN propagates)
        bad = ~(torch.isfinite(hi) & torch.isfinite(lo))
        trace.logit_grads.append((g.shape[0], int(((hi != 0) | (lo != 0)).sum()), int(bad.sum())))
    return hook


def _recording_now() -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _recording(seen) -> bool:
    return bool(seen.grad_enabled) and not seen.inference_mode


@contextlib.contextmanager
def traced(model: torch.nn.Module, adapters: set[str] | None = None, capture: bool = False) -> Iterator[ForwardTrace]:
    """Hooks on the input embeddings, the output layer and every adapter layer while the loss runs.
    `adapters`: the adapter names whose weights are in the parameter list (the ones that should take part);
    capture=True keeps the first forward's input ids, attention mask and logits (detached)."""
    trace = ForwardTrace()
    inp, outp = _io_modules(model)

    def on_model(module, args, kwargs):
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor):  # transformers shifts them and ignores -100 in its token mean
            trace.labels_given = True
            trace.label_tokens += int((labels[..., 1:] != IGNORE_INDEX).sum())
            trace.label_positions += int(labels[..., 1:].numel())
        mask = kwargs.get("attention_mask")
        if capture and "attention_mask" not in trace.captured and isinstance(mask, torch.Tensor):
            trace.captured["attention_mask"] = mask.detach()

    def on_input(module, args, out):
        t = _first_tensor(out)
        trace.calls += 1
        if capture and trace.calls == 1 and args and isinstance(args[0], torch.Tensor):
            trace.captured["input_ids"] = args[0].detach()
        # the first forward, or a later one that records a graph where the earlier did not (a no-grad
        # reference forward before the policy forward is the usual pattern, not a fault)
        if trace.calls == 1 or (not _recording(trace) and _recording_now()):
            trace.grad_enabled = torch.is_grad_enabled()
            trace.inference_mode = torch.is_inference_mode_enabled()
            trace.autocast = _autocast_now(t.device.type if t is not None else "cpu")
            trace.training = bool(model.training)
            trace.inputs_require_grad = bool(t is not None and t.requires_grad)

    def on_output(module, args, out):
        t = _first_tensor(out)
        if t is not None and t.is_floating_point():
            d = t.detach()
            trace.logits_finite &= bool(torch.isfinite(d.amax()) and torch.isfinite(d.amin()))
            if t.requires_grad and t.dim() >= 2:
                t.register_hook(_logit_grad_hook(trace))
        if trace.logits_require_grad is None:
            trace.logits_require_grad = bool(t is not None and t.requires_grad)
            if capture and t is not None:
                trace.captured["logits"] = t.detach().float()

    def on_model_output(module, args, out):
        # a fused LM head (transformers' fused_lm_head=True, as TRL's GRPOTrainer calls the model) turns the
        # hidden states into log-probs without calling the output layer: the model's own output stands in
        if trace.logits_require_grad is None:
            t = _first_tensor(out)
            trace.logits_require_grad = bool(t is not None and t.requires_grad)

    handles = [inp.register_forward_hook(on_input), model.register_forward_pre_hook(on_model, with_kwargs=True)]
    handles.append(outp.register_forward_hook(on_output))
    handles.append(model.register_forward_hook(on_model_output))
    for name, layer in tuner_layers(model):
        trace.layers[name] = seen = LayerSeen()
        handles.append(layer.register_forward_pre_hook(_layer_hook(seen, adapters or set())))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def _scalar(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and v.is_floating_point()
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _terms_of(out: Mapping, picked: dict[str, Any]) -> dict[str, Any] | None:
    """The loss's named terms: out['terms']; or, when the mapping has no loss, its scalar entries (the loss is
    their sum); or its other scalar entries when they add up to the loss (so logged metrics are left alone)."""
    terms = out.get("terms")
    if terms is not None:
        if not isinstance(terms, Mapping) or not terms:
            raise GradprobeError("loss_fn's 'terms' must be a non-empty mapping of term name to tensor")
        return dict(terms)
    extras = {k: v for k, v in out.items() if k not in (*LOSS_KEYS, "loss") and _scalar(v)}
    if not extras:
        return None
    total = picked.get("LY")
    if total is None and not picked:
        return extras
    if total is not None and _scalar(total):
        value, parts = float(total), sum(float(v) for v in extras.values())
        if len(extras) > 1 and abs(parts - value) <= 1e-5 * max(1.0, abs(value)):
            return extras
    return None


def normalize(out: Any) -> dict[str, Any]:
    """The loss function may return S [n], a scalar loss, or a mapping with any of 'S', 'LX', 'LY' (or 'loss'), and
    its named terms ('terms': {name: tensor}, or scalar entries that add up to the loss, or only terms: the loss is
    their sum), each checked to reach the gradient."""
    if isinstance(out, Mapping):
        picked = {k: out[k] for k in LOSS_KEYS if k in out}
        if "loss" in out and "LY" not in picked:
            picked["LY"] = out["loss"]
        terms = _terms_of(out, picked)
        if terms is not None and not picked:
            picked["LY"] = sum(terms.values())
        if not picked:
            raise GradprobeError(f"loss_fn returned a mapping without 'S', 'LX' or 'LY' (keys: {sorted(out)})")
        if terms is not None:
            picked["terms"] = terms
        return picked
    if isinstance(out, torch.Tensor):
        return {"S": out} if out.dim() == 1 else {"LY": out}
    if isinstance(out, (float, int)) and not isinstance(out, bool):
        return {"LY": out}
    raise GradprobeError(f"loss_fn must return a tensor or a mapping of tensors, not {type(out).__name__}")


def info(value: Any) -> TensorInfo:
    if value is None:
        return TensorInfo(present=False)
    if not isinstance(value, torch.Tensor):
        return TensorInfo(present=True, dtype=type(value).__name__, device="host", python_number=True,
                          finite=bool(value == value and abs(value) != float("inf")))
    return TensorInfo(present=True, requires_grad=bool(value.requires_grad),
                      grad_fn=type(value.grad_fn).__name__ if value.grad_fn is not None else None,
                      dtype=str(value.dtype).removeprefix("torch."), device=str(value.device),
                      shape=list(value.shape), finite=bool(torch.isfinite(value.detach()).all()))


def as_loss(tensors: dict[str, Any], key: str) -> Any:
    """S is reduced by us, not by the user's code: record that sum even when the caller disabled grad."""
    value = tensors[key]
    if key == "S" and isinstance(value, torch.Tensor):
        with torch.enable_grad():
            return value.sum()
    return value


def primary_key(tensors: dict[str, Any]) -> str:
    return next(k for k in ("LY", "LX", "S") if k in tensors)


def _summarize(grads: list[torch.Tensor | None]) -> GradStats:
    st = GradStats(n=len(grads))
    sq = 0.0
    for i, g in enumerate(grads):
        if g is None:
            st.missing.append(i)
            continue
        st.nonnull += 1
        g = g.detach()
        if not bool(torch.isfinite(g).all()):
            st.nonfinite += 1
            st.bad.append(i)
            st.nonzero += 1
            continue
        if bool(g.any()):
            st.nonzero += 1
            sq += float(g.double().pow(2).sum())
        else:
            st.zero.append(i)
    st.norm = sq ** 0.5
    return st


def clear_grads(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
    model.zero_grad(set_to_none=True)


def via_autograd(loss: Any, params: list[torch.Tensor], model: torch.nn.Module) -> GradStats:
    """autograd.grad(allow_unused=True) over the parameters that require grad (the rest count as None)."""
    clear_grads(model, params)
    idx = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(params)
    error = None
    if not isinstance(loss, torch.Tensor):
        error = f"the loss is a Python {type(loss).__name__}, not a tensor: it carries no graph"
    elif idx:
        try:
            got = torch.autograd.grad(loss, [params[i] for i in idx], allow_unused=True, retain_graph=True)
            for i, g in zip(idx, got):
                grads[i] = g
        except Exception as exc:  # noqa: BLE001 - any failure of the user's graph is a finding
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    st = _summarize(grads)
    st.error = error
    clear_grads(model, params)
    return st


def via_backward(loss: Any, params: list[torch.Tensor], model: torch.nn.Module, keep: bool = False) -> GradStats:
    """loss.backward() then read param.grad: the probe's (Plan A) path. keep=True keeps the flat gradient."""
    clear_grads(model, params)
    error, raised = None, None
    if not isinstance(loss, torch.Tensor):
        error = f"the loss is a Python {type(loss).__name__}, not a tensor: it carries no graph"
    elif not loss.requires_grad:
        error = "element 0 of tensors does not require grad and does not have a grad_fn"  # torch's words
    else:
        try:
            loss.backward(retain_graph=True)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's graph is a finding
            raised = classify(exc, "backward")
            error = raised.text()
    grads = [p.grad for p in params]
    st = _summarize(grads)
    st.error, st.raised = error, raised
    if keep and raised is None:
        st.vector = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                               for g, p in zip(grads, params)])
    clear_grads(model, params)
    return st


def _term(value: Any, params: list[torch.Tensor], model: torch.nn.Module) -> TermInfo:
    if not isinstance(value, torch.Tensor):
        return TermInfo(float(value) if isinstance(value, (int, float)) else None, False, None)
    v = value.detach()
    out = TermInfo(float(v.sum()) if v.numel() else None, bool(value.requires_grad),
                   type(value.grad_fn).__name__ if value.grad_fn is not None else None)
    if value.requires_grad:
        st = via_autograd(value.sum() if value.dim() else value, params, model)
        out.grad_nonzero, out.grad_norm = st.nonzero, st.norm
    return out


def strict_grad(loss: Any, params: list[torch.Tensor], model: torch.nn.Module) -> str | None:
    """autograd.grad with allow_unused off: None when it succeeds, else torch's exact message."""
    if not isinstance(loss, torch.Tensor):
        return f"loss_fn returned a Python {type(loss).__name__}; autograd.grad needs a tensor"
    if not params:
        return "the parameter list is empty"
    clear_grads(model, params)
    try:
        torch.autograd.grad(loss, params, retain_graph=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's graph is a finding
        return str(exc).strip()
    finally:
        clear_grads(model, params)
    return None


def measure(model: torch.nn.Module, params: list[torch.Tensor], loss_fn: Callable[[], Any],
            losses: tuple[str, ...] = ("LY", "LX", "S"), strict: bool = True,
            wrap: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            adapters: set[str] | None = None, scale: float = 1.0, capture: bool = False,
            keep: bool | None = None) -> Measurement:
    """Build the loss once under `wrap()` and measure gradient coverage through both APIs.
    An exception of the loss code (or of a backward through its graph) is recorded, classified, as the outcome.
    `scale` multiplies every loss before its backward (the differential's loss-scaling run); keep=True keeps the
    primary loss's flat gradient (default: only for a forward in eval mode, which the train-mode run compares)."""
    with traced(model, adapters, capture) as trace:
        try:
            with wrap():
                out = normalize(loss_fn())
        except GradprobeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's loss failing is the finding
            raised = classify(exc, "loss")
            return Measurement(trace, {k: TensorInfo(present=False) for k in LOSS_KEYS}, "LY",
                               loss_error=raised.text(), raised=raised)
    tensors = {k: info(out.get(k)) for k in LOSS_KEYS}
    m = Measurement(trace, tensors, primary_key(out))
    if strict and "terms" in out:
        m.terms = {str(k): _term(v, params, model) for k, v in out["terms"].items()}
    if capture and isinstance(out.get("S"), torch.Tensor):
        trace.captured["S"] = out["S"].detach().float()
    if strict:
        m.strict_error = strict_grad(as_loss(out, m.primary), params, model)
    for key in losses:
        if key not in out:
            continue
        loss = as_loss(out, key)
        if scale != 1.0 and isinstance(loss, torch.Tensor):
            loss = loss * scale
        if key != "S":
            m.stats[f"{key}/autograd.grad"] = via_autograd(loss, params, model)
        in_eval = trace.training is False or any(s.calls and s.training is False for s in trace.layers.values())
        keep_it = key == m.primary and (keep if keep is not None else in_eval)
        trace.logit_grads.clear()
        m.stats[f"{key}/backward"] = st = via_backward(loss, params, model, keep=keep_it)
        if key == m.primary:
            m.raised = st.raised
            if trace.logit_grads:
                m.logit_grad = tuple(sum(x) for x in zip(*trace.logit_grads))
    del out
    return m

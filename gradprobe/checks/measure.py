"""One measurement: build the loss once, then ask every gradient API what reaches the parameters.

A measurement runs the user's loss function under light hooks (what grad mode, autocast and train mode
the model's forward saw; whether its inputs and logits carried a graph) and then, on that one graph,
takes gradients through `torch.autograd.grad` and through `backward()` + `param.grad`, side by side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError

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


@dataclass
class Measurement:
    trace: ForwardTrace
    tensors: dict[str, TensorInfo]
    primary: str  # the loss the strict check and the differential use
    stats: dict[str, GradStats] = field(default_factory=dict)  # "LY/backward", "LY/autograd.grad", ...
    strict_error: str | None = None
    loss_error: str | None = None

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


@contextlib.contextmanager
def traced(model: torch.nn.Module) -> Iterator[ForwardTrace]:
    trace = ForwardTrace()
    inp, outp = _io_modules(model)

    def on_input(module, args, out):
        t = _first_tensor(out)
        trace.calls += 1
        if trace.calls == 1:
            trace.grad_enabled = torch.is_grad_enabled()
            trace.inference_mode = torch.is_inference_mode_enabled()
            trace.autocast = _autocast_now(t.device.type if t is not None else "cpu")
            trace.training = bool(model.training)
            trace.inputs_require_grad = bool(t is not None and t.requires_grad)

    def on_output(module, args, out):
        t = _first_tensor(out)
        if trace.logits_require_grad is None:
            trace.logits_require_grad = bool(t is not None and t.requires_grad)

    handles = [inp.register_forward_hook(on_input)]
    handles.append(outp.register_forward_hook(on_output))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def normalize(out: Any) -> dict[str, Any]:
    """The loss function may return S [n], a scalar loss, or a mapping with any of 'S', 'LX', 'LY'."""
    if isinstance(out, Mapping):
        picked = {k: out[k] for k in LOSS_KEYS if k in out}
        if "loss" in out and "LY" not in picked:
            picked["LY"] = out["loss"]
        if not picked:
            raise GradprobeError(f"loss_fn returned a mapping without 'S', 'LX' or 'LY' (keys: {sorted(out)})")
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
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0]
    st = _summarize(grads)
    st.error = error
    clear_grads(model, params)
    return st


def via_backward(loss: Any, params: list[torch.Tensor], model: torch.nn.Module) -> GradStats:
    """loss.backward() then read param.grad: the probe's (Plan A) path."""
    clear_grads(model, params)
    error = None
    if not isinstance(loss, torch.Tensor):
        error = f"the loss is a Python {type(loss).__name__}, not a tensor: it carries no graph"
    else:
        try:
            loss.backward(retain_graph=True)
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0]
    st = _summarize([p.grad for p in params])
    st.error = error
    clear_grads(model, params)
    return st


def strict_grad(loss: Any, params: list[torch.Tensor], model: torch.nn.Module) -> str | None:
    """autograd.grad with allow_unused off: None when it succeeds, else torch's exact message."""
    if not isinstance(loss, torch.Tensor):
        return f"loss_fn returned a Python {type(loss).__name__}; autograd.grad needs a tensor"
    if not params:
        return "the parameter list is empty"
    clear_grads(model, params)
    try:
        torch.autograd.grad(loss, params, retain_graph=True)
    except RuntimeError as exc:
        return str(exc).strip()
    finally:
        clear_grads(model, params)
    return None


def measure(model: torch.nn.Module, params: list[torch.Tensor], loss_fn: Callable[[], Any],
            losses: tuple[str, ...] = ("LY", "LX", "S"), strict: bool = True,
            wrap: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            capture: bool = False) -> Measurement:
    """Build the loss once under `wrap()` and measure gradient coverage through both APIs.
    capture=True records an exception of the loss code as the outcome (a changed factor may break it)."""
    with traced(model) as trace:
        try:
            with wrap():
                out = normalize(loss_fn())
        except GradprobeError:
            raise
        except Exception as exc:
            if not capture:
                raise
            return Measurement(trace, {}, "LY", loss_error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    tensors = {k: info(out.get(k)) for k in LOSS_KEYS}
    m = Measurement(trace, tensors, primary_key(out))
    if strict:
        m.strict_error = strict_grad(as_loss(out, m.primary), params, model)
    for key in losses:
        if key not in out:
            continue
        loss = as_loss(out, key)
        if key != "S":
            m.stats[f"{key}/autograd.grad"] = via_autograd(loss, params, model)
        m.stats[f"{key}/backward"] = via_backward(loss, params, model)
    del out
    return m

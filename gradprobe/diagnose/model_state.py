"""Read the live state of a model (checkpointing, adapters, 4-bit layers) and change one factor at a time.

Everything here reads what the model will actually do on its next forward, not what a config said:
a user's own script may have switched things after loading.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

_MISSING = object()


def short_name(name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight' -> 'layers.0.mlp.up_proj.lora_A'."""
    for prefix in ("module.", "base_model.model.", "model."):  # module.: a DistributedDataParallel wrapper
        name = name.removeprefix(prefix)
    return name.replace(".default.weight", "").replace(".default", "")


# ---------------------------------------------------------------- activation checkpointing

def _checkpoint_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that carry the transformers `gradient_checkpointing` flag (decoder layers and the model body)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]


def _layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: every flagged module counts
        return None
    return GradientCheckpointingLayer


def _reentrant(func: Any) -> bool | None:
    """use_reentrant of a checkpoint function: from a functools.partial's keywords; None when unreadable."""
    if isinstance(func, functools.partial):
        if "use_reentrant" in func.keywords:
            return bool(func.keywords["use_reentrant"])
        # torch.utils.checkpoint without use_reentrant falls back to the reentrant variant (torch <= 2.13)
        if func.func is torch.utils.checkpoint.checkpoint:
            return True
        return _reentrant(func.func)
    return None


def checkpointing_state(model: torch.nn.Module) -> dict[str, Any]:
    """Which activation-checkpointing mode the next training-mode forward will use."""
    flagged = _checkpoint_modules(model)
    layer_cls = _layer_class()
    layers = [m for m in flagged if layer_cls is None or isinstance(m, layer_cls)]
    on = [m for m in layers if m.gradient_checkpointing]
    kinds = {_reentrant(getattr(m, "_gradient_checkpointing_func", None)) for m in on}
    if not on:
        mode = "off"
    elif kinds == {True}:
        mode = "reentrant"
    elif kinds == {False}:
        mode = "non_reentrant"
    elif None in kinds and len(kinds) == 1:
        mode = "unknown"
    else:
        mode = "mixed"
    func = getattr(on[0], "_gradient_checkpointing_func", None) if on else None
    kwargs = dict(func.keywords) if isinstance(func, functools.partial) else {}
    return {"mode": mode, "layers_checkpointed": len(on), "layers": len(layers),
            "use_reentrant": kwargs.get("use_reentrant", "not passed" if on else None),
            "training": bool(model.training), "active": bool(on) and bool(model.training)}


def _hf_model(model: torch.nn.Module):
    """The outermost transformers model inside `model` (a PEFT wrapper holds one)."""
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing_enable") and hasattr(m, "supports_gradient_checkpointing"):
            return m
    return None


@contextlib.contextmanager
def _restored_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Put every forward hook, checkpointing flag and function back exactly as found (HF's switch adds hooks)."""
    hooks = {m: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()}
    flags = [(m, m.__dict__.get("gradient_checkpointing", _MISSING),
              m.__dict__.get("_gradient_checkpointing_func", _MISSING),
              m.__dict__.get("_require_grads_hooks", _MISSING)) for m in model.modules()]
    try:
        yield
    finally:
        for m, (fwd, pre) in hooks.items():
            m._forward_hooks.clear()
            m._forward_hooks.update(fwd)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre)
        for m, *values in flags:
            for attr, value in zip(("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hooks"),
                                   values):
                if value is _MISSING:
                    m.__dict__.pop(attr, None)
                else:
                    m.__dict__[attr] = value


def _switch_checkpointing(hf, mode: str) -> None:
    """The same calls a user makes to change the mode (the differential run tests the fix it recommends)."""
    if mode == "off":
        disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
        disable()
        return
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def checkpointing_as(model: torch.nn.Module, mode: str) -> Iterator[bool]:
    """Run with checkpointing `mode` ('off' | 'non_reentrant' | 'reentrant'); yields False if it cannot switch."""
    hf = _hf_model(model)
    if hf is None:
        yield False
        return
    with _restored_hooks(model):
        try:
            _switch_checkpointing(hf, mode)
        except (ValueError, AttributeError):
            yield False
            return
        yield True


@contextlib.contextmanager
def input_grads_enabled(model: torch.nn.Module) -> Iterator[bool]:
    """Make the input embeddings' output require grad (what reentrant checkpointing needs)."""
    hf = _hf_model(model)
    if hf is None or not hasattr(hf, "enable_input_require_grads"):
        yield False
        return
    with _restored_hooks(model):
        hf.enable_input_require_grads()
        yield True


# ---------------------------------------------------------------- adapters

def ddp_state(model: torch.nn.Module) -> dict[str, Any] | None:
    """The DistributedDataParallel wrapper's settings, and the names of the parameters its reducer indexes
    (the module's trainable parameters, in order); None when the model is not wrapped in DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    return {"find_unused_parameters": bool(model.find_unused_parameters),
            "static_graph": bool(getattr(model, "static_graph", False)),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "reducer_names": [f"module.{n}" for n, p in model.module.named_parameters() if p.requires_grad]}


def tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every PEFT adapter layer (LoRA and friends); none without PEFT."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for _, m in tuner_layers(model)]


def adapter_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every adapter weight (LoRA A/B and friends), in named_parameters order."""
    ids: set[int] = set()
    for layer in _tuner_layers(model):
        for attr in getattr(layer, "adapter_layer_names", ()):
            holder = getattr(layer, attr, None)
            if isinstance(holder, torch.nn.Module):
                ids.update(id(p) for p in holder.parameters())
            elif isinstance(holder, dict):
                ids.update(id(p) for p in holder.values() if isinstance(p, torch.nn.Parameter))
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def adapter_state(model: torch.nn.Module) -> dict[str, Any]:
    """Enabled, merged and trainable counts; only the active adapters' weights are expected to train."""
    layers = _tuner_layers(model)
    params = adapter_params(model)
    active = sorted({a for m in layers for a in getattr(m, "active_adapters", [])})
    live = [(n, p) for n, p in params if any(f".{a}." in n or n.endswith(f".{a}") for a in active)] or params
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in live})
    return {"adapter_layers": len(layers), "disabled_layers": sum(bool(m.disable_adapters) for m in layers),
            "merged_layers": sum(bool(getattr(m, "merged", False)) for m in layers),
            "adapter_tensors": len(live), "trainable_adapter_tensors": sum(p.requires_grad for _, p in live),
            "frozen_adapter_names": [n for n, p in live if not p.requires_grad],
            "active_adapters": active, "dtypes": dtypes}


@contextlib.contextmanager
def adapters_trainable(model: torch.nn.Module) -> Iterator[bool]:
    """Enable every adapter layer and make the active adapters' weights require grad."""
    layers = _tuner_layers(model)
    active = {a for m in layers for a in getattr(m, "active_adapters", [])}
    targets = [p for n, p in adapter_params(model) if not active or any(f".{a}." in n for a in active)]
    saved_flags = [(m, m._disable_adapters) for m in layers if hasattr(m, "_disable_adapters")]
    saved_grad = [(p, p.requires_grad) for p in targets]
    try:
        for m, _ in saved_flags:
            m._disable_adapters = False
        for p in targets:
            p.requires_grad_(True)
        yield bool(targets)
    finally:
        for m, flag in saved_flags:
            m._disable_adapters = flag
        for p, flag in saved_grad:
            p.requires_grad_(flag)


# ---------------------------------------------------------------- 4-bit layers

def quantized_layers(model: torch.nn.Module) -> dict[str, Any]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {"linear4bit": 0, "bitsandbytes": "not installed"}
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    kinds = sorted({str(getattr(m.weight, "quant_type", "?")) for m in layers})
    compute = sorted({str(getattr(m, "compute_dtype", None)).removeprefix("torch.") for m in layers})
    return {"linear4bit": len(layers), "quant_types": kinds, "compute_dtypes": compute,
            "trainable_4bit_weights": sum(bool(m.weight.requires_grad) for m in layers)}


def lora_b_zero(model: torch.nn.Module) -> set[str]:
    """Names of lora_A weights whose partner lora_B is all zero: their gradient is exactly zero by design."""
    params = dict(adapter_params(model))
    out = set()
    for name, p in params.items():
        if ".lora_B." in name and not bool(p.detach().any()):
            partner = name.replace(".lora_B.", ".lora_A.")
            if partner in params:
                out.add(partner)
    return out


def lora_dead(model: torch.nn.Module) -> set[str]:
    """Names of lora_A and lora_B weights whose pair is all zero: dL/dA goes through B and dL/dB through A x,
    so both gradients are exactly zero on every step and the adapter never moves (a dead adapter)."""
    params = dict(adapter_params(model))
    out = set()
    for name, p in params.items():
        if ".lora_B." in name and not bool(p.detach().any()):
            partner = name.replace(".lora_B.", ".lora_A.")
            if partner in params and not bool(params[partner].detach().any()):
                out.update((name, partner))
    return out

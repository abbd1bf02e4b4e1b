"""A float64 copy of a tiny 4-bit stack: the same function, without float32 rounding (for finite differences).

Each bitsandbytes 4-bit base layer becomes a plain Linear holding its dequantised weight, everything is cast
to float64, and Qwen2's RMSNorm (which upcasts to float32 only) computes in float64. The copy computes the
same entropy as the 4-bit float32 model (to ~1e-7) but resolves differences of 1e-12.
"""

from __future__ import annotations

import copy
import dataclasses

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm


def _rms_norm_float64(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_copy(stack):
    """A Stack on a float64 copy of stack.model; its params are the copy's trainable tensors, in the same order."""
    model = copy.deepcopy(stack.model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = dequantize_4bit(child.weight.data, child.weight.quant_state)
                plain = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                plain.weight = torch.nn.Parameter(w.float(), requires_grad=False)
                if child.bias is not None:
                    plain.bias = torch.nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(module, name, plain)
    model = model.double()
    for module in model.modules():
        if isinstance(module, Qwen2RMSNorm):
            module.forward = _rms_norm_float64.__get__(module)
    copied = dataclasses.replace(stack, model=model, autocast_dtype=None)
    copied.refresh_params()
    assert copied.names == stack.names
    return copied

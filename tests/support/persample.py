"""Per-sequence gradients grad S[i] of LoRA parameters from one batched backward.

LoRA's trainable weights are bias-free nn.Linear layers (lora_A, lora_B). For such a layer with
input a[i,t] and output gradient g[i,t], sequence i's weight gradient is sum_t g[i,t] a[i,t]^T, and
backward of sum_i S[i] gives each sequence's g on its own rows (sequences in a batch do not interact;
padding gets zero gradient). Module hooks capture a and g, so one backward yields all rows of the
Jacobian: the statistics tests use it to afford thousands of units. Checkpointing must be off (a
recomputed forward would fire the hooks twice).
"""

from __future__ import annotations

import warnings

import torch

from gradprobe.errors import GradprobeError
from gradprobe.objective import pack, sequence_logprobs


def _linear_modules(stack) -> list[torch.nn.Linear]:
    modules = dict(stack.model.named_modules())
    out = []
    for name in stack.names:
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        if leaf != "weight" or not isinstance(mod, torch.nn.Linear) or mod.bias is not None:
            raise GradprobeError(f"per-sequence gradients need bias-free Linear weights; '{name}' is not one")
        out.append(mod)
    return out


def sequence_jacobian(stack, pairs: list[tuple[list[int], list[int]]], temperature: float,
                      microbatch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """S [k] (float64) and J [k, n] (fp32, CPU; row i = grad S[i] in the probe's parameter order)."""
    if stack.checkpointing != "off":
        raise GradprobeError("per-sequence gradients need checkpointing=off")
    mods = _linear_modules(stack)
    acts: dict[int, torch.Tensor] = {}
    grads: dict[int, torch.Tensor] = {}
    hooks = []
    for k, m in enumerate(mods):
        hooks.append(m.register_forward_hook(lambda _m, inp, _o, k=k: acts.__setitem__(k, inp[0].detach())))
        hooks.append(m.register_full_backward_hook(lambda _m, _gi, go, k=k: grads.__setitem__(k, go[0].detach())))
    s_all, rows = [], []
    try:
        for a in range(0, len(pairs), microbatch):
            tb = pack(pairs[a:a + microbatch], stack.tokenizer.pad_token_id, stack.device)
            s = sequence_logprobs(stack.model, tb, temperature, stack.autocast())
            stack.model.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # the first layer's inputs need no grad; its output grads suffice
                warnings.simplefilter("ignore", UserWarning)
                s.sum().backward()
            parts = [torch.einsum("bto,bti->boi", grads[k].float(), acts[k].float()).reshape(s.shape[0], -1)
                     for k in range(len(mods))]
            rows.append(torch.cat(parts, dim=1).cpu())
            s_all.append(s.detach().double().cpu())
            acts.clear()
            grads.clear()
    finally:
        for h in hooks:
            h.remove()
        stack.model.zero_grad(set_to_none=True)
    return torch.cat(s_all), torch.cat(rows)

"""Per-sequence gradients grad S[i] of LoRA parameters from one batched backward: the packed schedule's
machinery (gradprobe/probe/lora_grads.py) with one unit per sequence and weight 1, so each sequence's
LoRA weight products land in its own row. The statistics tests use it to afford thousands of units."""

from __future__ import annotations

import torch

from gradprobe.objective import pack, sequence_logprobs
from gradprobe.params import FlatLayout
from gradprobe.probe import lora_grads


def sequence_jacobian(stack, pairs: list[tuple[list[int], list[int]]], temperature: float,
                      microbatch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """S [k] (float64) and J [k, n] (fp32, CPU; row i = grad S[i] in the probe's parameter order)."""
    layout = FlatLayout(stack.params, block=1)  # unpadded: J's columns are the parameters in order
    s_all, rows = [], []
    try:
        with lora_grads.patch(stack.model, stack.params, stack.names, layout, "per-sequence") as streams:
            for a in range(0, len(pairs), microbatch):
                tb = pack(pairs[a:a + microbatch], stack.tokenizer.pad_token_id, stack.device)
                s = sequence_logprobs(stack.model, tb, temperature, stack.autocast())
                jac = torch.zeros(s.shape[0], layout.n, device=stack.device)
                streams.set_forward(torch.ones_like(s.detach()), None, [1] * s.shape[0], jac, None)
                s.sum().backward()
                rows.append(jac.cpu())
                s_all.append(s.detach().double().cpu())
    finally:
        stack.model.zero_grad(set_to_none=True)
    return torch.cat(s_all), torch.cat(rows)

"""Per-sequence weights that turn S into the X and Y losses of DESIGN.md.

Both losses are linear in S with weights that carry no gradient, so LX = sum(wx * S) and
LY = sum(wy * S); that linearity is what lets microbatches split a unit freely.
"""

from __future__ import annotations

import torch


def x_weights(s: torch.Tensor) -> torch.Tensor:
    """(1/G) * c[g], c[g] = S[g] - mean_{h != g} S[h]: leave-one-out baseline, needs G >= 2."""
    g = s.numel()
    s = s.detach().double()
    c = s - (s.sum() - s) / (g - 1)
    return c / g


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = R - mean_g R (group-centred)."""
    return rewards - rewards.mean()


def y_weights(adv: torch.Tensor, lengths: torch.Tensor, normalization: str) -> torch.Tensor:
    """(1/G) * A[g] / L: dr_grpo divides by the group's longest response, per_token by each one's own."""
    g = adv.numel()
    if normalization == "dr_grpo":
        denom = lengths.max().clamp(min=1).to(adv.dtype).expand_as(adv)
    else:
        denom = lengths.clamp(min=1).to(adv.dtype)
    return adv / denom / g

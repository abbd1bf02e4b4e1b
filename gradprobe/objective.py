"""The objective of docs (DESIGN: the mathematics): S[u,g] and the X and Y weights that turn it into the losses.

S is the teacher-forced log-probability of each response over its generated tokens only. Both losses are
linear in S with weights that carry no gradient, LX = sum(wx * S) and LY = sum(wy * S); that linearity is
what lets microbatches split a unit freely. Every command (probe, diagnose, validate) builds its weights
here, so their losses cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Left-padded prompt+response rows; every response ends at the last column."""

    input_ids: torch.Tensor  # [n, T]
    attention_mask: torch.Tensor  # [n, T]
    position_ids: torch.Tensor  # [n, T], counted from the first real token
    gen_mask: torch.Tensor  # [n, T] bool, True on generated tokens
    max_response: int


def pack(pairs: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> TokenBatch:
    width = max(len(p) + len(r) for p, r in pairs)
    ids, gen = [], []
    for prompt, response in pairs:
        fill = width - len(prompt) - len(response)
        ids.append([pad_id] * fill + prompt + response)
        gen.append([False] * (fill + len(prompt)) + [True] * len(response))
    lengths = torch.tensor([len(p) + len(r) for p, r in pairs])
    attention = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(torch.tensor(ids, device=device), attention.to(device), position.to(device),
                      torch.tensor(gen, device=device), max(len(r) for _, r in pairs))


def sequence_logprobs(model, batch: TokenBatch, temperature: float, autocast) -> torch.Tensor:
    """S[i] = sum_t m[i,t] log softmax(logits/tau)[y_t], fp32; only the response columns get logits."""
    keep = batch.max_response + 1  # logits at column t predict token t+1
    with autocast:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=keep, use_cache=False)
    z = out.logits[:, :-1].float()
    if temperature != 1.0:
        z = z / temperature
    targets = batch.input_ids[:, -keep + 1:] if keep > 1 else batch.input_ids[:, :0]
    mask = batch.gen_mask[:, -keep + 1:] if keep > 1 else batch.gen_mask[:, :0]
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return torch.where(mask, picked, torch.zeros((), device=picked.device)).sum(-1)


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


def group_advantages(group) -> torch.Tensor:
    """The group's given advantages, else its group-centred rewards (fp64)."""
    if group.advantages is not None:
        return torch.tensor(group.advantages, dtype=torch.float64)
    return advantages(torch.tensor(group.rewards, dtype=torch.float64))


def group_y_weights(group, normalization: str) -> torch.Tensor:
    """The Y weights of one response group with its loss lengths (the rollout's `lengths` when given)."""
    return y_weights(group_advantages(group), torch.tensor(group.loss_lengths()), normalization)


def is_flat(group) -> bool:
    """Every advantage is zero: the group's Y gradient is exactly zero (no learning signal)."""
    return not bool(group_advantages(group).any())

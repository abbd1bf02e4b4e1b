"""Teacher-forced sequence log-probabilities S[u,g] over generated tokens only."""

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

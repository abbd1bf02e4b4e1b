"""The objective of docs (DESIGN: the mathematics): S[u,g] and the X and Y weights that turn it into the losses.

S is the teacher-forced log-probability of each response over its generated tokens only. Both losses are
linear in S with weights that carry no gradient, LX = sum(wx * S) and LY = sum(wy * S); that linearity is
what lets microbatches split a unit freely. Every command (probe, diagnose, validate) builds its weights
here, so their losses cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import GradprobeError

if TYPE_CHECKING:
    from .config import ProbeSection


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


# The run's own loss (docs/objective.md): how it normalises the sequences' log-probabilities.
# group_lmax and per_token are gradprobe's own; grpo, bnpo, dr_grpo and dapo are TRL's GRPOTrainer loss_type.
LOSS_TYPES = ("group_lmax", "per_token", "grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("none", "group", "batch")
# probe.normalization (the older key) -> probe.loss_type. Its `dr_grpo` is the group's longest response,
# not TRL's dr_grpo (a constant max_completion_length).
LEGACY_NORMALIZATION = {"dr_grpo": "group_lmax", "per_token": "per_token"}
REWARD_STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


@dataclass(frozen=True)
class LossSpec:
    """The run's loss: its loss type, reward scaling and (TRL dr_grpo) constant completion length."""

    loss_type: str = "group_lmax"
    scale_rewards: str = "none"
    max_completion_length: int | None = None

    @classmethod
    def from_config(cls, probe: ProbeSection) -> LossSpec:
        return cls(probe.loss_type, probe.scale_rewards, probe.max_completion_length)


def _std(x: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected, as TRL's nanstd); 0 for a single value."""
    return x.std(unbiased=True) if x.numel() > 1 else x.new_zeros(())


def batch_advantages(batch, scale_rewards: str = "none") -> list[torch.Tensor]:
    """Per group of the batch (a rollouts Batch or a list of its groups), fp64: its given advantages as they
    are (the trainer already scaled them), else the group-centred rewards, divided by (std + 1e-4) of the
    group's (`group`) or the batch's (`batch`) rewards."""
    if scale_rewards not in SCALE_REWARDS:
        raise GradprobeError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    groups = getattr(batch, "groups", batch)
    rewards = [torch.tensor(g.rewards, dtype=torch.float64) for g in groups]
    batch_std = _std(torch.cat(rewards)) if rewards else None
    out = []
    for group, r in zip(groups, rewards):
        if group.advantages is not None:
            out.append(torch.tensor(group.advantages, dtype=torch.float64))
            continue
        adv = advantages(r)
        if scale_rewards == "group":
            adv = adv / (_std(r) + REWARD_STD_EPS)
        elif scale_rewards == "batch":
            adv = adv / (batch_std + REWARD_STD_EPS)
        out.append(adv)
    return out


def y_weights(adv: torch.Tensor, lengths: torch.Tensor, normalization: str) -> torch.Tensor:
    """One group's weights from its own advantages and loss lengths: (1/G) * A[g] / L, L the group's longest
    response (group_lmax, or probe.normalization's dr_grpo) or each response's own (per_token)."""
    g = adv.numel()
    if LEGACY_NORMALIZATION.get(normalization, normalization) == "group_lmax":
        denom = lengths.max().clamp(min=1).to(adv.dtype).expand_as(adv)
    else:
        denom = lengths.clamp(min=1).to(adv.dtype)
    return adv / denom / g


def y_weights_for_batch(batch, loss_type: str = "group_lmax", scale_rewards: str = "none",
                        max_completion_length: int | None = None) -> list[torch.Tensor]:
    """The Y weights of every group (fp64), scaled so that the run's batch loss is the MEAN over the B
    groups of sum(w * S) (the probe's units average): w = B * (the weight the loss gives S[i] in the batch).
    With N sequences, T loss tokens in the batch and L each response's loss length (docs/objective.md):
      group_lmax  A / (G * max L of the group)        per_token  A / (G * L)
      grpo        B * A / (N * L)                     dr_grpo    B * A / (N * max_completion_length)
      bnpo, dapo  B * A / T   (the batch as one optimizer step; bnpo per micro-batch is TRL's only
                               when the whole batch is one micro-batch)"""
    if loss_type not in LOSS_TYPES:
        raise GradprobeError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
        raise GradprobeError("loss_type dr_grpo (TRL's) divides by the constant max_completion_length: give it "
                             "(probe.max_completion_length); gradprobe's group-longest variant is group_lmax")
    groups = getattr(batch, "groups", batch)
    adv = batch_advantages(groups, scale_rewards)
    lengths = [torch.tensor(g.loss_lengths(), dtype=torch.float64).clamp(min=1) for g in groups]
    b = len(groups)
    n = sum(len(g.responses) for g in groups)
    tokens = max(sum(float(sum(g.loss_lengths())) for g in groups), 1.0)
    out = []
    for a, length in zip(adv, lengths):
        if loss_type in ("group_lmax", "per_token"):
            w = y_weights(a, length, loss_type)
        elif loss_type == "grpo":
            w = b * a / (n * length)
        elif loss_type == "dr_grpo":
            w = b * a / (n * float(max_completion_length))
        else:  # bnpo, dapo
            w = b * a / tokens
        out.append(w)
    return out


def loss_y_weights(batch, loss: LossSpec) -> list[torch.Tensor]:
    return y_weights_for_batch(batch, loss.loss_type, loss.scale_rewards, loss.max_completion_length)


def group_advantages(group) -> torch.Tensor:
    """The group's given advantages, else its group-centred rewards (fp64)."""
    if group.advantages is not None:
        return torch.tensor(group.advantages, dtype=torch.float64)
    return advantages(torch.tensor(group.rewards, dtype=torch.float64))


def group_y_weights(group, normalization: str) -> torch.Tensor:
    """The Y weights of one response group on its own, unscaled rewards (the rollout's `lengths` when given).
    `normalization`: a loss type that needs no other group (group_lmax, per_token, grpo), or a
    probe.normalization value (dr_grpo there means group_lmax)."""
    loss_type = LEGACY_NORMALIZATION.get(normalization, normalization)
    if loss_type not in ("group_lmax", "per_token", "grpo"):
        raise GradprobeError(f"loss type {normalization!r} needs the whole batch: use y_weights_for_batch")
    return y_weights_for_batch([group], loss_type)[0]


def is_flat(group) -> bool:
    """Every advantage is zero: the group's Y gradient is exactly zero (no learning signal)."""
    return not bool(group_advantages(group).any())

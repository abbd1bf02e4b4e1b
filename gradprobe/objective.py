"""The objective of docs (DESIGN: the mathematics): S[u,g] and the X and Y weights that turn it into the losses.

S is the teacher-forced log-probability of each response over its generated tokens only. Both losses are
linear in S with weights that carry no gradient, LX = sum(wx * S) and LY = sum(wy * S); that linearity is
what lets microbatches split a unit freely. Every command (probe, diagnose, validate) builds its weights
here, so their losses cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def token_logprobs(model, batch: TokenBatch, temperature: float, autocast) -> torch.Tensor:
    """[n, max_response] fp32: m[i,t] log softmax(logits/tau)[y_t] over the response columns (right-aligned:
    response i fills the last len(i) columns), 0 elsewhere; only the response columns get logits."""
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
    return torch.where(mask, picked, torch.zeros((), device=picked.device))


def sequence_logprobs(model, batch: TokenBatch, temperature: float, autocast) -> torch.Tensor:
    """S[i] = sum_t m[i,t] log softmax(logits/tau)[y_t], fp32."""
    return token_logprobs(model, batch, temperature, autocast).sum(-1)


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


# TRL's pass (docs/objective.md, "The pass TRL takes"): GRPOTrainer._compute_loss, trl 1.16 grpo_trainer.py
# l.3065-3175. Per token, with r = exp(logp - old_logp) and A the sequence's advantage:
#   j[t] = min(min(r, delta) A, clamp(r, 1 - eps, 1 + eps_high) A) - beta r^c kl[t],
#   kl[t] = exp(ref - logp) - (ref - logp) - 1   (k3),   c = 1 with use_bias_correction_kl (TRL's default), else 0
# TRL's loss is -sum_t n_i j[t] with the loss type's normaliser n_i; LY's weight on logp[t] is n_i dj/dlogp:
#   d(-beta kl)/dlogp = beta (exp(ref - logp) - 1);   d(-beta r kl)/dlogp = beta r (ref - logp)
# (r carries a gradient even where it is 1: TRL's on-policy old_logp is logp.detach()).


@dataclass(frozen=True)
class PassSpec:
    """The run's surrogate: passes per batch (num_iterations), the ratio's clip range, two-sided clip, KL."""

    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (TRL's default)
    beta: float = 0.0
    delta: float | None = None  # TRL's two-sided clipping of the ratio; None: off
    kl_bias_correction: bool = True  # TRL's use_bias_correction_kl: the KL term times the ratio

    @classmethod
    def from_config(cls, probe: ProbeSection) -> PassSpec:
        return cls(probe.num_iterations, probe.epsilon, probe.epsilon_high, probe.beta, probe.delta,
                   probe.kl_bias_correction)

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def has_token_logprobs(batch, key: str) -> bool:
    """Whether the batch's groups carry `key` (old_logprobs or ref_logprobs); refuses a batch where only some do."""
    groups = getattr(batch, "groups", batch)
    present = [getattr(g, key) is not None for g in groups]
    if any(present) and not all(present):
        where = getattr(batch, "meta", {}).get("source", "the batch")
        raise GradprobeError(f"{where}: '{key}' is on {sum(present)} of {len(present)} lines; give it on every line "
                             f"or on none")
    return bool(present) and all(present)


def needs_token_weights(batch, spec: PassSpec) -> bool:
    """LY needs per-token weights (TRL's ratio or KL term): with old log-probs, or a KL term; without both, every
    token of a sequence has the same weight (ratio 1, TRL's one-pass case) and LY = sum_i wy[i] S[i]."""
    return has_token_logprobs(batch, "old_logprobs") or spec.beta != 0


def check_pass(batch, spec: PassSpec) -> None:
    """Refuse a batch that cannot give the pass the run steps with: never model pass 1 in its place."""
    where = getattr(batch, "meta", {}).get("source", "the batch")
    old = has_token_logprobs(batch, "old_logprobs")
    if spec.num_iterations > 1 and not old:
        raise GradprobeError(
            f"the run takes num_iterations={spec.num_iterations} passes over each batch: passes after the first step "
            f"with TRL's clipped ratio against the sampler's log-probs, and {where} has no 'old_logprobs'; capture "
            f"the batches with gradprobe.capture.BatchCapture (docs/rollouts.md), or set probe.num_iterations=1 to "
            f"probe the batch as an on-policy first pass")
    if spec.beta != 0 and not has_token_logprobs(batch, "ref_logprobs"):
        raise GradprobeError(
            f"the run's loss has a KL term (beta {spec.beta:g}) and {where} has no 'ref_logprobs' (the reference "
            f"model's per-token log-probs); capture the batches with gradprobe.capture.BatchCapture, or set "
            f"probe.beta=0 to leave the KL term out")


def token_y_weights(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, norm: torch.Tensor,
                    spec: PassSpec, old: torch.Tensor | None = None,
                    ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [n, T], clipped [n, T] bool): w[i,t] = norm[i] dj[i,t]/dlogp[i,t], the gradient of TRL's per-token
    objective j (above) as autograd takes it through torch.min and torch.clamp (a tie splits evenly), on the
    detached log-probs; clipped marks TRL's clip_ratio/region tokens. logp, old, ref: [n, T]; adv, norm: [n]."""
    logp = logp.detach().double()
    a = adv.double()[:, None]
    r = torch.exp(logp - old.double()) if old is not None else torch.ones_like(logp)
    lo, hi = 1 - spec.epsilon, 1 + spec.eps_high
    c1 = r if spec.delta is None else r.clamp(max=spec.delta)
    c2 = r.clamp(lo, hi)
    g1 = a * r * (c1 == r)  # dc1/dlogp = r where clamp passes the gradient
    g2 = a * r * ((r >= lo) & (r <= hi))
    v1, v2 = c1 * a, c2 * a
    dj = torch.where(v1 < v2, g1, torch.where(v1 > v2, g2, (g1 + g2) / 2))
    if spec.beta != 0:
        if ref is None:
            raise GradprobeError("the KL term needs the reference model's per-token log-probs (ref_logprobs)")
        d = ref.double() - logp
        dj = dj + spec.beta * (r * d if spec.kl_bias_correction else torch.exp(d) - 1)
    m = mask.bool()
    clipped = (((r < lo) & (a < 0)) | ((r > hi) & (a > 0))) & m
    return torch.where(m, dj * norm.double()[:, None], torch.zeros((), dtype=torch.float64, device=dj.device)), clipped


def y_norms_for_batch(batch, loss_type: str, max_completion_length: int | None = None) -> list[torch.Tensor]:
    """The loss type's per-sequence normaliser n (fp64, per group): y_weights_for_batch = A * n."""
    groups = getattr(batch, "groups", batch)
    ones = [replace(g, advantages=[1.0] * len(g.responses)) for g in groups]
    return y_weights_for_batch(ones, loss_type, "none", max_completion_length)

"""Sequence entropy H(theta) of the sampling policy: exactly by enumeration, or by importance sampling.

A response is y_1..y_n with n <= L: it ends at the first EOS or at the length limit L. The sampling
policy at temperature tau is pi(y | prompt) = prod_t softmax(z_t / tau)[y_t], with z_t the logits of the
same teacher-forced forward the probe uses, so every number here describes the distribution the
probe's samples come from.

Exact path: all responses are enumerated level by level. Level k holds the V'^k unfinished prefixes
(V' = the non-EOS ids); one forward per level gives every next-token distribution, and the log-prob
of each finished response is a sum along its branch. H = -sum_y pi(y) log pi(y), differentiable in
theta, so autograd gives the exact grad H.

Importance-sampling path: fresh samples y_i ~ pi_theta, reused for every theta' (common random
numbers); H(theta') ~ sum_i w_i (-log pi_theta'(y_i)) / sum_i w_i, w_i = pi_theta'(y_i)/pi_theta(y_i).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .objective import pack, sequence_logprobs


def count_responses(vocab_size: int, max_len: int) -> int:
    """Number of distinct responses: sum_{n<L} V'^(n-1) ending in EOS, plus V'^(L-1) V of full length."""
    other = vocab_size - 1
    return sum(other ** (n - 1) for n in range(1, max_len)) + other ** (max_len - 1) * vocab_size


@dataclass
class Enumeration:
    """Every response of one prompt, in a fixed order, with its log-probability (float64)."""

    responses: list[list[int]]
    logp: torch.Tensor  # [N] float64; carries the graph when built with grad enabled

    def entropy(self) -> torch.Tensor:
        return -(self.logp.exp() * self.logp).sum()


def _next_logprobs(stack, prompt: list[int], prefixes: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z/tau) of the token after each prefix: [n, V] in float64."""
    n = prefixes.shape[0]
    ids = torch.cat([torch.tensor(prompt, device=stack.device).expand(n, -1), prefixes], dim=1)
    with stack.autocast():
        out = stack.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          position_ids=torch.arange(ids.shape[1], device=stack.device).expand(n, -1),
                          logits_to_keep=1, use_cache=False)
    z = out.logits[:, -1].double()  # float64 from here: H must resolve tiny steps
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def enumerate_prompt(stack, prompt: list[int], temperature: float, max_len: int) -> Enumeration:
    """All responses to `prompt` up to max_len tokens with their log-probs; batched by prefix level."""
    vocab = stack.model.get_input_embeddings().num_embeddings
    eos = stack.tokenizer.eos_token_id
    other = torch.tensor([t for t in range(vocab) if t != eos], device=stack.device)
    prefixes = torch.zeros(1, 0, dtype=torch.long, device=stack.device)
    lp_prefix = torch.zeros(1, dtype=torch.float64, device=stack.device)
    responses: list[list[int]] = []
    logps: list[torch.Tensor] = []
    for level in range(max_len):
        lq = _next_logprobs(stack, prompt, prefixes, temperature)  # [n, V]
        if level == max_len - 1:  # the length limit: every token finishes the response
            tokens = torch.arange(vocab, device=stack.device)
            full = torch.cat([prefixes.repeat_interleave(vocab, 0), tokens.repeat(len(prefixes))[:, None]], 1)
            responses.extend(full.tolist())
            logps.append((lp_prefix[:, None] + lq).reshape(-1))
            break
        ended = torch.cat([prefixes, torch.full((len(prefixes), 1), eos, device=stack.device)], 1)
        responses.extend(ended.tolist())
        logps.append(lp_prefix + lq[:, eos])
        # prefix-major, token-minor: the order of the next level's rows
        lp_prefix = (lp_prefix[:, None] + lq[:, other]).reshape(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(len(other), 0), other.repeat(len(prefixes))[:, None]], 1)
    return Enumeration(responses, torch.cat(logps))


def sample_enumerated(enum: Enumeration, n: int, generator: torch.Generator) -> list[list[int]]:
    """n i.i.d. responses drawn from the enumerated distribution itself (exactly the policy)."""
    probs = enum.logp.detach().exp().cpu()
    idx = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
    return [list(enum.responses[i]) for i in idx.tolist()]


@torch.no_grad()
def sample_responses(stack, prompts: list[list[int]], n: int, temperature: float, max_len: int,
                     generator: torch.Generator) -> list[list[list[int]]]:
    """n responses per prompt from pi_theta, one token at a time through the teacher-forcing forward
    (left padding, positions from the mask, no cache), so the samples follow exactly the distribution
    that sequence_logprobs scores. Full recomputation each step: slow for long responses, never wrong."""
    pad, eos = stack.tokenizer.pad_token_id, stack.tokenizer.eos_token_id
    rows = [(p, []) for p in prompts for _ in range(n)]
    live = list(range(len(rows)))
    for _ in range(max_len):
        if not live:
            break
        tb = pack([(rows[i][0], rows[i][1] + [pad]) for i in live], pad, stack.device)
        # the appended pad is a placeholder: the logits at the column before it predict the next token
        with stack.autocast(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # checkpointing warns that no input needs grad
            out = stack.model(input_ids=tb.input_ids[:, :-1], attention_mask=tb.attention_mask[:, :-1],
                              position_ids=tb.position_ids[:, :-1], logits_to_keep=1, use_cache=False)
        z = out.logits[:, -1].float()
        if temperature != 1.0:
            z = z / temperature
        probs = torch.softmax(z, dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
        for i, t in zip(live, tokens):
            rows[i][1].append(t)
        live = [i for i in live if rows[i][1][-1] != eos]
    return [[rows[k * n + j][1] for j in range(n)] for k in range(len(prompts))]


@torch.no_grad()
def score(stack, prompt: list[int], responses: list[list[int]], temperature: float,
          microbatch: int = 64) -> torch.Tensor:
    """log pi(y | prompt) of each response by teacher forcing (float64, no grad)."""
    out = []
    for a in range(0, len(responses), microbatch):
        tb = pack([(prompt, r) for r in responses[a:a + microbatch]], stack.tokenizer.pad_token_id, stack.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # checkpointing warns that no input needs grad
            out.append(sequence_logprobs(stack.model, tb, temperature, stack.autocast()).double().cpu())
    return torch.cat(out)


@dataclass
class ISEstimate:
    delta: float  # estimated H(theta') - H(theta), mean over prompts
    se: float
    ess: float  # smallest effective sample size over prompts (n when theta' = theta)


def is_delta_entropy(logq: list[torch.Tensor], logp: list[torch.Tensor],
                     weights: list[float] | None = None) -> ISEstimate:
    """Self-normalised IS estimate of H(theta') - H(theta) from samples of theta, per prompt then averaged.

    logq[k], logp[k]: log pi_theta and log pi_theta' of prompt k's samples. With a_i = -logp_i,
    b_i = -logq_i, w_i = exp(logp_i - logq_i): delta = sum w a / sum w - mean b; its delta-method
    SE is sd(z)/sqrt(n), z_i = w_i (a_i - H') / mean(w) - (b_i - H). Reusing the samples for every
    theta' makes a_i and b_i nearly equal at small steps, so the SE shrinks with the step.
    `weights`: each prompt's share of the mean (equal when omitted).
    """
    deltas, variances, ess = [], [], []
    for q, p in zip(logq, logp):
        n = q.numel()
        logw = p - q
        w = (logw - logw.max()).exp()
        h_new = float((w * -p).sum() / w.sum())
        h_old = float((-q).mean())
        z = w * (-p - h_new) / w.mean() - (-q - h_old)
        deltas.append(h_new - h_old)
        variances.append(float(z.var(unbiased=True)) / n if n > 1 else math.nan)
        ess.append(float(w.sum() ** 2 / (w * w).sum()))
    shares = weights or [1.0 / len(deltas)] * len(deltas)
    return ISEstimate(sum(w * d for w, d in zip(shares, deltas)),
                      math.sqrt(sum(w * w * v for w, v in zip(shares, variances))), min(ess))

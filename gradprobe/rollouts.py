"""The batch a probe runs on: prompts with G responses and rewards, generated or read from JSONL.

JSONL format (docs/rollouts.md), one object per prompt (one line each):
    {"prompt": "text" | [ids], "responses": ["text" | [ids], ...], "rewards": [float, ...]}
optional: "advantages": [float, ...] (used instead of group-centred rewards) and "lengths": [int, ...]
(the per-response lengths the trainer normalised its loss by, instead of the responses' token counts);
"old_logprobs" and "ref_logprobs": [[float, ...], ...], one list per response of the per-token log-probs of
its generated tokens under the sampling policy (TRL's old_per_token_logps) and the reference model (TRL's
ref_per_token_logps): TRL's pass > 1 and its KL term need them (objective.PassSpec); "step" and "pass":
the optimizer step and TRL's pass over its samples that the batch is (gradprobe.capture writes them).
Token-id responses are the generated tokens only (EOS included when it was generated). Text is
tokenised with the model's tokenizer without adding special tokens: write them as text ("<|im_end|>").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .attention import without_cudnn_attention
from .errors import GradprobeError
from .files import jsonl_objects, read_text_file, write_atomic

BUILTIN_PROMPTS = [
    "say hi:", "count to five:", "name a color:", "spell cat:", "add 2+3=", "what is up?",
    "list three fruits:", "reverse abc:", "pick a vowel:", "echo hello:", "finish: once upon",
    "name a day:", "write 7*6=", "say bye:", "a rhyme for cat:", "the next letter after q:",
]

# Prompts in the "micro" preset's seven-letter alphabet.
MICRO_PROMPTS = ["abc", "gfe", "bead", "cafe", "dge", "fab", "ace", "badge", "egg", "dad", "cab", "fade"]


def builtin_prompts(tokenizer) -> list[str]:
    """The built-in prompts that the tokenizer can encode (the micro alphabet has no spaces or digits)."""
    if hasattr(tokenizer, "index") and not set("".join(BUILTIN_PROMPTS)) <= set(tokenizer.index):
        return MICRO_PROMPTS
    return BUILTIN_PROMPTS


def builtin_reward(prompt: str, response: str) -> float:
    """Varies across samples: vowel share of the response, a bonus for stopping, a penalty for sprawl."""
    text = response.strip()
    if not text:
        return 0.0
    vowels = sum(c in "aeiou" for c in text) / len(text)
    shared = len(set(text) & set(prompt)) / max(len(set(text)), 1)
    return round(vowels + 0.5 * shared - 0.02 * len(text), 6)


@dataclass
class Group:
    """One prompt and its G sampled responses (token ids; a response ends at EOS or the length limit)."""

    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]
    advantages: list[float] | None = None
    lengths: list[int] | None = None  # loss-normalisation lengths, when they are not the token counts
    old_logprobs: list[list[float]] | None = None  # per response, per generated token: the sampler's
    ref_logprobs: list[list[float]] | None = None  # the reference model's

    def loss_lengths(self) -> list[int]:
        return self.lengths if self.lengths is not None else [len(r) for r in self.responses]


@dataclass
class Batch:
    groups: list[Group]
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def B(self) -> int:
        return len(self.groups)

    @property
    def G(self) -> int:
        return min(len(g.responses) for g in self.groups)

    def lengths(self) -> list[list[int]]:
        return [[len(r) for r in g.responses] for g in self.groups]


def _ids(value: Any, tokenizer, what: str, where: str) -> list[int]:
    if isinstance(value, str):
        try:
            if hasattr(tokenizer, "index"):  # the built-in character tokenizer
                return tokenizer.encode(value)
            return list(tokenizer(value, add_special_tokens=False)["input_ids"])
        except ValueError as exc:
            raise GradprobeError(f"{where}: {what}: {exc}") from exc
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return list(value)
    raise GradprobeError(f"{where}: {what} must be text or a list of non-negative token ids")


def _floats(value: Any, n: int, what: str, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise GradprobeError(f"{where}: '{what}' must be a list of {n} numbers, one per response")
    out = [float(v) for v in value]
    if not all(v == v and abs(v) != float("inf") for v in out):
        raise GradprobeError(f"{where}: '{what}' holds a non-finite number")
    return out


TOKEN_LOGPROBS = ("old_logprobs", "ref_logprobs")
PASS_TAGS = ("step", "pass")  # the optimizer step and TRL's pass a captured batch is (capture.py), on every line
LOGPROB_SLACK = 1e-3  # a log-softmax rounds to slightly above 0 on a near-certain token


def _token_logprobs(value: Any, responses: list[list[int]], what: str, where: str) -> list[list[float]]:
    """One list of per-token log-probs per response, as many as its tokens (the per-token form
    gradprobe.diagnose(old_logprobs=...) takes)."""
    if not isinstance(value, list) or len(value) != len(responses) or not all(isinstance(v, list) for v in value):
        raise GradprobeError(f"{where}: '{what}' must be a list of {len(responses)} lists, one per response, of "
                             f"per-token log-probs")
    try:
        rows = [[float(x) for x in v] for v in value]
    except (TypeError, ValueError) as exc:
        raise GradprobeError(f"{where}: '{what}': not numbers ({exc})") from None
    for i, (v, r) in enumerate(zip(rows, responses)):
        if len(v) != len(r):
            raise GradprobeError(f"{where}: '{what}' of response {i} has {len(v)} log-probs for its {len(r)} tokens")
    if not all(-float("inf") < x <= LOGPROB_SLACK for v in rows for x in v):
        raise GradprobeError(f"{where}: '{what}' holds a value that is not a finite log-probability (NaN, "
                             f"infinite or above 0)")
    return rows


def read_rollouts(path: str | Path, tokenizer, vocab_size: int | None = None, temperature: float = 1.0,
                  max_positions: int | None = None) -> Batch:
    """Parse and validate a rollouts file; every error names the line. `max_positions` is the model's
    context (max_position_embeddings): a longer prompt + response would be teacher-forced through
    positions the model never learned, a number without meaning."""
    p = Path(path)
    groups: list[Group] = []
    tags: dict[str, set] = {k: set() for k in PASS_TAGS}
    for where, obj in jsonl_objects(read_text_file(p, "rollouts file"), str(p)):
        for k in PASS_TAGS:
            v = obj.get(k)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise GradprobeError(f"{where}: '{k}' must be a positive integer (the trainer's {k} number)")
            tags[k].add(v)
        missing = [k for k in ("prompt", "responses", "rewards") if k not in obj]
        if missing:
            raise GradprobeError(f"{where}: missing key '{missing[0]}'")
        if not isinstance(obj["responses"], list) or len(obj["responses"]) < 2:
            raise GradprobeError(f"{where}: 'responses' must be a list of at least 2 (G >= 2)")
        prompt = _ids(obj["prompt"], tokenizer, "prompt", where)
        if not prompt:
            raise GradprobeError(f"{where}: the prompt is empty")
        responses = [_ids(r, tokenizer, f"response {i}", where) for i, r in enumerate(obj["responses"])]
        n = len(responses)
        rewards = _floats(obj["rewards"], n, "rewards", where)
        adv = _floats(obj["advantages"], n, "advantages", where) if "advantages" in obj else None
        lengths = obj.get("lengths")
        if lengths is not None and not (isinstance(lengths, list) and len(lengths) == n and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in lengths)):
            raise GradprobeError(f"{where}: 'lengths' must be a list of {n} positive integers, one per response")
        if vocab_size is not None:
            top = max([*prompt, *(t for r in responses for t in r)])
            if top >= vocab_size:
                raise GradprobeError(f"{where}: token id {top} is outside the model's vocabulary ({vocab_size})")
        if max_positions is not None:
            longest = max(range(n), key=lambda i: len(responses[i]))
            if len(prompt) + len(responses[longest]) > max_positions:
                raise GradprobeError(f"{where}: response {longest} is {len(responses[longest])} tokens after a "
                                     f"{len(prompt)}-token prompt, longer than the model's context "
                                     f"({max_positions} positions)")
        token = {k: _token_logprobs(obj[k], responses, k, where) if obj.get(k) is not None else None
                 for k in TOKEN_LOGPROBS}
        groups.append(Group(prompt, responses, rewards, adv, lengths, **token))
    if not groups:
        raise GradprobeError(f"{p}: no rollouts in the file")
    meta: dict[str, Any] = {"source": str(p)}
    for k, values in tags.items():
        if len(values) > 1:
            raise GradprobeError(f"{p}: the lines name different {k} numbers {sorted(values, key=str)}: one file is "
                                 f"one optimizer step's batch")
        if values != {None}:
            meta[k] = values.pop()
    return Batch(groups, temperature=temperature, meta=meta)


def write_rollouts(batch: Batch, path: str | Path, tokenizer=None) -> None:
    """Token ids; or text (special tokens kept as text, so reading it back gives the same ids
    with a tokenizer that round-trips, such as the built-in one) when a tokenizer is given."""
    def out(ids: list[int]) -> list[int] | str:
        return ids if tokenizer is None else _decode(tokenizer, ids, keep_special=True)

    lines = []
    for g in batch.groups:
        obj: dict[str, Any] = {"prompt": out(g.prompt), "responses": [out(r) for r in g.responses],
                               "rewards": g.rewards}
        if g.advantages is not None:
            obj["advantages"] = g.advantages
        if g.lengths is not None:
            obj["lengths"] = g.lengths
        for key in TOKEN_LOGPROBS:
            if getattr(g, key) is not None:
                obj[key] = getattr(g, key)
        obj.update({k: batch.meta[k] for k in PASS_TAGS if batch.meta.get(k) is not None})
        lines.append(json.dumps(obj))
    write_atomic(path, "\n".join(lines) + "\n", "the rollouts")


def context_length(model) -> int | None:
    """The model's context (config.max_position_embeddings), when it says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_probe_batch(batch: Batch) -> None:
    """What makes deltaH1 meaningless before any forward: with every response empty, S has no generated
    token, X = Y = 0 and deltaH1 would print as 0 +- 0 (diagnose names the same thing as a failed check)."""
    if all(len(r) == 0 for g in batch.groups for r in g.responses):
        where = batch.meta.get("source", "the batch")
        raise GradprobeError(f"every response in {where} is empty: S has no generated token, so deltaH1 is 0 by "
                             f"construction; fix generation (max_new_tokens, EOS handling) or the rollouts file")
    check_reward_scale(batch)


MAX_ABS_REWARD = 1e15  # beyond this, centring and squaring rewards in float32 leave no meaningful digit

ZERO_ADVANTAGES = ("every group's rewards are equal (zero advantages): the Y loss and its gradient are 0, so "
                   "deltaH1 and the fresh-gradient part of deltaH are 0 by construction")


def check_reward_scale(batch: Batch) -> None:
    """Rewards (or advantages) past MAX_ABS_REWARD: every estimate would overflow or be rounding noise."""
    where = batch.meta.get("source", "the batch")
    for u, g in enumerate(batch.groups):
        for what, values in (("reward", g.rewards), ("advantage", g.advantages or [])):
            big = [v for v in values if abs(v) > MAX_ABS_REWARD]
            if big:
                raise GradprobeError(f"{where}: prompt {u} has the {what} {big[0]:g}, beyond +-{MAX_ABS_REWARD:g}: "
                                     f"its square and the group mean overflow or keep no digit, so every estimate "
                                     f"would mean nothing; rescale the rewards")


def zero_advantages(batch: Batch) -> bool:
    """True when no group has a non-zero advantage (given ones all 0, or every group's rewards equal)."""
    for g in batch.groups:
        adv = g.advantages if g.advantages is not None else [r - g.rewards[0] for r in g.rewards]
        if any(a != 0 for a in adv):
            return False
    return True


def encode_prompt(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "index"):
        return tokenizer.encode(text, add_bos=True)
    return list(tokenizer(text)["input_ids"])


PROMPT_TEXT_CHARS = 200


def prompt_text(tokenizer, ids: list[int], limit: int = PROMPT_TEXT_CHARS) -> str:
    """A prompt as one line of at most about `limit` characters for reports: decoded without special tokens,
    whitespace collapsed; a longer one keeps its start and its end (a chat template puts the system prompt
    first and the question last)."""
    text = " ".join(_decode(tokenizer, ids).split())
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]} … {text[-(limit - head - 3):]}"


def _decode(tokenizer, ids: list[int], keep_special: bool = False) -> str:
    if hasattr(tokenizer, "index"):
        return tokenizer.decode([i for i in ids if i < len(tokenizer)], skip_special=not keep_special)
    return tokenizer.decode(ids, skip_special_tokens=not keep_special)


PROMPTS_PER_CALL = 8  # prompts sampled together by one generate() call


def call_seed(seed: int, first: int) -> int:
    """The sampling seed of the generate() call whose first prompt is `first`, in a batch of run seed `seed`:
    each call has its own stream, so its responses do not depend on which process samples it. The first call
    uses the run seed itself (a batch of up to PROMPTS_PER_CALL prompts is one call seeded `seed`); the others
    hash (seed, first), so they never meet the streams of nearby run seeds (seed + k: warm-up, entropy batch)."""
    if first == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"gradprobe:{seed}:{first}".encode()).digest()[:7], "big")


@torch.no_grad()
@without_cudnn_attention()
def generate_batch(stack, num_prompts: int, group_size: int, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int,
                   reward_fn: Callable[[str, str], float] = builtin_reward,
                   prompts: list[str] | None = None) -> Batch:
    """Sample G responses to each of B built-in prompts and score them. Prompts are sampled in calls of
    PROMPTS_PER_CALL consecutive prompts, each from its own seed (call_seed). Under torchrun each rank runs a
    contiguous share of the calls and every rank receives the whole batch: the batch one process samples."""
    tok = stack.tokenizer
    prompts = prompts or builtin_prompts(tok)
    texts = [prompts[i % len(prompts)] for i in range(num_prompts)]
    prompt_ids = [encode_prompt(tok, t) for t in texts]
    width = max(map(len, prompt_ids))
    ctx = context_length(stack.model)
    if ctx is not None and width + max_new_tokens > ctx:
        raise GradprobeError(f"batch.max_new_tokens={max_new_tokens} after a {width}-token prompt exceeds the model's "
                             f"context ({ctx} positions); lower batch.max_new_tokens")
    calls = [range(a, min(a + PROMPTS_PER_CALL, num_prompts)) for a in range(0, num_prompts, PROMPTS_PER_CALL)]
    r, w = distributed.rank(), distributed.world_size()
    model = stack.model
    was_training = model.training
    model.eval()
    groups: list[Group] = []
    try:
        with distributed.guard("generation"):
            for call in calls[r * len(calls) // w:(r + 1) * len(calls) // w]:
                torch.manual_seed(call_seed(seed, call.start))
                groups += _sample(stack, [prompt_ids[i] for i in call], [texts[i] for i in call], group_size,
                                  temperature, top_p, max_new_tokens, reward_fn)
            if w > 1:
                groups = [g for part in distributed.exchange("gathering the sampled batch", groups) for g in part]
    finally:
        model.train(was_training)
    return Batch(groups, temperature=temperature, meta={"source": "generated"})


def _sample(stack, prompt_ids: list[list[int]], texts: list[str], group_size: int, temperature: float,
            top_p: float, max_new_tokens: int, reward_fn: Callable[[str, str], float]) -> list[Group]:
    """One generate() call: G responses to each prompt (left-padded together), scored."""
    tok = stack.tokenizer
    width = max(map(len, prompt_ids))
    pad = tok.pad_token_id
    rows = [[pad] * (width - len(p)) + p for p in prompt_ids for _ in range(group_size)]
    input_ids = torch.tensor(rows, device=stack.device)
    attention = (torch.arange(width, device=stack.device)[None, :] >=
                 torch.tensor([width - len(p) for p in prompt_ids for _ in range(group_size)],
                              device=stack.device)[:, None]).long()
    with stack.autocast():
        out = stack.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                   temperature=temperature, top_p=top_p, top_k=0,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad,
                                   eos_token_id=tok.eos_token_id, use_cache=True)
    new = out[:, width:].tolist()
    groups = []
    for i, text in enumerate(texts):
        responses, rewards = [], []
        for row in new[i * group_size:(i + 1) * group_size]:
            ids = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            responses.append(ids)
            rewards.append(float(reward_fn(text, _decode(tok, ids))))
        groups.append(Group(prompt_ids[i], responses, rewards))
    return groups

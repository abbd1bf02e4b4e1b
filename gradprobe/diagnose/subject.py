"""What is being diagnosed: a model, the parameter list a probe would read, a loss-building callable.

Two ways in: a stack and batch gradprobe built (the CLI), or a user's own model, parameter list,
optimizer and loss function (their bug may live in their code, so nothing of ours is assumed).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GradprobeError
from ..objective import LEGACY_NORMALIZATION, LossSpec, is_flat, loss_y_weights, pack, sequence_logprobs, x_weights
from ..rollouts import Batch, Group
from .model_state import adapter_params


@dataclass
class Subject:
    model: torch.nn.Module
    params: list[torch.Tensor]
    names: list[str]
    loss_fn: Callable[[], Any]
    optimizer: torch.optim.Optimizer | None = None
    optimizer_state: dict[str, Any] | None = None  # an optimizer state_dict (e.g. from a file)
    optimizer_source: str = ""
    optimizer_order: str = "auto"  # how optimizer indices map to parameters (probe.optimizer_order)
    batch: Batch | None = None
    measured_groups: list[int] | None = None  # the groups the gradient checks run on
    autocast_off: Callable[[], contextlib.AbstractContextManager] | None = None
    expect_4bit: bool | None = None
    params_note: str = ""
    params_source: str = "given"
    adapters: set[str] | None = None  # adapter names whose weights are in the list (the ones that should take part)
    old_logprobs: Any = None  # sampling-time log-probs: per-sequence sums or per-token lists


ADAPTER_WEIGHT = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.([^.]+)(?:\.|$)")


def list_adapters(names: list[str]) -> set[str]:
    """The adapters whose LoRA weights are in the list, from their parameter names."""
    return {m.group(1) for n in names if (m := ADAPTER_WEIGHT.search(n))}


def measured_batch(rewards: list[list[float]] | None, lengths: list[list[int]] | None,
                   advantages: list[list[float]] | None) -> Batch | None:
    """What the user's loss measured, as a Batch (one group per entry): enough for the generation checks and the
    no-signal rule, which read rewards, advantages and lengths only."""
    given = next((x for x in (rewards, advantages, lengths) if x is not None), None)
    if given is None:
        return None
    for name, x in (("rewards", rewards), ("advantages", advantages), ("lengths", lengths)):
        if x is not None and (len(x) != len(given) or any(len(a) != len(b) for a, b in zip(x, given))):
            raise GradprobeError(f"{name}= must have one list per group, each as long as the group "
                                 f"(got {[len(a) for a in x]} against {[len(b) for b in given]})")
    groups = []
    for k, ref in enumerate(given):
        lens = [int(v) for v in lengths[k]] if lengths is not None else [1] * len(ref)
        rw = [float(v) for v in rewards[k]] if rewards is not None else [0.0] * len(ref)
        adv = [float(v) for v in advantages[k]] if advantages is not None else None
        groups.append(Group(prompt=[], responses=[[0] * n for n in lens], rewards=rw, advantages=adv))
    return Batch(groups, meta={"lengths_unknown": lengths is None,
                               "rewards_unknown": rewards is None and advantages is None})


def default_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], str, str]:
    """The trainable parameters; when none are, the adapter weights (so the checks can say why)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        return trainable, "the model's trainable parameters", ""
    adapters = [p for _, p in adapter_params(model)]
    if adapters:
        return adapters, "the model's adapter weights", (f"the model has no trainable parameters; checking its "
                                                         f"{len(adapters)} adapter tensors instead")
    raise GradprobeError("the model has no trainable parameters and no adapter weights to check; pass params=")


def _informative(group) -> bool:
    return not is_flat(group) and any(len(r) > 0 for r in group.responses)


def pick_groups(batch: Batch, rows: int) -> list[int]:
    """Whole groups filling at most `rows` sequences (at least one group), preferring groups that can carry
    a gradient (some non-empty response, rewards that differ): the checks ask whether gradients *flow*."""
    order = [i for i, g in enumerate(batch.groups) if _informative(g)] or list(range(batch.B))
    chosen: list[int] = []
    used = 0
    for i in order:
        n = len(batch.groups[i].responses)
        if chosen and used + n > rows:
            break
        chosen.append(i)
        used += n
    return chosen


def batch_loss_fn(stack, batch: Batch, groups: list[int], loss: LossSpec | str) -> Callable[[], dict[str, Any]]:
    """S, LX and LY of DESIGN.md over `groups`, built exactly as the probe builds them (Y weights from the
    whole batch, which the batch-level loss types need). `loss`: the run's LossSpec, or a loss type or
    probe.normalization value alone."""
    if isinstance(loss, str):
        loss = LossSpec(LEGACY_NORMALIZATION.get(loss, loss))
    pairs = [(batch.groups[p].prompt, r) for p in groups for r in batch.groups[p].responses]
    tb = pack(pairs, stack.tokenizer.pad_token_id, stack.device)
    sizes = [len(batch.groups[p].responses) for p in groups]
    weights = loss_y_weights(batch, loss)
    wy = torch.cat([weights[p] for p in groups]).to(stack.device, torch.float32)

    def loss_fn() -> dict[str, Any]:
        s = sequence_logprobs(stack.model, tb, batch.temperature, stack.autocast())
        wx = torch.cat([x_weights(part) for part in s.split(sizes)]).to(s.device, torch.float32)
        return {"S": s, "LX": (s * wx).sum(), "LY": (s * wy).sum()}

    return loss_fn


def stack_autocast_off(stack) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def off() -> Iterator[None]:
        saved = stack.autocast_dtype
        stack.autocast_dtype = None
        try:
            yield
        finally:
            stack.autocast_dtype = saved

    return off


def user_autocast_off(params: list[torch.Tensor]) -> Callable[[], contextlib.AbstractContextManager]:
    """Works when the caller's code relies on an outer autocast; a loss function that enters autocast
    itself overrides it (the trace then shows autocast still on and the factor is reported as not applied)."""
    device = params[0].device.type if params else "cpu"
    return lambda: torch.autocast(device, enabled=False)

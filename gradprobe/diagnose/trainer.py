"""gradprobe.diagnose on the step a transformers Trainer (or TRL's GRPOTrainer, or a user's subclass) really takes.

The trainer's `compute_loss` is wrapped on the instance: at a diagnosed step, on its first call (the step's
first microbatch, after TRL has generated and scored its completions), `gradprobe.diagnose` runs on the
trainer's own model with a loss callable that calls the trainer's own `compute_loss` on those real inputs,
before the trainer's call runs. So a fault that would make the trainer's backward raise (a detached loss) is
named before it does, and nothing has stepped yet.

It leaves no trace on training: diagnose puts back what it changes on the model (gradients, checkpointing,
adapter flags); `untouched` (callback.py) restores every RNG stream, train/eval flags and grad mode, so the
trainer's own compute_loss then sees exactly the state it would have seen; the metrics a trainer appends in
compute_loss (TRL's `_metrics`) and the trainer attributes it rebinds (TRL's adaptive entropy coefficient)
are restored; the optimizer is only read.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .core import DiagnoseResult, diagnose

# causes that break torch.autograd.grad only: the trainer steps with backward(), which they leave whole
AUTOGRAD_ONLY = ("reentrant_checkpointing_hides_params", "autograd_grad_mismatch")


def faults(result: DiagnoseResult) -> list[str]:
    """The verdict's causes that harm the trainer's own step (backward(), then its optimizer)."""
    return [c.id for c in result.verdict.causes if c.id not in AUTOGRAD_ONLY]


def optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    """The tensors the optimizer steps, in its order (the list the trainer really trains)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def trainer_state_kept(trainer: Any) -> Iterator[None]:
    """What a trainer's compute_loss changes on the trainer is put back after the extra calls diagnose makes:
    its attributes as bound (TRL's adaptive entropy controller reassigns `entropy_coef` and its window sums
    there) and the metrics it appends to (TRL's `_metrics[mode][key]`, whose mean it logs)."""
    attrs = dict(vars(trainer))
    metrics = getattr(trainer, "_metrics", None)
    saved = copy.deepcopy(dict(metrics)) if isinstance(metrics, dict) else None
    try:
        yield
    finally:
        for name in [n for n in vars(trainer) if n not in attrs]:
            delattr(trainer, name)
        for name, value in attrs.items():
            if vars(trainer).get(name) is not value:
                setattr(trainer, name, value)
        if saved is not None:
            for mode, kept in saved.items():  # in place: the trainer may hold its inner dicts
                if isinstance(metrics.get(mode), dict) and isinstance(kept, dict):
                    metrics[mode].clear()
                    metrics[mode].update(kept)
                else:
                    metrics[mode] = kept
            for mode in [m for m in metrics if m not in saved]:
                del metrics[mode]


@contextlib.contextmanager
def local_collectives(trainer: Any) -> Iterator[None]:
    """Under several processes diagnose runs on the main one only: the gathers and reductions TRL's loss makes
    for its metrics and its entropy controller (accelerator.gather / gather_for_metrics / reduce) are this
    process's own tensors meanwhile, so no rank waits."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or getattr(acc, "num_processes", 1) <= 1:
        yield
        return
    saved = {name: acc.__dict__.get(name) for name in ("gather", "gather_for_metrics", "reduce")}
    acc.gather = lambda tensor, *a, **k: tensor
    acc.gather_for_metrics = lambda data, *a, **k: data
    acc.reduce = lambda tensor, *a, **k: tensor
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                acc.__dict__.pop(name, None)
            else:
                setattr(acc, name, value)


@contextlib.contextmanager
def exposed_terms(trainer: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The loss terms a trainer builds where they can be seen, so that a term cut from the graph is named
    (diagnose's loss_terms check): TRL's entropy bonus (entropy_coef != 0) is made from the entropies its
    `_get_per_token_logps_and_entropies` returns for the policy's forward, recorded while the loss runs."""
    terms: dict[str, torch.Tensor] = {}
    score = getattr(trainer, "_get_per_token_logps_and_entropies", None)
    if score is None or not getattr(trainer, "entropy_coef", 0):
        yield terms
        return
    own = vars(trainer).get("_get_per_token_logps_and_entropies")

    def recording(*args, **kwargs):
        out = score(*args, **kwargs)
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
            terms["entropy_bonus"] = out[1].sum()
        return out

    trainer._get_per_token_logps_and_entropies = recording
    try:
        yield terms
    finally:
        if own is None:
            del trainer._get_per_token_logps_and_entropies
        else:
            trainer._get_per_token_logps_and_entropies = own


def diagnose_step(trainer: Any, compute_loss: Callable[..., Any], model: torch.nn.Module, inputs: Any,
                  args: tuple, kwargs: dict[str, Any], optimizer: Any) -> tuple[DiagnoseResult, float]:
    """diagnose() on the trainer's own loss at these inputs, its model (unwrapped from DDP, so no reducer
    runs) and the parameters its optimizer holds; (result, seconds). Called inside the trainer's
    training_step, so the loss runs under the trainer's own autocast and grad mode."""
    from ..callback import untouched

    t0 = time.perf_counter()
    acc = getattr(trainer, "accelerator", None)
    net = acc.unwrap_model(model) if acc is not None and getattr(acc, "num_processes", 1) > 1 else model

    def loss_fn():
        with exposed_terms(trainer) as terms:
            loss = compute_loss(net, inputs, *args, **kwargs)
        return {"loss": loss, "terms": terms} if terms else loss

    trainable = [p for p in net.parameters() if p.requires_grad]
    # the model's trainable tensors, checked against the optimizer's list; with none trainable (an adapter
    # loaded frozen), the optimizer's own list, so the checks say why it gets no gradient
    params = trainable or optimizer_params(optimizer) or None
    with untouched(net), trainer_state_kept(trainer), local_collectives(trainer):
        result = diagnose(net, params, loss_fn, optimizer=optimizer, optimizer_source="the trainer's optimizer")
    return result, time.perf_counter() - t0

"""The Python API's steps, for a user's own script (runs.py chains them into one call per command).

    from gradprobe import load_config, load_stack, build_batch, delta_h1
    cfg = load_config(overrides=["probe.microbatch_size=4"])
    stack = load_stack(cfg)
    batch = build_batch(stack, cfg)
    result = delta_h1(stack, batch, cfg)      # optimizer=... : a live optimizer, the real step's source
    print(result.deltaH, result.se_deltaH)    # the real next step (docs/real_step.md)
    print(result.deltaH1, result.se_unbiased) # the plain step lr P grad LY; NaN SE under schedule=literal
    for unit in result.units:                 # each prompt's share of deltaH and deltaH1 (they sum to them)
        print(unit["text"], unit["deltaH"])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import GradprobeError
from .files import write_atomic
from .optim.precondition import Preconditioner, build_preconditioner, from_adam_state
from .optim.state import live_state_dict, no_decay_names
from .optim.update import StepSettings, decompose, mapped_state, real_update, rounds, step_settings, with_rounding
from .probe import ProbeResult, run_probe, unit_gradients
from .probe import real_step as real_step_math
from .probe.attribution import unit_rows
from .probe.engine import units_of
from .rewards import load_reward
from .rollouts import (
    ZERO_ADVANTAGES,
    Batch,
    check_probe_batch,
    context_length,
    generate_batch,
    read_rollouts,
    zero_advantages,
)

if TYPE_CHECKING:
    from .config import Config, ProbeSection


def build_batch(stack, cfg: Config) -> Batch:
    """Teacher-force a rollouts file when one is given, else sample the built-in prompts."""
    bcfg = cfg.batch
    vocab = stack.model.get_input_embeddings().num_embeddings
    if bcfg.rollouts:
        return read_rollouts(bcfg.rollouts, stack.tokenizer, vocab, temperature=bcfg.temperature,
                             max_positions=context_length(stack.model))
    return _sampled(stack, cfg, cfg.seed)


def _sampled(stack, cfg: Config, seed: int) -> Batch:
    """A batch sampled from the current policy as batch.* says, with this seed."""
    b = cfg.batch
    return generate_batch(stack, b.num_prompts, b.group_size, b.temperature, b.top_p, b.max_new_tokens, seed=seed,
                          reward_fn=load_reward(b.reward))


def preconditioner(stack, cfg: Config) -> Preconditioner:
    """P for this stack as the config says (the optimizer state mapped in the order its trainer used)."""
    return build_preconditioner(cfg, stack.names, stack.params, model=stack.model)


def learning_rate(cfg: Config, precond: Preconditioner) -> float:
    """eta: the next step's rate, resolved with P by one rule (optim/lr.py)."""
    return precond.learning_rate


AUTO_WARMUP_STEPS = 2
WARMUP_BETAS = (0.9, 0.999)
WARMUP_WEIGHT_DECAY = 0.01


def warmup_steps(cfg: Config) -> int:
    """probe.warmup_steps, where null means: 2 on a built-in model with random weights and no optimizer
    state (the embedded default, so that its first run has momentum to show: after 2 steps about half of
    Adam's m is the earlier gradients), else 0."""
    n = cfg.probe.warmup_steps
    if n is not None:
        return n
    fresh = not (cfg.model.name_or_path or cfg.lora.adapter_path or cfg.probe.optimizer_state)
    return AUTO_WARMUP_STEPS if fresh else 0



def warm_up(stack, cfg: Config, steps: int) -> torch.optim.Optimizer:
    """`steps` real torch AdamW steps (betas 0.9/0.999, weight decay 0.01, the probe's learning rate) on
    batches sampled from the current policy with other seeds than the probe's, each on the run's loss
    -mean_u LY[u]. Changes the model; returns the optimizer, whose state then drives the real step."""
    lr = learning_rate(cfg, preconditioner(stack, cfg.with_values({"probe.precondition": "identity",
                                                                     "probe.optimizer_state": None})))
    opt = torch.optim.AdamW(stack.params, lr=lr, betas=WARMUP_BETAS, weight_decay=WARMUP_WEIGHT_DECAY)
    for k in range(steps):
        batch = _sampled(stack, cfg, cfg.seed + 1000 + k)
        rows = unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"]
        g = -rows.mean(0)
        offset = 0
        for p in stack.params:
            p.grad = g[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype).clone()
            offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if distributed.active():  # every rank took these steps: rank 0's model and state are everyone's
        distributed.broadcast_([*stack.params, *(v for p in stack.params for _, v in sorted(opt.state[p].items())
                                                 if torch.is_tensor(v))], stage="the warm-up's model and state")
    return opt


def live_preconditioner(stack, optimizer: torch.optim.Optimizer, cfg: Config,
                        what: str = "the live optimizer") -> Preconditioner:
    """P of a live Adam optimizer (the plain step deltaH1 describes), with the probe's learning rate rule."""
    precond = from_adam_state(live_state_dict(optimizer, stack.params), stack.names, stack.params, source=what,
                              order="index")
    explicit = cfg.probe.learning_rate
    precond.learning_rate = explicit if explicit is not None else float(optimizer.param_groups[0]["lr"])
    precond.learning_rate_source = "probe.learning_rate" if explicit is not None else f"{what} (param_groups lr)"
    return precond


def step_source(stack, cfg: Config, precond: Preconditioner, optimizer: Any = None):
    """(StepSettings, mapped state) of the next real step: a live optimizer, else probe.optimizer_state,
    else plain SGD at the probe's learning rate (which StepSettings.sources says)."""
    pcfg = cfg.probe
    source = optimizer if optimizer is not None else pcfg.optimizer_state
    explicit = pcfg.learning_rate
    no_decay = no_decay_names(stack.model) if source is not None and optimizer is None else None
    order = pcfg.optimizer_order
    clip = pcfg.max_grad_norm
    try:
        settings = step_settings(source, stack.names, stack.params, lr=None if source is not None else
                                 precond.learning_rate, max_grad_norm=clip, no_decay=no_decay, order=order)
    except GradprobeError as exc:  # the run's own next rate is unusable (0 at a schedule's end): the given one is
        if source is None or explicit is None:
            raise
        settings = step_settings(source, stack.names, stack.params, lr=explicit, max_grad_norm=clip,
                                 no_decay=no_decay, order=order)
        settings.sources["lr"] = f"given: probe.learning_rate (the run's own: {str(exc).split(';')[0]})"
        explicit = None  # marked already
    if source is None and explicit is None:
        settings.sources["lr"] = f"assumed: {precond.learning_rate_source}"
    elif source is not None and explicit is not None and not math.isclose(explicit, settings.lr, rel_tol=1e-9):
        # a checkpoint writes the rate it read into probe.learning_rate: only a different one is "given"
        settings.sources["lr"] = f"given: probe.learning_rate (the run's next step would use {settings.lr:g})"
        settings.lr = explicit
    mapped = mapped_state(source, stack.names, stack.params, no_decay=no_decay, order=order) \
        if source is not None else None
    return settings, mapped


def real_step(stack, cfg: Config, settings: StepSettings, grads: list[torch.Tensor],
              optimizer: Any = None) -> list[torch.Tensor]:
    """The step the optimizer's next step() makes with these loss gradients, as the run's dtype rounds it: its
    own arithmetic on copies (optim/update.py real_update), from the source step_source resolved."""
    pcfg = cfg.probe
    source = optimizer if optimizer is not None else pcfg.optimizer_state
    no_decay = no_decay_names(stack.model) if source is not None and optimizer is None else None
    return real_update(source, stack.params, grads, max_grad_norm=settings.max_grad_norm, lr=settings.lr,
                       names=stack.names, no_decay=no_decay, order=pcfg.optimizer_order)


def step_summary(settings: StepSettings) -> dict[str, Any]:
    """The StepSettings for the report: per-tensor lists only where they are not all one value."""
    out = asdict(settings)
    for key in ("weight_decays", "steps"):
        if len(set(out[key])) <= 1:
            out.pop(key)
    return out


def delta_h1(stack, batch: Batch, cfg: Config,
             progress: Callable[[int, int], None] | None = None, precond: Preconditioner | None = None,
             store: Any = None, optimizer: Any = None, entropy_batch: Batch | None = None,
             keep_update: bool = False) -> ProbeResult:
    """Run the probe with the preconditioner and learning rate the config names (or `precond`, built
    earlier with preconditioner(stack, cfg) so that a mismatched optimizer state fails before sampling).
    deltaH is the real next step of `optimizer` (a live torch/bitsandbytes optimizer), else of
    probe.optimizer_state, else plain SGD; with `entropy_batch` (or probe.entropy_batch=independent, then
    sampled with another seed) its X comes from that batch (real_step.independent). keep_update: the step the
    headline describes and the loss gradient it came from, per trainable tensor, in result.update and
    result.gradient (save_update writes the step)."""
    check_probe_batch(batch)
    precond = precond if precond is not None else preconditioner(stack, cfg)
    lr = learning_rate(cfg, precond)
    settings, mapped = step_source(stack, cfg, precond, optimizer)
    kept: dict[str, Any] = {}

    def parts(grads: list[torch.Tensor]):
        found = decompose(settings, mapped, stack.names, stack.params, grads)
        if rounds(stack.params, mapped):  # the run's dtype rounds the step: the headline is the rounded one
            found = with_rounding(found, real_step(stack, cfg, settings, grads, optimizer), grads)
        kept["grads"], kept["parts"] = grads, found
        return found

    t0 = time.perf_counter()
    result = run_probe(stack, batch, cfg.probe, precond, lr, progress=progress, store=store, step_parts=parts)
    result.timings["probe"] = time.perf_counter() - t0
    result.step = step_summary(settings)
    if keep_update and "parts" in kept:
        result.update = dict(zip(stack.names, kept["parts"].total(kept["grads"])))
        result.gradient = dict(zip(stack.names, kept["grads"]))
    if mapped is None and math.isfinite(result.deltaH):
        result.real_step_note = "no optimizer state: the real step is plain SGD (identity P, no momentum, no decay)"
    if entropy_batch is None and cfg.probe.entropy_batch == "independent":
        entropy_batch = build_entropy_batch(stack, cfg)
    if entropy_batch is not None and "parts" in kept:
        t1 = time.perf_counter()
        independent_estimate(stack, entropy_batch, cfg, kept["parts"], kept["grads"], result)
        result.timings["entropy batch"] = time.perf_counter() - t1
    if zero_advantages(batch):  # a number without meaning unless it says why it is 0
        result.notes.insert(0, ZERO_ADVANTAGES)
    result.resolve()
    return result


def save_update(result: ProbeResult, model, path) -> None:
    """The headline's step as safetensors under the adapter's own names (as adapter_model.safetensors has them:
    without the adapter's name), so that it can be held against the run's checkpoint difference."""
    from safetensors.torch import save

    if result.update is None:
        raise GradprobeError(f"no step to save to {path}: {result.real_step_note or 'deltaH was not computed'}")
    adapters = getattr(model, "peft_config", {}) or {}
    names = {}
    for name, t in result.update.items():
        key = name
        for adapter in adapters:
            key = key.replace(f".{adapter}.", ".")
        names[key] = t.detach().float().contiguous().cpu()
    meta = {"what": "the step deltaH describes: theta' - theta of the next optimizer step, as the run's dtype "
                    "rounds it (gradprobe delta-h1)", "deltaH": repr(result.deltaH),
            "deltaH_unrounded": repr(result.deltaH_unrounded)}
    write_atomic(path, save(names, metadata=meta), "the step")


def build_entropy_batch(stack, cfg: Config) -> Batch:
    """The independent entropy batch: batch.entropy_rollouts, else sampled like the update batch with
    another seed (so its samples share nothing with the step's)."""
    bcfg = cfg.batch
    if bcfg.entropy_rollouts:
        vocab = stack.model.get_input_embeddings().num_embeddings
        return read_rollouts(bcfg.entropy_rollouts, stack.tokenizer, vocab, temperature=bcfg.temperature)
    if bcfg.rollouts:
        raise GradprobeError("probe.entropy_batch=independent with batch.rollouts needs batch.entropy_rollouts "
                             "(responses from the same policy, other samples)")
    return _sampled(stack, cfg, cfg.seed + 7919)


def independent_estimate(stack, entropy_batch: Batch, cfg: Config, parts, grads: list[torch.Tensor],
                         result: ProbeResult) -> None:
    """deltaH = -mean_u X_E[u] . Delta theta on the entropy batch; the same-batch estimate moves to
    result.same_batch."""
    est = independent_step(stack, entropy_batch, cfg.probe, parts, grads)
    result.same_batch = {"deltaH": result.deltaH, "se_deltaH": result.se_deltaH,
                         "se_deltaH_batches": result.se_deltaH_batches, "parts": result.parts}
    result.deltaH, result.se_deltaH, result.se_deltaH_batches = est.deltaH, est.se_deltaH, math.nan
    result.deltaH_unrounded = est.deltaH - (est.rounding.value if est.rounding is not None else 0.0)
    result.parts, result.entropy_batch = est.parts(), "independent"
    result.units = [{**row, "deltaH": math.nan} for row in result.units]  # deltaH is the entropy batch's now
    units = units_of(entropy_batch, cfg.probe.mode, cfg.probe.block_size)
    result.entropy_units = unit_rows(entropy_batch, units, stack.tokenizer, None, est.unit_terms)


def independent_step(stack, entropy_batch: Batch, probe_cfg: ProbeSection, parts,
                     grads: list[torch.Tensor]) -> real_step_math.RealStepEstimate:
    """deltaH = -mean_u X_E[u] . Delta theta of the step whose parts (optim.update.decompose) and loss
    gradients are given, X_E[u] from the entropy batch (real_step.independent: plain SE over its units)."""
    x = unit_gradients(stack, entropy_batch, probe_cfg, Preconditioner(None), kinds=("x",))["x"].double()

    def flat(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).double().cpu() for t in ts])

    fresh = parts.clip_factor * flat(parts.fresh) * flat(grads)
    rounding = x @ flat(parts.rounding) if parts.rounding is not None else None
    return real_step_math.independent(x @ fresh, x @ flat(parts.momentum), x @ flat(parts.decay),
                                      float(parts.clip_factor), rounding)

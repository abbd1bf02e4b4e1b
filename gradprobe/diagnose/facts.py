"""Everything the checks and the verdict read, gathered once: the baseline measurement and the model's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError
from ..objective import is_flat
from ..optim.precondition import from_adam_state
from ..optim.state import StateMismatch, has_second_moment, live_state_dict, no_decay_names
from ..optim.update import real_update
from .logprobs import LogprobGap, compare
from .measure import GradStats, Measurement
from .model_state import (
    adapter_params,
    adapter_state,
    checkpointing_state,
    ddp_state,
    lora_b_zero,
    lora_dead,
    quantized_layers,
    short_name,
)
from .subject import Subject

ADAM_LIKE = ("Adam", "AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit", "Adam8bit", "PagedAdam")


@dataclass
class Identity:
    in_model: int
    not_in_model: list[int]  # indices into the probe's list
    frozen_in_list: list[int]
    frozen_not_adapter: list[int]  # frozen tensors of the list that are not adapter weights
    duplicates: int
    model_trainable: int
    trainable_not_in_list: list[str]  # model names
    optimizer_given: bool = False
    not_in_optimizer: list[int] = field(default_factory=list)
    optimizer_extra: int = 0


@dataclass
class OptimizerCoverage:
    given: bool
    source: str = ""
    covered: int = 0
    missing: list[str] = field(default_factory=list)  # parameter names without Adam state
    zero_v: list[str] = field(default_factory=list)  # state present but exp_avg_sq all zero: P = 1/eps
    error: str | None = None  # a state_dict that cannot be mapped at all
    mismatch: bool = False  # its counts or shapes are another model's (the error says which)
    never_stepped: bool = False  # an optimizer object with no state at all
    not_adam: str | None = None


@dataclass
class Generation:
    given: bool
    rows: int = 0
    empty_rows: int = 0
    mean_length: float = 0.0
    max_length: int = 0
    groups: int = 0
    flat_groups: int = 0  # groups whose advantages are all zero: their Y is exactly zero
    measured_groups: list[int] = field(default_factory=list)
    measured_flat: bool = False  # every measured group is flat
    lengths_known: bool = True  # False when the caller gave rewards without lengths


@dataclass
class Facts:
    subject: Subject
    m: Measurement
    names: list[str]
    short: list[str]
    ckpt: dict[str, Any]
    adapters: dict[str, Any]
    quant: dict[str, Any]
    identity: Identity
    optimizer: OptimizerCoverage
    generation: Generation
    expected_zero: set[int]  # indices whose zero gradient is explained (lora_A with lora_B = 0)
    nonfinite_params: list[int]
    caller_grad_enabled: bool
    caller_inference_mode: bool
    layer_idx: dict[str, list[int]] = field(default_factory=dict)  # adapter layer -> its tensors in the list
    dropout: list[str] = field(default_factory=list)  # modules (and config fields) with dropout p > 0
    logprobs: LogprobGap | None = None  # old log-probs against the recomputed S (when given)
    differential: list[Any] = field(default_factory=list)
    ddp: dict[str, Any] | None = None  # the DistributedDataParallel wrapper's settings (None: not wrapped)
    dead: set[int] = field(default_factory=set)  # indices of lora_A/lora_B whose pair is all zero
    precision: dict[str, Any] | None = None  # half-precision trainable tensors against the optimizer's next step

    @property
    def n(self) -> int:
        return len(self.names)

    def stats(self, loss: str, api: str) -> GradStats | None:
        return self.m.get(loss, api)

    def expected(self, loss: str) -> set[int]:
        """Indices whose exactly-zero gradient is explained: lora_A behind a zero lora_B; for Y, all of them
        when every measured group has identical rewards (zero advantages)."""
        if loss == "LY" and self.generation.measured_flat:
            return set(range(self.n))
        return self.expected_zero

    def unexplained(self, st: GradStats | None, loss: str = "") -> list[int]:
        """Indices with no gradient, or an exactly zero one that nothing explains."""
        if st is None:
            return []
        return sorted(set(st.missing) | (set(st.zero) - self.expected(loss)))

    def starved(self) -> set[int]:
        """Tensors the primary backward left without a non-zero gradient that nothing explains."""
        return set(self.unexplained(self.m.get(self.m.primary, "backward"), self.m.primary))

    def layers_where(self, pick, starved_only: bool = True) -> list[str]:
        """Adapter layers (short names) that `pick(seen)` selects and whose tensors in the list get no gradient
        (every selected one when no gradient was measured: the backward raised; or with starved_only=False)."""
        if not starved_only:
            return [short_name(name) for name, seen in self.m.trace.layers.items()
                    if pick(seen) and self.layer_idx.get(name)]
        measured = self.m.get(self.m.primary, "backward") is not None and self.m.raised is None
        starved = self.starved()
        return [short_name(name) for name, seen in self.m.trace.layers.items()
                if pick(seen) and self.layer_idx.get(name) and (not measured or set(self.layer_idx[name]) & starved)]

    def label(self, idx: list[int], limit: int | None = None) -> list[str]:
        out = [self.short[i] for i in idx]
        return out if limit is None else out[:limit]


def _identity(s: Subject) -> Identity:
    named = list(s.model.named_parameters())
    model_ids = {id(p) for _, p in named}
    list_ids = [id(p) for p in s.params]
    adapter_ids = {id(p) for _, p in adapter_params(s.model)}
    frozen = [k for k, p in enumerate(s.params) if id(p) in model_ids and not p.requires_grad]
    ident = Identity(
        in_model=sum(i in model_ids for i in list_ids),
        not_in_model=[k for k, i in enumerate(list_ids) if i not in model_ids],
        frozen_in_list=frozen,
        frozen_not_adapter=[k for k in frozen if list_ids[k] not in adapter_ids],
        duplicates=len(list_ids) - len(set(list_ids)),
        model_trainable=sum(p.requires_grad for _, p in named),
        trainable_not_in_list=[n for n, p in named if p.requires_grad and id(p) not in set(list_ids)],
    )
    if s.optimizer is not None:
        opt_ids = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
        ident.optimizer_given = True
        ident.not_in_optimizer = [k for k, i in enumerate(list_ids) if i not in opt_ids]
        ident.optimizer_extra = len(opt_ids - set(list_ids))
    return ident


def _coverage(cov: OptimizerCoverage, state: dict[str, Any], names: list[str], s: Subject, order: str,
              no_decay: set[str] | None) -> OptimizerCoverage:
    """Map a state_dict onto the parameters as the probe would, and say which tensors it leaves uncovered."""
    try:
        pre = from_adam_state(state, names, list(s.params), source=cov.source, no_decay=no_decay, order=order)
    except GradprobeError as exc:
        cov.error = str(exc)
        cov.mismatch = isinstance(exc, StateMismatch)
        cov.missing = _missing_by_index(state, names)
        return cov
    cov.covered = len(pre.scales or [])
    cov.zero_v = [n for n, sc in zip(names, pre.scales or []) if bool((sc > 1e7).all())]
    return cov


def _optimizer(s: Subject, names: list[str]) -> OptimizerCoverage:
    if s.optimizer is not None:
        opt = s.optimizer
        cov = OptimizerCoverage(given=True, source=type(opt).__name__, never_stepped=not opt.state)
        state = live_state_dict(opt, list(s.params))
        held = [k for g in state["param_groups"] for k in g["params"]]
        with_v = [k for k in held if has_second_moment(state["state"].get(k))]
        if not with_v:
            if type(opt).__name__ not in ADAM_LIKE:
                cov.not_adam = type(opt).__name__
            elif not cov.never_stepped:
                cov.missing = [names[k] for k in range(len(names))]
            return cov
        if len(with_v) < len(names):  # map only the held ones; the rest are named as missing
            cov.missing = [names[k] for k in range(len(names)) if k not in set(with_v)]
            cov.covered = len(with_v)
            return cov
        return _coverage(cov, state, names, s, "named", None)
    if s.optimizer_state is not None:
        cov = OptimizerCoverage(given=True, source=s.optimizer_source or "optimizer state_dict")
        return _coverage(cov, s.optimizer_state, names, s, s.optimizer_order, no_decay_names(s.model))
    return OptimizerCoverage(given=False)


def _missing_by_index(state: dict[str, Any], names: list[str]) -> list[str]:
    """Which parameters lack Adam state when the state_dict maps by index (for the evidence)."""
    order = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    if len(order) != len(names):
        return []
    entries = state.get("state", {})
    return [n for n, i in zip(names, order) if not has_second_moment(entries.get(i))]


def _layer_idx(s: Subject, m: Measurement) -> dict[str, list[int]]:
    return {layer: [i for i, n in enumerate(s.names) if n.startswith(layer + ".")] for layer in m.trace.layers}


def _dropout(model: torch.nn.Module) -> list[str]:
    """Where dropout with p > 0 acts in train mode: dropout modules and the config's dropout rates."""
    out = [short_name(n) for n, mod in model.named_modules()
           if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0]
    for holder in {id(c): c for c in (getattr(mod, "config", None) for mod in model.modules()) if c}.values():
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout"):
            value = getattr(holder, key, None)
            if isinstance(value, float) and value > 0 and f"config.{key}" not in out:
                out.append(f"config.{key}={value}")
    return out


def _generation(s: Subject) -> Generation:
    b = s.batch
    if b is None:
        return Generation(given=False)
    known = not b.meta.get("lengths_unknown")
    lengths = [n for grp in b.lengths() for n in grp]
    flat = [is_flat(g) and not b.meta.get("rewards_unknown") for g in b.groups]  # lengths= alone: no reward
    measured = s.measured_groups or []
    return Generation(given=True, rows=len(lengths), empty_rows=sum(n == 0 for n in lengths) if known else 0,
                      mean_length=sum(lengths) / max(len(lengths), 1) if known else 0.0,
                      max_length=max(lengths, default=0) if known else 0, lengths_known=known,
                      groups=b.B, flat_groups=sum(flat), measured_groups=list(measured),
                      measured_flat=bool(measured) and all(flat[i] for i in measured))


def _logprobs(s: Subject, m: Measurement) -> LogprobGap | None:
    if s.old_logprobs is None or m.loss_error:
        return None
    b = s.batch
    lengths = None
    if b is not None and not b.meta.get("lengths_unknown"):
        groups = s.measured_groups if s.measured_groups is not None else range(b.B)
        lengths = [n for g in groups for n in b.groups[g].loss_lengths()]
    out = compare(s.old_logprobs, m.trace.captured, lengths)
    m.trace.captured.clear()  # the logits are large: keep the numbers only
    return out


HALF = (torch.bfloat16, torch.float16)


def wants_gradient(s: Subject) -> bool:
    """Whether the primary gradient must be kept: the precision check steps the optimizer on it."""
    return s.optimizer is not None and any(p.requires_grad and p.dtype in HALF for p in s.params)


def _half_ulp(w: torch.Tensor) -> torch.Tensor:
    a = w.detach().float().abs().clamp(min=torch.finfo(w.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * torch.finfo(w.dtype).eps / 2


def _precision(s: Subject, m: Measurement, names: list[str]) -> dict[str, Any] | None:
    """Step a copy of the user's optimizer on the measured gradient (optim.update.real_update) and name the
    half-precision tensors whose elements with a non-zero gradient the step leaves unchanged (>= half of them)."""
    bw = m.get(m.primary, "backward")
    if not wants_gradient(s) or bw is None or bw.vector is None:
        return None
    if not any(float(g.get("lr", 0.0)) > 0 for g in s.optimizer.param_groups):
        return {"optimizer": type(s.optimizer).__name__, "lr": 0.0, "lost": [],
                "error": "the learning rate is 0: no step moves any weight, whatever the precision"}
    grads = [g.view_as(p) for g, p in zip(bw.vector.split([p.numel() for p in s.params]), s.params)]
    try:
        delta = real_update(s.optimizer, list(s.params), grads, names=names)
    except (GradprobeError, RuntimeError, KeyError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "lost": []}
    lost = []
    for i, p in enumerate(s.params):
        if not (p.requires_grad and p.dtype in HALF):
            continue
        moving = grads[i] != 0
        unchanged = (delta[i] == 0) & moving.cpu()
        if int(moving.sum()) and int(unchanged.sum()) * 2 >= int(moving.sum()):
            lost.append({"name": short_name(names[i]), "dtype": str(p.dtype).removeprefix("torch."),
                         "unchanged": f"{int(unchanged.sum())}/{int(moving.sum())}",
                         "unchanged_n": int(unchanged.sum()),
                         "numel": p.numel(), "abs_median": float(p.detach().float().abs().median()),
                         "half_ulp": float(_half_ulp(p).median())})
    return {"optimizer": type(s.optimizer).__name__, "lr": float(s.optimizer.param_groups[0]["lr"]), "lost": lost}


def gather(s: Subject, m: Measurement, caller_grad: bool, caller_inference: bool) -> Facts:
    names = s.names
    nonfinite = [i for i, p in enumerate(s.params)
                 if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]
    zero_a = lora_b_zero(s.model)
    dead_names = lora_dead(s.model)
    expected = {i for i, n in enumerate(names) if n in zero_a and n not in dead_names}  # a dead A is no fresh one
    return Facts(subject=s, m=m, names=names, short=[short_name(n) for n in names],
                 ckpt=checkpointing_state(s.model), adapters=adapter_state(s.model), quant=quantized_layers(s.model),
                 identity=_identity(s), optimizer=_optimizer(s, names), generation=_generation(s),
                 expected_zero=expected, nonfinite_params=nonfinite,
                 caller_grad_enabled=caller_grad, caller_inference_mode=caller_inference,
                 layer_idx=_layer_idx(s, m), dropout=_dropout(s.model), logprobs=_logprobs(s, m),
                 dead={i for i, n in enumerate(names) if n in dead_names}, ddp=ddp_state(s.model),
                 precision=_precision(s, m, names))

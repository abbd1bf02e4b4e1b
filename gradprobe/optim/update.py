"""The update the run's next optimizer.step() will make, computed without making it.

`real_update` runs the optimizer's own step (torch Adam/AdamW in its single-tensor, foreach or fused form,
torch SGD, bitsandbytes Adam/AdamW 8-bit, 32-bit and paged) on clones of the parameters and a deep copy of
its state: Δθ is the optimizer's arithmetic, not a re-derivation. `decompose` splits the same Δθ into the
parts an entropy estimator treats differently (the fresh gradient, what momentum carries, weight decay):

    Δθ = clip·a⊙g + momentum + decay        g: gradient of the run's LOSS (the step descends along −g)

Adam/AdamW (torch and bitsandbytes), t = the next step, bc_i = 1 − β_i^t, s = −1 under maximize else 1,
ĝ = s·clip·g (+ wd·θ for torch Adam's coupled decay), m = β1·m₋ + (1−β1)·ĝ, v = β2·v₋ + (1−β2)·ĝ²
(amsgrad: v ← max(vmax₋, v)), D = sqrt(v/bc2) + ε:
    a = −s·lr(1−β1)/(bc1·D),  momentum = −lr·β1·m₋/(bc1·D),
    decay = −lr·wd·θ (decoupled: torch AdamW and every bitsandbytes Adam) or −lr(1−β1)·wd·θ/(bc1·D) (torch Adam).
D holds this batch's g², so the parts are exact for the given g, but a depends on g (an estimator linear in
g treats that to first order). bitsandbytes 8-bit: m₋ and v₋ are the dequantised stored moments, which is
what its step computes with (it requantises only what it stores afterwards), so the parts still sum to its
step up to float rounding; tests/optim/test_update.py checks the sum against the real step at the tolerance it
states. On a CPU, bitsandbytes runs paged optimizers unpaged (same arithmetic).
SGD (torch; source None: plain SGD at lr, no momentum, no decay): ĝ = s·clip·g + wd·θ, b = μ·b₋ + (1−d)·ĝ
(b = ĝ on the first step), Δθ = −lr·(ĝ + μ·b if nesterov else b).

Interface (tag `update-api`): StepSettings, UpdateParts, step_settings, mapped_state, decompose, real_update.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GradprobeError
from .lr import next_learning_rate, one_rate
from .state import MappedState, live_state_dict, load_state_dict, map_state, moments


@dataclass
class StepSettings:
    """What the next optimizer.step() will do, and where each value came from."""

    optimizer: str  # "AdamW", "Adam", "PagedAdamW8bit", "AdamW8bit", "AdamW32bit", ..., or "SGD"
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float  # the largest group's; per tensor in weight_decays
    weight_decays: list[float]  # per trainable tensor, probe order
    amsgrad: bool
    maximize: bool
    step: int  # the step count the NEXT step uses (stored step + 1)
    max_grad_norm: float | None
    sources: dict[str, str]  # field -> "read: ...", "given: ...", "assumed: ..."
    family: str = "adam"  # "adam" or "sgd": which arithmetic decompose applies
    library: str = "torch"  # "torch" or "bitsandbytes"
    decoupled: bool = True  # weight decay applied to θ directly (AdamW, bitsandbytes) or through g (torch Adam)
    steps: list[int] = field(default_factory=list)  # per tensor: the step count its next update uses
    momentum: float = 0.0  # SGD
    dampening: float = 0.0  # SGD
    nesterov: bool = False  # SGD


@dataclass
class UpdateParts:
    """Δθ = clip_factor·fresh⊙g + momentum + decay (+ rounding), per trainable tensor (probe order), fp32 on
    the CPU. `rounding` (set by with_rounding) is what the run's dtype does to that step: the optimizer's own
    step on copies held as the run holds them, minus the exact-arithmetic parts."""

    fresh: list[torch.Tensor]  # elementwise coefficient a of the (clipped) fresh gradient
    momentum: list[torch.Tensor]  # what the optimizer's stored momentum carries
    decay: list[torch.Tensor]  # the weight-decay part
    clip_factor: float  # min(1, max_grad_norm/(‖g‖+1e-6)); 1.0 without clipping
    rounding: list[torch.Tensor] | None = None  # real step − the parts above; None: not computed (fp32 run)
    rounded_away: float = 0.0  # share of coordinates with a non-zero exact step whose real step is 0
    theta_norm: float = math.nan  # ‖θ‖ of the trainable tensors: the scale of "a large step"

    def unrounded(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.clip_factor * a * g.detach().float().cpu() + m + d
                for a, g, m, d in zip(self.fresh, grads, self.momentum, self.decay)]

    def total(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        exact = self.unrounded(grads)
        return exact if self.rounding is None else [x + r for x, r in zip(exact, self.rounding)]


ADAM_KEYS = ("exp_avg", "state1")


def _is_live(source: Any) -> bool:
    return isinstance(source, torch.optim.Optimizer)


def _bnb_name(source: Any) -> str | None:
    """bitsandbytes' optimizer_name ('adam', 'lion', ...) of a live bitsandbytes optimizer; None for others."""
    return getattr(source, "optimizer_name", None) if type(source).__module__.startswith("bitsandbytes") else None


def _kind(source: Any, mapped: MappedState, optimizer: str | None) -> tuple[str, str, str, str]:
    """(optimizer name, family, library, where the name came from)."""
    if _is_live(source):
        name = type(source).__name__
        bnb = _bnb_name(source)
        if bnb is not None:
            if bnb != "adam" or getattr(getattr(source, "args", None), "max_unorm", 0.0) > 0:
                raise GradprobeError(f"{name} ({bnb}) is not an Adam-type update: only bitsandbytes Adam/AdamW "
                                     f"(8-bit, 32-bit, paged) are supported")
            return name, "adam", "bitsandbytes", "read: the live optimizer's class"
        if isinstance(source, torch.optim.Adam):  # AdamW is an Adam subclass in torch
            return name, "adam", "torch", "read: the live optimizer's class"
        if isinstance(source, torch.optim.SGD):
            return name, "sgd", "torch", "read: the live optimizer's class"
        raise GradprobeError(f"optimizer {name} is not supported: torch Adam/AdamW/SGD or bitsandbytes Adam/AdamW")
    entries = [e for e in mapped.entries if e]
    groups = mapped.groups
    if any("state1" in e for e in entries) or (not entries and any("t_alpha" in g for g in groups)):
        bits = "8bit" if any(e.get("state1") is not None and e["state1"].dtype == torch.uint8 for e in entries) \
            else "32bit"
        name = optimizer or f"AdamW{bits}"
        return name, "adam", "bitsandbytes", f"given: {optimizer}" if optimizer else \
            "read: bitsandbytes state (state1/state2); paged or not is not stored and does not change the step"
    if any("momentum_buffer" in e for e in entries) or (not entries and any("nesterov" in g for g in groups)):
        return optimizer or "SGD", "sgd", "torch", f"given: {optimizer}" if optimizer else "read: SGD state"
    if any("exp_avg" in e for e in entries) or any("betas" in g for g in groups):
        if optimizer:
            return optimizer, "adam", "torch", f"given: {optimizer}"
        flags = {g.get("decoupled_weight_decay") for g in groups}
        if flags == {True}:
            return "AdamW", "adam", "torch", "read: param_groups decoupled_weight_decay=True"
        if flags == {False}:
            return "Adam", "adam", "torch", "read: param_groups decoupled_weight_decay=False"
        return "AdamW", "adam", "torch", "assumed: AdamW (the state does not say Adam or AdamW; Trainer's default)"
    raise GradprobeError("the optimizer state is neither Adam/AdamW (torch, bitsandbytes) nor SGD")


def _resolve_source(source: Any, names: list[str], params: list[torch.Tensor], no_decay: set[str] | None,
                    order: str) -> tuple[MappedState | None, str, Path | None]:
    if source is None:
        return None, "none", None
    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = load_state_dict(path)
    if _is_live(source):
        return map_state(live_state_dict(source, params), names, params, "the live optimizer", order="index"), \
            "the live optimizer", None
    if not (isinstance(source, dict) and "state" in source and "param_groups" in source):
        raise GradprobeError(f"not an optimizer, an optimizer state_dict or its file: {type(source).__name__}")
    where = str(path) if path else "the optimizer state"
    return map_state(source, names, params, where, no_decay, order), where, path


def mapped_state(source: Any, names: list[str], params: list[torch.Tensor], *, no_decay: set[str] | None = None,
                 order: str = "auto") -> MappedState | None:
    """The optimizer's state laid onto `params` (None for source None): what decompose reads."""
    return _resolve_source(source, names, params, no_decay, order)[0]


def _one(values: list[Any], what: str, where: str) -> Any:
    if len({repr(v) for v in values}) > 1:
        raise GradprobeError(f"{where} gives the parameter groups different {what} {values}; one value is needed")
    return values[0]


def _stored_step(st: dict[str, Any]) -> int:
    s = st.get("step", 0)
    return int(float(s.item() if torch.is_tensor(s) else s))


def step_settings(source: Any, names: list[str], params: list[torch.Tensor], *, lr: float | None = None,
                  max_grad_norm: float | None = None, no_decay: set[str] | None = None, order: str = "auto",
                  optimizer: str | None = None) -> StepSettings:
    """Read what the next step will do from a live optimizer, a state_dict or its file (then a scheduler.pt
    beside it gives the next learning rate); None: plain SGD at `lr`. `optimizer` names the class where the
    state cannot tell (e.g. Adam vs AdamW from an old torch)."""
    return _settings(source, names, params, lr, max_grad_norm, no_decay, order, optimizer)[0]


def _settings(source, names, params, lr, max_grad_norm, no_decay, order, optimizer
              ) -> tuple[StepSettings, MappedState | None]:
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise GradprobeError(f"max_grad_norm must be > 0 (or None: no clipping); got {max_grad_norm}")
    clip_src = "given: max_grad_norm" if max_grad_norm is not None else \
        "assumed: no clipping (max_grad_norm not given; an optimizer state does not store it)"
    mapped, where, path = _resolve_source(source, names, params, no_decay, order)
    n = len(params)
    if mapped is None:
        if lr is None:
            raise GradprobeError("without an optimizer the step is plain SGD and needs a learning rate")
        none = "assumed: no optimizer state, so plain SGD"
        return StepSettings("SGD", float(lr), (0.0, 0.0), 0.0, 0.0, [0.0] * n, False, False, 1, max_grad_norm,
                            {"optimizer": none, "lr": "given: lr", "betas": none, "eps": none,
                             "weight_decay": none, "amsgrad": none, "maximize": none, "step": none,
                             "max_grad_norm": clip_src}, family="sgd", steps=[1] * n), None
    name, family, library, name_src = _kind(source, mapped, optimizer)
    groups = mapped.groups
    read = f"read: {where} param_groups"
    sources = {"optimizer": name_src, "max_grad_norm": clip_src}
    if lr is not None:
        rate, sources["lr"] = float(lr), "given: lr"
    elif path is not None:
        rate, lr_src, _ = next_learning_rate(None, mapped.state_dict, path)
        sources["lr"] = f"read: {lr_src}"
    else:
        rate, sources["lr"] = one_rate([float(g["lr"]) for g in groups], where), read
    steps = [_stored_step(e) + 1 for e in mapped.entries]
    step = max(steps, default=1)
    sources["step"] = f"read: {where} state step + 1" if any(mapped.entries) else \
        "assumed: the first step (no state stored yet)"
    wds = [float(g.get("weight_decay", 0.0)) for g in groups]
    sources["weight_decay"] = read
    settings = StepSettings(name, rate, (0.0, 0.0), 0.0, max(wds, default=0.0), wds, False, False, step,
                            max_grad_norm, sources, family=family, library=library, steps=steps)
    for key in ("maximize", "amsgrad"):
        present = [bool(g.get(key, False)) for g in groups]
        setattr(settings, key, _one(present, key, where))
        sources[key] = read if any(key in g for g in groups) else f"assumed: off ({name} has no {key})"
    if family == "adam":
        settings.betas = tuple(float(b) for b in _one([tuple(g["betas"])[:2] for g in groups], "betas", where))
        settings.eps = float(_one([g["eps"] for g in groups], "eps", where))
        sources["betas"] = sources["eps"] = read
        settings.decoupled = library == "bitsandbytes" or bool(_one(
            [g.get("decoupled_weight_decay", name != "Adam") for g in groups], "decoupled_weight_decay", where))
    else:
        settings.momentum = float(_one([g.get("momentum", 0.0) for g in groups], "momentum", where))
        settings.dampening = float(_one([g.get("dampening", 0.0) for g in groups], "dampening", where))
        settings.nesterov = bool(_one([g.get("nesterov", False) for g in groups], "nesterov", where))
        sources["betas"] = sources["eps"] = "assumed: not used by SGD"
    return settings, mapped


def _clip_coef(grads: list[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
    """clip_grad_norm_'s coefficient min(1, max_norm/(‖g‖+1e-6)), computed as torch computes it."""
    if max_grad_norm is None:
        return torch.ones(())
    total = torch.nn.utils.get_total_norm([g.detach().float().cpu() for g in grads])
    return torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)


def decompose(settings: StepSettings, state: MappedState | list[dict[str, Any]] | None, names: list[str],
              params: list[torch.Tensor], grads: list[torch.Tensor]) -> UpdateParts:
    """The parts of the next step's Δθ for the loss gradient `grads` (formulas in the module docstring)."""
    entries = state.entries if isinstance(state, MappedState) else (state or [{} for _ in params])
    if len(entries) != len(params) or len(grads) != len(params):
        raise GradprobeError(f"decompose: {len(params)} parameters, {len(entries)} states, {len(grads)} gradients")
    coef = _clip_coef(grads, settings.max_grad_norm)
    clip, sign, lr = float(coef), -1.0 if settings.maximize else 1.0, settings.lr
    fresh, mom, dec = [], [], []
    for j, (name, p, g) in enumerate(zip(names, params, grads)):
        theta = p.detach().double().cpu()
        wd = settings.weight_decays[j]
        g_hat = (g.detach().float().cpu() * coef).double() * sign
        st = entries[j] or {}
        if settings.family == "sgd":
            b_prev = st.get("momentum_buffer")
            mu, d = settings.momentum, settings.dampening
            if mu == 0 or b_prev is None:  # first step: b = ĝ
                a_scale, m_part = (1.0 + mu if settings.nesterov else 1.0), torch.zeros_like(theta)
            elif settings.nesterov:
                a_scale, m_part = 1.0 + mu * (1.0 - d), -lr * mu * mu * b_prev.double().cpu()
            else:
                a_scale, m_part = 1.0 - d, -lr * mu * b_prev.double().cpu()
            a = torch.full_like(theta, -lr * sign * a_scale)
            d_part = -lr * a_scale * wd * theta
        else:
            b1, b2 = settings.betas
            t = settings.steps[j] if settings.steps else settings.step
            found = moments(st, f"'{name}'")
            m_prev, v_prev, vmax_prev = (torch.zeros_like(theta),) * 2 + (None,) if found is None else \
                tuple(None if x is None else x.double().cpu() for x in found)
            g_eff = g_hat if settings.decoupled or wd == 0 else g_hat + wd * theta
            v = b2 * v_prev + (1.0 - b2) * g_eff * g_eff
            if settings.amsgrad:
                v = torch.maximum(vmax_prev, v) if vmax_prev is not None else v
            bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            k = lr / bc1 / ((v / bc2).sqrt() + settings.eps)
            a = -sign * (1.0 - b1) * k
            m_part = -b1 * k * m_prev
            d_part = -lr * wd * theta if settings.decoupled else -(1.0 - b1) * k * wd * theta
        fresh.append(a.float())
        mom.append(m_part.float())
        dec.append(d_part.float())
    theta_norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
    return UpdateParts(fresh, mom, dec, clip, theta_norm=theta_norm)


def rounds(params: list[torch.Tensor], state: MappedState | None) -> bool:
    """Whether the run holds some trainable tensor in a dtype coarser than fp32, where its step rounds."""
    entries = state.entries if state is not None else [{} for _ in params]
    return any(_run_dtype(e or {}, p) in (torch.bfloat16, torch.float16) for e, p in zip(entries, params))


def with_rounding(parts: UpdateParts, real: list[torch.Tensor], grads: list[torch.Tensor]) -> UpdateParts:
    """`parts` with the rounding the run's dtype applies: `real` is the optimizer's own step on copies in the
    run's dtype (real_update), which is what θ' − θ of the run's checkpoint is."""
    exact = parts.unrounded(grads)
    parts.rounding = [r.float() - x for r, x in zip(real, exact)]
    moving = sum(int((x != 0).sum()) for x in exact)
    parts.rounded_away = sum(int(((r == 0) & (x != 0)).sum()) for r, x in zip(real, exact)) / max(moving, 1)
    return parts


def _optimizer_class(settings: StepSettings) -> type[torch.optim.Optimizer]:
    if settings.library == "bitsandbytes":
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, settings.optimizer, None)
        return cls if isinstance(cls, type) else bnb.optim.AdamW
    if settings.family == "sgd":
        return torch.optim.SGD
    return torch.optim.Adam if settings.optimizer == "Adam" else torch.optim.AdamW


def real_update(source: Any, params: list[torch.Tensor], grads: list[torch.Tensor], *,
                max_grad_norm: float | None = None, lr: float | None = None, names: list[str] | None = None,
                no_decay: set[str] | None = None, order: str = "auto",
                optimizer: str | None = None) -> list[torch.Tensor]:
    """The exact Δθ (fp32, CPU, probe order) the optimizer's next step makes with these loss gradients:
    its own step on cloned parameters and a deep copy of its state (gradients clipped first by
    clip_grad_norm_ when max_grad_norm is given; `lr` replaces every group's rate), each parameter in the
    dtype the run held it in (_run_dtype). Neither the model nor the optimizer changes. A state_dict (or its
    file) is mapped by `names` as state.map_state does."""
    names = names if names is not None else [f"params[{i}]" for i in range(len(params))]
    settings, mapped = _settings(source, names, params, lr, max_grad_norm, no_decay, order, optimizer)
    if len(grads) != len(params):
        raise GradprobeError(f"real_update: {len(params)} parameters but {len(grads)} gradients")
    dtypes = [_run_dtype(e, p) for e, p in zip(mapped.entries, params)] if mapped else [p.dtype for p in params]
    starts = [p.detach().to(dt) for p, dt in zip(params, dtypes)]
    clones = [torch.nn.Parameter(x.clone(), requires_grad=True) for x in starts]
    if mapped is None:  # plain SGD
        groups: list[dict[str, Any]] = [{"params": clones, "lr": settings.lr}]
        copy_opt: torch.optim.Optimizer = torch.optim.SGD(groups)
    else:
        saved = copy.deepcopy(mapped.state_dict)
        slots = iter(mapped.owner)
        groups = []
        for g in saved["param_groups"]:
            g.pop("param_names", None)
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [clones[next(slots)] for _ in g["params"]]})
        cls = type(source) if _is_live(source) else _optimizer_class(settings)
        copy_opt = cls(groups)
        if _is_live(source) and hasattr(source, "args"):
            copy_opt.args = copy.deepcopy(source.args)  # bitsandbytes: optim_bits, min_8bit_size, ...
        copy_opt.load_state_dict(saved)
        for g in copy_opt.param_groups:
            g["lr"] = settings.lr
    for c, g in zip(clones, grads):
        c.grad = g.detach().to(c.device, c.dtype).clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(clones, max_grad_norm)
    copy_opt.step()
    return [(c.detach().float() - x.float()).cpu() for c, x in zip(clones, starts)]


def _run_dtype(entry: dict[str, Any], p: torch.Tensor) -> torch.dtype:
    """The dtype the run held the parameter in: torch Adam keeps its moments in the parameter's dtype, so
    bf16 moments mean a bf16 parameter (e.g. a bias of a 4-bit model) that the run stepped in bf16, even
    when the probe holds it in fp32."""
    m = entry.get("exp_avg")
    return m.dtype if torch.is_tensor(m) and m.is_floating_point() else p.dtype

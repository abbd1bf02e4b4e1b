"""The Adam preconditioner P = diag(1/(sqrt(v_hat) + eps)) of the run being probed.

A parameter without Adam state is an error, never a silent zero: v = 0 gives P = 1/eps ~ 1e8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import GradprobeError


class StateMismatch(GradprobeError):
    """The optimizer state's counts or shapes are another model's or adapter's."""


@dataclass
class Preconditioner:
    """Per-parameter inverse scales in the probe's parameter order (None: identity)."""

    scales: list[torch.Tensor] | None
    learning_rate: float | None = None  # the lr the optimizer state carries, if any
    source: str = "identity"

    def flat(self, device: torch.device) -> torch.Tensor | None:
        if self.scales is None:
            return None
        return torch.cat([s.reshape(-1).float() for s in self.scales]).to(device)


def _strip(name: str) -> str:
    """Compare names without PEFT's wrapper prefix and adapter name, which differ across save/load."""
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".default.", ".")


def load_state_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GradprobeError(f"optimizer state file not found: {p}")
    try:  # memory-mapped where the file allows it: a large state is then read only where it is used
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a truncated or foreign file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GradprobeError(f"cannot read optimizer state {p} (truncated, or not a torch.save file that loads "
                                 f"with weights_only=True): {first}") from exc
    if isinstance(state, dict) and "optimizer" in state and "state" not in state:
        state = state["optimizer"]
    if not (isinstance(state, dict) and "state" in state and "param_groups" in state):
        raise GradprobeError(f"{p} is not an optimizer state_dict (no 'state' and 'param_groups')")
    return state


# Trainer.get_decay_parameter_names: parameters in these layers or with these names get no weight decay
# and go into the optimizer's second parameter group.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names the transformers Trainer puts in its no-weight-decay group (its get_decay_parameter_names)."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    return {n for n, _ in model.named_parameters() if n not in decay}


def trainer_order(names: list[str], no_decay: set[str]) -> list[int]:
    """Positions of the trainable parameters in the order Trainer.create_optimizer lists them:
    the weight-decay group, then the no-decay group, each in named_parameters order."""
    return [i for i, n in enumerate(names) if n not in no_decay] + [i for i, n in enumerate(names) if n in no_decay]


def _resolve_order(groups: list[dict[str, Any]], names: list[str], no_decay: set[str] | None,
                   order: str) -> tuple[list[int], str]:
    """Which trainable parameter each optimizer index holds (by position in `names`), and why."""
    named = list(range(len(names)))
    if order == "named":
        return named, "named_parameters order"
    if no_decay is None:
        if order == "trainer":
            raise GradprobeError("the trainer's parameter order needs the model (its no-decay parameter names)")
        return named, "named_parameters order"
    trainer = trainer_order(names, no_decay)
    if trainer == named:
        return named, "named_parameters order, which is the Trainer's here"
    n_decay = len(names) - sum(n in no_decay for n in names)
    sizes = [len(g["params"]) for g in groups]
    trainer_made = len(groups) == 2 and float(groups[1].get("weight_decay", -1.0)) == 0.0
    if order == "trainer" or sizes == [n_decay, len(names) - n_decay] or trainer_made:
        return trainer, "trainer order: weight-decay group, then no-decay group"
    return named, "named_parameters order"


BNB_STATE = "__bnb_optimizer_quant_state__"  # where bitsandbytes optimizers' state_dict puts state1/state2


def _dequantize_8bit(st: dict[str, Any], where: str) -> torch.Tensor:
    """A bitsandbytes 8-bit blockwise second moment (adamw_8bit, paged_adamw_8bit) as the optimizer itself
    reads it: v = qmap2[state2] * absmax2[block], blocks of consecutive values."""
    q, absmax, code = st["state2"], st.get("absmax2"), st.get("qmap2")
    if absmax is None or code is None:
        raise GradprobeError(f"{where} holds 8-bit bitsandbytes state without absmax2/qmap2 (not blockwise); "
                             f"only 32-bit and blockwise 8-bit Adam states are supported")
    n = q.numel()
    block = next((b for b in (64, 128, 256, 512, 1024, 2048, 4096) if -(-n // b) == absmax.numel()), None)
    if block is None:
        raise GradprobeError(f"{where}: 8-bit state of {n} values with {absmax.numel()} blocks fits no block size")
    v = code.float()[q.reshape(-1).long()] * absmax.float().repeat_interleave(block)[:n]
    return v.reshape(q.shape)


def _second_moment(st: dict[str, Any], group: dict[str, Any], where: str) -> torch.Tensor:
    """exp_avg_sq of torch Adam/AdamW (max_exp_avg_sq under amsgrad), or state2 of a bitsandbytes Adam
    (32-bit as is, 8-bit blockwise dequantised)."""
    st = {**st, **st.get(BNB_STATE, {})}
    if group.get("amsgrad") and "max_exp_avg_sq" in st:
        return st["max_exp_avg_sq"]
    if "exp_avg_sq" in st:
        return st["exp_avg_sq"]
    if "state2" in st:
        return _dequantize_8bit(st, where) if st["state2"].dtype == torch.uint8 else st["state2"]
    raise GradprobeError(f"{where}: no Adam state (exp_avg_sq); use probe.precondition=identity to probe without it")


def _check_layout(slots: list, owner: list[int | None], state: dict, names: list[str],
                  params: list[torch.nn.Parameter], source: str, how: str) -> None:
    """Counts and every shape, before any arithmetic; one line naming the first index and parameter that
    disagree (the usual cause: the state belongs to another adapter, of other rank or target modules)."""
    first = None
    for k, (index, _) in enumerate(slots):
        j = owner[k]
        if j is None:
            first = f"optimizer index {index} has no parameter"
            break
        st = state.get(index) or {}
        st = {**st, **st.get(BNB_STATE, {})}
        v = next((st[key] for key in ("max_exp_avg_sq", "exp_avg_sq", "state2") if key in st), None)
        if v is not None and tuple(v.shape) != tuple(params[j].shape):
            first = (f"optimizer index {index} has shape {tuple(v.shape)} but parameter '{names[j]}' has shape "
                     f"{tuple(params[j].shape)}")
            break
    if first is None and len(slots) < len(params):
        unowned = sorted(set(range(len(params))) - {j for j in owner if j is not None})
        first = f"parameter '{names[unowned[0]]}' has no optimizer index"
    if first is None and len(slots) == len(params):
        return
    count = (f": it covers {len(slots)} parameters but the model has {len(params)} trainable ones"
             if len(slots) != len(params) else "")
    raise StateMismatch(f"{source} does not match the model{count} ({how}); first mismatch: {first}")


def from_adam_state(state_dict: dict[str, Any], names: list[str], params: list[torch.nn.Parameter],
                    source: str = "optimizer state", no_decay: set[str] | None = None,
                    order: str = "auto") -> Preconditioner:
    """Map an Adam/AdamW state_dict onto the trainable parameters: by name when the state carries
    names (optimizers built from named_parameters); else by index: in the order the transformers
    Trainer built its parameter groups (decay, then no-decay) when the state looks Trainer-made (its
    group sizes match that split, or two groups with no weight decay in the second) or order='trainer';
    else in named_parameters order. Every shape is checked; the first mismatch is named."""
    groups = state_dict["param_groups"]
    slots = [(i, g) for g in groups for i in g["params"]]
    saved_names = [n for g in groups for n in g.get("param_names", [])]
    if saved_names and len(saved_names) == len(slots) and order != "trainer":
        by_name = {_strip(n): k for k, n in enumerate(saved_names)}
        missing = [n for n in names if _strip(n) not in by_name]
        if missing:
            raise GradprobeError(f"{source} has no entry named like trainable parameter '{missing[0]}'")
        positions = {by_name[_strip(n)]: j for j, n in enumerate(names)}
        owner = [positions.get(k) for k in range(len(slots))]
        how = "parameter names saved in the state"
    else:
        pos, how = _resolve_order(groups, names, no_decay, order)
        owner = [pos[k] if k < len(pos) else None for k in range(len(slots))]
    state = state_dict["state"] if isinstance(state_dict["state"], dict) else {}
    _check_layout(slots, owner, state, names, params, source, how)
    scales: list[torch.Tensor] = [torch.empty(0)] * len(params)
    for k, (index, group) in enumerate(slots):
        j = owner[k]
        name, st = names[j], state.get(index)
        where = f"{source}: optimizer index {index} ('{name}')"
        if st is None:
            raise GradprobeError(f"{where} has no Adam state; use probe.precondition=identity to probe without it")
        v = _second_moment(st, group, where)
        step = float(st.get("step", 0))
        if step < 1:
            raise GradprobeError(f"{where} has step {step}; Adam state needs step >= 1")
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        eps = float(group.get("eps", 1e-8))
        v_hat = v.double() / (1.0 - beta2 ** step)
        scales[j] = (1.0 / (v_hat.sqrt() + eps)).float()
    lrs = {float(g["lr"]) for g in groups if "lr" in g and g["params"]}
    lr = lrs.pop() if len(lrs) == 1 else None
    return Preconditioner(scales, learning_rate=lr, source=f"{source} ({how})")


def build_preconditioner(cfg: dict[str, Any], names: list[str], params: list[torch.nn.Parameter],
                         model: torch.nn.Module | None = None) -> Preconditioner:
    """P from the config; pass the model so that a Trainer-written state maps in the Trainer's order."""
    pcfg = cfg["probe"]
    if pcfg["precondition"] == "identity":
        if pcfg["optimizer_state"]:
            raise GradprobeError("probe.optimizer_state is set but probe.precondition is 'identity'; "
                                 "set probe.precondition=adam to use it")
        return Preconditioner(None)
    if not pcfg["optimizer_state"]:
        raise GradprobeError("probe.precondition=adam needs probe.optimizer_state (an optimizer state_dict "
                             "file); or set probe.precondition=identity")
    path = pcfg["optimizer_state"]
    no_decay = no_decay_names(model) if model is not None else None
    other = _other_adapter(Path(path), model)
    try:
        precond = from_adam_state(load_state_dict(path), names, params, source=str(path), no_decay=no_decay,
                                  order=pcfg["optimizer_order"])
    except GradprobeError as exc:
        raise GradprobeError(f"{exc}; {other}" if other else str(exc)) from None
    if other:  # equal shapes can still be another adapter's state (e.g. k_proj's moments on v_proj)
        raise GradprobeError(f"{path} does not belong to the model's adapter: {other}")
    return precond


ADAPTER_LAYOUT_KEYS = ("r", "target_modules", "bias", "modules_to_save", "rank_pattern", "layers_to_transform")


def _other_adapter(optimizer_file: Path, model: torch.nn.Module | None) -> str | None:
    """When the optimizer state sits beside an adapter_config.json (a Trainer checkpoint), the ways that
    adapter's layout differs from the model's active adapter; None when it matches or cannot be told."""
    sibling = optimizer_file.parent / "adapter_config.json"
    configs = getattr(model, "peft_config", None)
    if not sibling.is_file() or not isinstance(configs, dict):
        return None
    try:
        saved = json.loads(sibling.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    active = configs.get(getattr(model, "active_adapter", "default"))
    if active is None or not isinstance(saved, dict):
        return None

    def norm(value: Any) -> Any:
        return sorted(value) if isinstance(value, (list, set, tuple)) else (value or None)

    diff = [f"{k} {norm(saved.get(k))} there, {norm(getattr(active, k, None))} here" for k in ADAPTER_LAYOUT_KEYS
            if k in saved and norm(saved.get(k)) != norm(getattr(active, k, None))]
    return f"{sibling} describes another adapter ({'; '.join(diff)})" if diff else None

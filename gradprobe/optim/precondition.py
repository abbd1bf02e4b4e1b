"""The Adam preconditioner P = diag(1/(sqrt(v_hat) + eps)) of the run being probed.

A parameter without Adam state is an error, never a silent zero: v = 0 gives P = 1/eps ~ 1e8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GradprobeError
from .lr import next_learning_rate
from .state import load_state_dict, map_state, no_decay_names, second_moment

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class Preconditioner:
    """Per-parameter inverse scales in the probe's parameter order (None: identity)."""

    scales: list[torch.Tensor] | None
    learning_rate: float | None = None  # the next step's rate (optim/lr.py), once build_preconditioner resolved it
    source: str = "identity"
    learning_rate_source: str = ""


def from_adam_state(state_dict: dict[str, Any], names: list[str], params: list[torch.nn.Parameter],
                    source: str = "optimizer state", no_decay: set[str] | None = None,
                    order: str = "auto") -> Preconditioner:
    """P from an Adam/AdamW state_dict, mapped onto the trainable parameters by state.map_state."""
    mapped = map_state(state_dict, names, params, source, no_decay, order)
    state = mapped.state_dict["state"] if isinstance(mapped.state_dict["state"], dict) else {}
    owner, slots, how = mapped.owner, mapped.slots, mapped.how
    scales: list[torch.Tensor] = [torch.empty(0)] * len(params)
    for k, (index, group) in enumerate(slots):
        j = owner[k]
        name, st = names[j], state.get(index)
        where = f"{source}: optimizer index {index} ('{name}')"
        if st is None:
            raise GradprobeError(f"{where} has no Adam state; use probe.precondition=identity to probe without it")
        v = second_moment(st, group, where)
        step = float(st.get("step", 0))
        if not (step >= 1 and step != float("inf")):
            raise GradprobeError(f"{where} has step {step:g}; Adam state needs a finite step >= 1")
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        eps = float(group.get("eps", 1e-8))
        v_hat = v.double() / (1.0 - beta2 ** step)
        scales[j] = (1.0 / (v_hat.sqrt() + eps)).float()
    return Preconditioner(scales, source=f"{source} ({how})")


def build_preconditioner(cfg: Config, names: list[str], params: list[torch.nn.Parameter],
                         model: torch.nn.Module | None = None) -> Preconditioner:
    """P from the config; pass the model so that a Trainer-written state maps in the Trainer's order."""
    pcfg = cfg.probe
    if pcfg.precondition == "identity":
        if pcfg.optimizer_state:
            raise GradprobeError("probe.optimizer_state is set but probe.precondition is 'identity'; "
                                 "set probe.precondition=adam to use it")
        rate, rate_source, _ = next_learning_rate(pcfg.learning_rate)
        return Preconditioner(None, learning_rate=rate, learning_rate_source=rate_source)
    if not pcfg.optimizer_state:
        raise GradprobeError("probe.precondition=adam needs probe.optimizer_state (an optimizer state_dict "
                             "file); or set probe.precondition=identity")
    path = pcfg.optimizer_state
    no_decay = no_decay_names(model) if model is not None else None
    other = _other_adapter(Path(path), model)
    state = load_state_dict(path)
    if not any(isinstance(st, dict) and st for st in state["state"].values()):
        # saved before the first step (capture.save_initial): no moments; Adam's first step is sign-like, no P
        precond = Preconditioner(None, source=f"identity ({path} has taken no step: no Adam moments yet)")
        precond.learning_rate, precond.learning_rate_source, _ = next_learning_rate(pcfg.learning_rate, state,
                                                                                    Path(path))
        return precond
    try:
        precond = from_adam_state(state, names, params, source=str(path), no_decay=no_decay,
                                  order=pcfg.optimizer_order)
    except GradprobeError as exc:
        raise GradprobeError(f"{exc}; {other}" if other else str(exc)) from None
    if other:  # equal shapes can still be another adapter's state (e.g. k_proj's moments on v_proj)
        raise GradprobeError(f"{path} does not belong to the model's adapter: {other}")
    precond.learning_rate, precond.learning_rate_source, _ = next_learning_rate(pcfg.learning_rate, state,
                                                                                Path(path))
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

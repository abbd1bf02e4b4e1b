"""The Adam preconditioner P = diag(1/(sqrt(v_hat) + eps)) of the run being probed.

A parameter without Adam state is an error, never a silent zero: v = 0 gives P = 1/eps ~ 1e8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import GradprobeError


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
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise GradprobeError(f"cannot read optimizer state {p}: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and "optimizer" in state and "state" not in state:
        state = state["optimizer"]
    if not (isinstance(state, dict) and "state" in state and "param_groups" in state):
        raise GradprobeError(f"{p} is not an optimizer state_dict (no 'state' and 'param_groups')")
    return state


def from_adam_state(state_dict: dict[str, Any], names: list[str], params: list[torch.nn.Parameter],
                    source: str = "optimizer state") -> Preconditioner:
    """Map an Adam/AdamW state_dict onto the trainable parameters: by name when the state carries
    names (optimizers built from named_parameters), else by index in param_groups order."""
    groups = state_dict["param_groups"]
    order = [(i, g) for g in groups for i in g["params"]]
    if len(order) != len(params):
        raise GradprobeError(f"{source} covers {len(order)} parameters but the model has {len(params)} "
                             f"trainable ones")
    saved_names = [n for g in groups for n in g.get("param_names", [])]
    if saved_names and len(saved_names) == len(order):
        by_name = {_strip(n): k for k, n in enumerate(saved_names)}
        slots = []
        for name in names:
            if _strip(name) not in by_name:
                raise GradprobeError(f"{source} has no entry named like trainable parameter '{name}'")
            slots.append(order[by_name[_strip(name)]])
    else:
        slots = order
    scales = []
    for name, p, (index, group) in zip(names, params, slots):
        st = state_dict["state"].get(index) if isinstance(state_dict["state"], dict) else None
        if st is None or "exp_avg_sq" not in st:
            raise GradprobeError(f"{source}: no Adam state (exp_avg_sq) at index {index} for parameter '{name}'; "
                                 f"use probe.precondition=identity to probe without it")
        v = st["exp_avg_sq"]
        if tuple(v.shape) != tuple(p.shape):
            raise GradprobeError(f"{source}: index {index} has shape {tuple(v.shape)} but parameter '{name}' "
                                 f"has shape {tuple(p.shape)}")
        step = float(st.get("step", 0))
        if step < 1:
            raise GradprobeError(f"{source}: index {index} ('{name}') has step {step}; Adam state needs step >= 1")
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        eps = float(group.get("eps", 1e-8))
        v_hat = v.double() / (1.0 - beta2 ** step)
        scales.append((1.0 / (v_hat.sqrt() + eps)).float())
    lrs = {float(g["lr"]) for g in groups if "lr" in g}
    lr = lrs.pop() if len(lrs) == 1 else None
    return Preconditioner(scales, learning_rate=lr, source=source)


def build_preconditioner(cfg: dict[str, Any], names: list[str], params: list[torch.nn.Parameter]) -> Preconditioner:
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
    return from_adam_state(load_state_dict(path), names, params, source=str(path))

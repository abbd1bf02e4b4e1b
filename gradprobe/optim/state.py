"""An optimizer's stored state, read one way everywhere: from a file or a live optimizer, torch Adam/AdamW
(amsgrad too) or bitsandbytes Adam (32-bit, blockwise 8-bit, paged), mapped onto the trainable parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import GradprobeError
from ..files import load_torch_file
from ..params import canonical_name


class StateMismatch(GradprobeError):
    """The optimizer state's counts or shapes are another model's or adapter's."""


def load_state_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GradprobeError(f"optimizer state file not found: {p}")
    # memory-mapped where the file allows it: a large state is then read only where it is used
    state = load_torch_file(p, "optimizer state", mmap=True)
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


def resolve_order(groups: list[dict[str, Any]], names: list[str], no_decay: set[str] | None,
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


def _dequantize_8bit(st: dict[str, Any], where: str, which: int = 2) -> torch.Tensor:
    """A bitsandbytes 8-bit blockwise moment (adamw_8bit, paged_adamw_8bit; which=1: exp_avg, 2: exp_avg_sq)
    as the optimizer itself reads it: x = qmap[state][...] * absmax[block], blocks of consecutive values."""
    q, absmax, code = st[f"state{which}"], st.get(f"absmax{which}"), st.get(f"qmap{which}")
    if absmax is None or code is None:
        raise GradprobeError(f"{where} holds 8-bit bitsandbytes state without absmax{which}/qmap{which} (not "
                             f"blockwise); only 32-bit and blockwise 8-bit Adam states are supported")
    n = q.numel()
    block = next((b for b in (64, 128, 256, 512, 1024, 2048, 4096) if -(-n // b) == absmax.numel()), None)
    if block is None:
        raise GradprobeError(f"{where}: 8-bit state of {n} values with {absmax.numel()} blocks fits no block size")
    x = code.float()[q.reshape(-1).long()] * absmax.float().repeat_interleave(block)[:n]
    return x.reshape(q.shape)


def entry(st: dict[str, Any] | None) -> dict[str, Any]:
    """One parameter's state with bitsandbytes' nested quantisation state lifted to the top level."""
    st = st or {}
    return {**st, **st.get(BNB_STATE, {})}


SECOND_MOMENT_KEYS = ("max_exp_avg_sq", "exp_avg_sq", "state2")


def has_second_moment(st: dict[str, Any] | None) -> bool:
    return any(k in entry(st) for k in SECOND_MOMENT_KEYS)


def second_moment(st: dict[str, Any], group: dict[str, Any], where: str) -> torch.Tensor:
    """exp_avg_sq of torch Adam/AdamW (max_exp_avg_sq under amsgrad), or state2 of a bitsandbytes Adam
    (32-bit as is, 8-bit blockwise dequantised)."""
    st = entry(st)
    if group.get("amsgrad") and "max_exp_avg_sq" in st:
        return checked_moment(st["max_exp_avg_sq"], where)
    if "exp_avg_sq" in st:
        return checked_moment(st["exp_avg_sq"], where)
    if "state2" in st:
        v = _dequantize_8bit(st, where) if st["state2"].dtype == torch.uint8 else st["state2"]
        return checked_moment(v, where)
    raise GradprobeError(f"{where}: no Adam state (exp_avg_sq); use probe.precondition=identity to probe without it")


def checked_moment(v: Any, where: str) -> torch.Tensor:
    """A second moment is a running mean of squares: a NaN, an infinity or a negative value means a corrupt
    or diverged state, and P = 1/(sqrt(v)+eps) would turn it into a NaN or a silently wrong deltaH1."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise GradprobeError(f"{where}: the second moment is not a floating-point tensor")
    vf = v.float()
    bad = int((~torch.isfinite(vf)).sum())
    if bad:
        raise GradprobeError(f"{where}: the second moment (exp_avg_sq) holds {bad} non-finite values of {v.numel()}: "
                             f"the run diverged or the file is corrupt")
    neg = int((vf < 0).sum())
    if neg:
        raise GradprobeError(f"{where}: the second moment (exp_avg_sq) holds {neg} negative values of {v.numel()} "
                             f"(min {float(vf.min()):.3g}); a mean of squares cannot be negative: the file is corrupt")
    return v

def moments(st: dict[str, Any], where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(exp_avg, exp_avg_sq, max_exp_avg_sq or None) in fp32 as stored (8-bit dequantised); None without state."""
    st = entry(st)
    if "exp_avg" in st and "exp_avg_sq" in st:
        vmax = st.get("max_exp_avg_sq")
        return (st["exp_avg"].float(), checked_moment(st["exp_avg_sq"], where).float(),
                None if vmax is None else checked_moment(vmax, where).float())
    if "state1" in st and "state2" in st:
        if st["state1"].dtype == torch.uint8:
            return _dequantize_8bit(st, where, 1), checked_moment(_dequantize_8bit(st, where, 2), where), None
        return st["state1"].float(), checked_moment(st["state2"], where).float(), None
    if any(k in st for k in ("exp_avg", "state1")):
        raise GradprobeError(f"{where}: Adam state without its second moment")
    return None


def check_layout(slots: list, owner: list[int | None], state: dict, names: list[str],
                  params: list[torch.nn.Parameter], source: str, how: str) -> None:
    """Counts and every shape, before any arithmetic; one line naming the first index and parameter that
    disagree (the usual cause: the state belongs to another adapter, of other rank or target modules)."""
    first = None
    for k, (index, _) in enumerate(slots):
        j = owner[k]
        if j is None:
            first = f"optimizer index {index} has no parameter"
            break
        st = entry(state.get(index))
        v = next((st[key] for key in SECOND_MOMENT_KEYS if key in st), None)
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


@dataclass
class MappedState:
    """An optimizer state_dict laid onto the trainable parameters (probe order)."""

    state_dict: dict[str, Any]
    owner: list[int]  # per optimizer slot (groups in order, their params in order): the parameter's position
    entries: list[dict[str, Any]]  # per parameter: its state, bitsandbytes' nested state lifted ({}: none yet)
    groups: list[dict[str, Any]]  # per parameter: its param group's settings (without 'params')
    how: str

    @property
    def slots(self) -> list[tuple[int, dict[str, Any]]]:
        return [(i, g) for g in self.state_dict["param_groups"] for i in g["params"]]


def map_state(state_dict: dict[str, Any], names: list[str], params: list[torch.Tensor],
              source: str = "optimizer state", no_decay: set[str] | None = None,
              order: str = "auto") -> MappedState:
    """Map a state_dict onto the trainable parameters: by name when the state carries names (optimizers
    built from named_parameters); order='index' when its indices are the positions in `params` (a live
    optimizer's live_state_dict); else by index: in the order the transformers Trainer built its parameter
    groups (decay, then no-decay) when the state looks Trainer-made (its group sizes match that split, or
    two groups with no weight decay in the second) or order='trainer'; else in named_parameters order.
    Every shape is checked; the first mismatch is named."""
    groups = state_dict["param_groups"]
    slots = [(i, g) for g in groups for i in g["params"]]
    saved_names = [n for g in groups for n in g.get("param_names", [])]
    if order == "index":
        owner: list[int | None] = [i if isinstance(i, int) and 0 <= i < len(params) else None for i, _ in slots]
        how = "the live optimizer's own parameters"
    elif saved_names and len(saved_names) == len(slots) and order != "trainer":
        by_name = {canonical_name(n): k for k, n in enumerate(saved_names)}
        missing = [n for n in names if canonical_name(n) not in by_name]
        if missing:
            raise GradprobeError(f"{source} has no entry named like trainable parameter '{missing[0]}'")
        positions = {by_name[canonical_name(n)]: j for j, n in enumerate(names)}
        owner = [positions.get(k) for k in range(len(slots))]
        how = "parameter names saved in the state"
    else:
        pos, how = resolve_order(groups, names, no_decay, order)
        owner = [pos[k] if k < len(pos) else None for k in range(len(slots))]
    state = state_dict["state"] if isinstance(state_dict["state"], dict) else {}
    check_layout(slots, owner, state, names, params, source, how)
    entries: list[dict[str, Any]] = [{} for _ in params]
    metas: list[dict[str, Any]] = [{} for _ in params]
    for k, (index, group) in enumerate(slots):
        entries[owner[k]] = entry(state.get(index))
        metas[owner[k]] = {key: v for key, v in group.items() if key not in ("params", "param_names")}
    return MappedState(state_dict, [int(j) for j in owner], entries, metas, how)


def live_state_dict(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """A live optimizer's state in state_dict form, indexed in the order of `params` (names need no guessing:
    the objects themselves say which state is whose). Parameters the optimizer does not hold get no index."""
    by_id = {id(p): (p, g) for g in optimizer.param_groups for p in g["params"]}
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    for k, p in enumerate(params):
        if id(p) not in by_id:
            continue
        _, g = by_id[id(p)]
        meta = {key: v for key, v in g.items() if key != "params"}
        if not groups or groups[-1]["_group"] is not g:
            groups.append({**meta, "params": [], "_group": g})
        groups[-1]["params"].append(k)
        if p in optimizer.state and optimizer.state[p]:
            state[k] = dict(optimizer.state[p])
    for g in groups:
        del g["_group"]
    return {"state": state, "param_groups": groups}

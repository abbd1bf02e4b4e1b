"""Point the probe at a training run: a checkpoint directory as the transformers Trainer writes it
(and trainers built on it, such as TRL's GRPOTrainer), or a PEFT adapter plus an optimizer state.

A Trainer checkpoint of a PEFT model holds
    adapter_config.json, adapter_model.safetensors | .bin   the LoRA adapter (and the base model's name)
    optimizer.pt        optimizer.state_dict(): Adam state keyed by integer index in param_groups order
    scheduler.pt        lr_scheduler.state_dict(): its _last_lr is the rate the optimizer holds now,
                        i.e. the rate the next step will use (the Trainer steps the scheduler after
                        every optimizer step)
    trainer_state.json  global_step and the log history
load_checkpoint turns these into ordinary config keys (model.name_or_path, lora.adapter_path,
probe.precondition, probe.optimizer_state, probe.learning_rate), so every command uses a checkpoint
the same way and the JSON output records exactly what was probed. Every file is read with
torch.load(weights_only=True) or as JSON/safetensors: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import GradprobeError
from .files import load_torch_file
from .optim.lr import next_learning_rate
from .optim.state import load_state_dict

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class CheckpointInfo:
    """What was read from the run, for the report: files, step, and where the learning rate came from."""

    path: str | None
    adapter: str | None
    base_model: str | None
    base_model_source: str
    lora_r: int | None
    lora_target_modules: list[str] | str | None
    optimizer_state: str
    scheduler: str | None
    global_step: int | None
    adam_step: int | None
    learning_rate: float | None
    learning_rate_source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise GradprobeError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise GradprobeError(f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(data, dict):
        raise GradprobeError(f"{path}: expected a JSON object")
    return data


def _check_adapter_weights(directory: Path) -> Path:
    """The adapter's weights exist and are complete (a truncated file fails here, before any model load)."""
    found = [directory / n for n in ADAPTER_WEIGHTS if (directory / n).is_file()]
    if not found:
        raise GradprobeError(f"no adapter weights in {directory} (expected {' or '.join(ADAPTER_WEIGHTS)})")
    path = found[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if not list(f.keys()):
                    raise GradprobeError(f"{path} holds no tensors")
        else:
            load_torch_file(path, "adapter weights")
    except GradprobeError:
        raise
    except Exception as exc:  # safetensors and torch raise their own types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradprobeError(f"cannot read adapter weights {path} (truncated or damaged?): {first}") from exc
    return path


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def load_checkpoint(directory: str | Path | None, cfg: dict[str, Any],
                    optimizer_state: str | Path | None = None) -> tuple[dict[str, Any], CheckpointInfo]:
    """Config keys for probing the step a run is about to take, and a record of where each came from.

    `directory`: a Trainer checkpoint, or a PEFT adapter directory (then `optimizer_state` names the
    optimizer's state_dict file). With directory None, only the optimizer state (and the scheduler
    next to it) is applied. Keys the user set explicitly (model.name_or_path, lora.adapter_path,
    probe.learning_rate) win over the checkpoint's and are noted.
    """
    out = copy.deepcopy(cfg)
    notes: list[str] = []
    d = Path(directory).expanduser() if directory is not None else None
    adapter_cfg: dict[str, Any] = {}
    if d is not None:
        if not d.is_dir():
            raise GradprobeError(f"checkpoint directory not found: {d}")
        if not (d / "adapter_config.json").is_file():
            raise GradprobeError(f"no adapter_config.json in {d}: --checkpoint wants a Trainer checkpoint or a "
                                 f"PEFT adapter directory")
        adapter_cfg = _read_json(d / "adapter_config.json")
        _check_adapter_weights(d)

    # The optimizer state: given explicitly, else the checkpoint's optimizer.pt.
    if optimizer_state is not None:
        opt_path = Path(optimizer_state).expanduser()
    elif d is not None and (d / "optimizer.pt").is_file():
        opt_path = d / "optimizer.pt"
    else:
        raise GradprobeError(f"no optimizer.pt in {d}: pass --optimizer-state FILE, or probe the adapter alone with "
                             f"--set lora.adapter_path={d} (identity preconditioner)")
    state = load_state_dict(opt_path)
    steps = {int(float(st["step"])) for st in state["state"].values() if isinstance(st, dict) and "step" in st}
    adam_step = max(steps) if steps else None
    if len(steps) > 1:
        notes.append(f"the optimizer's parameters have different step counts {sorted(steps)}")

    # The learning rate of the next step: the scheduler's _last_lr, checked against the optimizer's groups.
    rate, rate_source, rate_notes = next_learning_rate(cfg["probe"]["learning_rate"], state, opt_path)
    notes.extend(rate_notes)

    global_step = None
    state_json = (d or opt_path.parent) / "trainer_state.json"
    if state_json.is_file():
        global_step = _read_json(state_json).get("global_step")
        if adam_step is not None and isinstance(global_step, int) and global_step != adam_step:
            notes.append(f"trainer_state.json says global_step {global_step} but the Adam state has step {adam_step}")

    # Base model: the adapter's record unless the user named one.
    base = adapter_cfg.get("base_model_name_or_path")
    if out["model"]["name_or_path"] is not None:
        base_source = "model.name_or_path"
        if base and base != out["model"]["name_or_path"]:
            notes.append(f"base model {out['model']['name_or_path']} from the config; the adapter was trained "
                         f"on {base}")
    elif d is not None:
        if not base:
            raise GradprobeError(f"{d / 'adapter_config.json'} names no base model; set model.name_or_path")
        if _looks_local(base) and not Path(base).expanduser().exists():
            raise GradprobeError(f"the base model {base} named by {d / 'adapter_config.json'} was not found; "
                                 f"set model.name_or_path to where it is now")
        out["model"]["name_or_path"] = base
        base_source = "adapter_config.json"
    else:
        base_source = "config"

    if d is not None:
        if out["lora"]["adapter_path"] is None:
            out["lora"]["adapter_path"] = str(d)
        elif Path(out["lora"]["adapter_path"]).expanduser().resolve() != d.resolve():
            notes.append(f"adapter from lora.adapter_path {out['lora']['adapter_path']}, optimizer state from {d}")
    out["probe"]["precondition"] = "adam"
    out["probe"]["optimizer_state"] = str(opt_path)
    out["probe"]["learning_rate"] = rate
    info = CheckpointInfo(
        path=str(d) if d is not None else None, adapter=out["lora"]["adapter_path"],
        base_model=out["model"]["name_or_path"], base_model_source=base_source,
        lora_r=adapter_cfg.get("r"), lora_target_modules=adapter_cfg.get("target_modules"),
        optimizer_state=str(opt_path), scheduler=rate_source.split(" (")[0] if "scheduler.pt" in rate_source else None,
        global_step=global_step, adam_step=adam_step, learning_rate=out["probe"]["learning_rate"],
        learning_rate_source=rate_source, notes=notes)
    return out, info

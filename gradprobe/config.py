"""One validated configuration: built-in defaults <- YAML file <- `key=value` overrides.

Every key is checked up front so that a typo fails in a second, not after a model load.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import GradprobeError
from .objective import LEGACY_NORMALIZATION, LOSS_TYPES, SCALE_REWARDS
from .probe.schedules import NAMES as SCHEDULE_NAMES

# The embedded default: the seed's environment on a tiny model (configs/tiny.yaml mirrors it).
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "model": {
        "name_or_path": None,
        "preset": "tiny",
        "trust_remote_code": False,
    },
    "quant": {"mode": "nf4", "compute_dtype": "bfloat16"},
    "lora": {
        "adapter_path": None,
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "init": "random",
        "dtype": "float32",
    },
    "autocast": "bf16",
    "checkpointing": "reentrant",
    "batch": {
        "rollouts": None,
        "num_prompts": 8,
        "group_size": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 16,
        "reward": "builtin",
        "entropy_rollouts": None,
    },
    "probe": {
        "mode": "exact",
        "schedule": "packed",
        "microbatch_size": 8,
        "block_size": 2,
        "accumulate_on": "device",
        "bank": "auto",
        "loss_type": "group_lmax",
        "normalization": "dr_grpo",  # the older key: kept in step with loss_type where it has a name for it
        "scale_rewards": "none",
        "max_completion_length": None,
        "max_grad_norm": None,
        "precondition": "identity",
        "optimizer_state": None,
        "optimizer_order": "auto",
        "learning_rate": None,
        "entropy_batch": "same",
        "warmup_steps": None,
    },
    "validate": {
        "method": "auto",
        "points": 7,
        "step_min": 1.0e-5,
        "step_max": 1.0e-2,
        "eval_num_prompts": 32,
        "eval_group_size": 8,
        "is_samples": 256,
        "max_enumerate": 20000,
        "direction": "real",
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "model.preset": ("tiny", "micro", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"),
    "quant.mode": ("none", "nf4", "fp4"),
    "quant.compute_dtype": ("bfloat16", "float16", "float32"),
    "lora.init": ("random", "zero_b"),
    "lora.dtype": ("float32", "bfloat16", "float16"),
    "autocast": ("bf16", "fp16", "off"),
    "checkpointing": ("reentrant", "non_reentrant", "off"),
    "probe.mode": ("exact", "blocks"),
    "probe.schedule": SCHEDULE_NAMES,
    "probe.accumulate_on": ("device", "cpu"),
    "probe.bank": ("auto", "device", "host", "none"),
    "probe.loss_type": LOSS_TYPES,
    "probe.normalization": tuple(LEGACY_NORMALIZATION),
    "probe.scale_rewards": SCALE_REWARDS,
    "probe.precondition": ("adam", "identity"),
    "probe.optimizer_order": ("auto", "trainer", "named"),
    "probe.entropy_batch": ("same", "independent"),
    "validate.method": ("auto", "exact", "importance"),
    "validate.direction": ("real", "plain"),
}

# Keys whose default is None: the type a value must have when one is given.
OPTIONAL_TYPES: dict[str, type] = {
    "model.name_or_path": str,
    "lora.adapter_path": str,
    "batch.rollouts": str,
    "probe.optimizer_state": str,
    "probe.learning_rate": float,
    "batch.entropy_rollouts": str,
    "probe.warmup_steps": int,
    "probe.max_completion_length": int,
    "probe.max_grad_norm": float,
}

POSITIVE_INTS = ("lora.r", "batch.num_prompts", "batch.group_size", "batch.max_new_tokens",
                 "probe.microbatch_size", "probe.block_size")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


VALID_KEYS = tuple(flatten(DEFAULTS))
SECTIONS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, dict))


def _unknown(key: str) -> GradprobeError:
    near = difflib.get_close_matches(key, VALID_KEYS + SECTIONS, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return GradprobeError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any) -> Any:
    """Bring a YAML or command-line value to the type of the key's default."""
    default = flatten(DEFAULTS)[key]
    want = OPTIONAL_TYPES.get(key) or type(default)
    if value is None:
        if key in OPTIONAL_TYPES:
            return None
        raise GradprobeError(f"config key '{key}' cannot be null")
    if want is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
    elif want is int and not isinstance(value, bool):
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError):
            pass
    elif want is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif want is str and isinstance(value, bool):  # YAML 1.1 reads `off` and `on` as booleans
        return "on" if value else "off"
    elif want is str and isinstance(value, (str, int, float)):
        return str(value)
    elif want is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise GradprobeError(f"config key '{key}' wants {want.__name__}, got {value!r}")


def _check(flat: dict[str, Any]) -> None:
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise GradprobeError(f"config key '{key}' must be one of {', '.join(allowed)}; got {flat[key]!r}")
    if flat["batch.group_size"] < 2:
        raise GradprobeError(f"batch.group_size (G) must be >= 2: the leave-one-out baseline needs two responses; "
                             f"got {flat['batch.group_size']}")
    for key in POSITIVE_INTS:
        if flat[key] < 1:
            raise GradprobeError(f"config key '{key}' must be >= 1; got {flat[key]}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise GradprobeError(f"config key '{key}' must be a finite number; got {value}")
    units = -(-flat["batch.num_prompts"] // (flat["probe.block_size"] if flat["probe.mode"] == "blocks" else 1))
    if not flat["batch.rollouts"] and units < 2:
        raise GradprobeError(f"the U-statistic needs at least 2 units; batch.num_prompts={flat['batch.num_prompts']} "
                             f"gives {units} in {flat['probe.mode']} mode")
    if not flat["lora.dropout"] >= 0.0 or flat["lora.dropout"] >= 1.0:
        raise GradprobeError(f"lora.dropout must be in [0, 1); got {flat['lora.dropout']}")
    if not flat["batch.temperature"] > 0:
        raise GradprobeError(f"batch.temperature must be > 0; got {flat['batch.temperature']}")
    if not 0 < flat["batch.top_p"] <= 1:
        raise GradprobeError(f"batch.top_p must be in (0, 1]; got {flat['batch.top_p']}")
    reward = flat["batch.reward"]
    if reward != "builtin" and not (reward.count(":") >= 1 and all(reward.rsplit(":", 1))):
        raise GradprobeError(f"batch.reward must be 'builtin' or 'module:function'; got {reward!r}")
    warm = flat["probe.warmup_steps"]
    if warm is not None and warm < 0:
        raise GradprobeError(f"probe.warmup_steps must be >= 0 (or null: automatic); got {warm}")
    if warm and flat["probe.optimizer_state"]:
        raise GradprobeError("probe.warmup_steps trains a fresh AdamW, but probe.optimizer_state gives the run's own: "
                             "set one of them")
    if flat["batch.entropy_rollouts"] and flat["probe.entropy_batch"] != "independent":
        raise GradprobeError("batch.entropy_rollouts is the independent entropy batch: set "
                             "probe.entropy_batch=independent with it")
    lr = flat["probe.learning_rate"]
    if lr is not None and not lr > 0:
        raise GradprobeError(f"probe.learning_rate must be > 0; got {lr}")
    clip = flat["probe.max_grad_norm"]
    if clip is not None and not (clip > 0 and clip != float("inf")):
        raise GradprobeError(f"probe.max_grad_norm must be > 0 (null: no clipping); got {clip}")
    length = flat["probe.max_completion_length"]
    if length is not None and length < 1:
        raise GradprobeError(f"probe.max_completion_length must be >= 1; got {length}")
    if flat["probe.loss_type"] == "dr_grpo" and length is None:
        raise GradprobeError("probe.loss_type=dr_grpo (TRL's) divides by a constant: set "
                             "probe.max_completion_length to the run's (the group's longest response is group_lmax)")


def check_config(tree: dict[str, Any]) -> None:
    """Validate a whole configuration (one a checkpoint changed, too)."""
    _check(flatten(tree))


def legacy_normalization(loss_type: str, current: str) -> str:
    """probe.normalization kept in step with probe.loss_type where the older key has a name for it."""
    return next((k for k, v in LEGACY_NORMALIZATION.items() if v == loss_type), current)


def _resolve_loss_type(tree: dict[str, Any], given: set[str]) -> None:
    """probe.loss_type, or the older probe.normalization it replaces (its dr_grpo is group_lmax): the one
    that was given sets the other; both given must agree."""
    probe = tree["probe"]
    norm, loss = probe["normalization"], probe["loss_type"]
    if norm not in LEGACY_NORMALIZATION or loss not in LOSS_TYPES:
        return  # _check names the bad value
    legacy = LEGACY_NORMALIZATION[norm]
    if "probe.normalization" in given and "probe.loss_type" in given and loss != legacy:
        raise GradprobeError(f"probe.normalization={norm} (the older key; it means loss_type {legacy}) contradicts "
                             f"probe.loss_type={loss}; set only probe.loss_type")
    if "probe.normalization" in given and "probe.loss_type" not in given:
        probe["loss_type"] = legacy
    else:
        probe["normalization"] = legacy_normalization(loss, norm)


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b] = value for the dotted key a.b."""
    *head, leaf = key.split(".")
    for part in head:
        tree = tree[part]
    tree[leaf] = value


def _merge_file(tree: dict[str, Any], data: Any, source: str) -> set[str]:
    """Merges the file's keys into the tree; returns the keys it set."""
    if data is None:
        return set()
    if not isinstance(data, dict):
        raise GradprobeError(f"{source}: the top level must be a mapping of config keys")
    for key, value in flatten(data).items():
        if key in SECTIONS:
            raise GradprobeError(f"{source}: '{key}' is a section; give its keys as a mapping")
        if key not in VALID_KEYS:
            raise _unknown(key)
        set_key(tree, key, _coerce(key, value))
    return set(flatten(data))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise GradprobeError(f"--set wants key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in VALID_KEYS:
        raise _unknown(key)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key, value


def config_from_dict(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A whole configuration as a result file stored it (--resume), validated like a YAML file."""
    tree = copy.deepcopy(DEFAULTS)
    _merge_file(tree, data, source)
    _check(flatten(tree))
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                seed: int | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then each override; validated as a whole."""
    tree = copy.deepcopy(DEFAULTS)
    given: set[str] = set()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GradprobeError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise GradprobeError(f"{p}: not valid YAML{where}") from exc
        given |= _merge_file(tree, data, str(p))
    for text in overrides:
        key, value = parse_override(text)
        set_key(tree, key, _coerce(key, value))
        given.add(key)
    if seed is not None:
        tree["seed"] = seed
    _resolve_loss_type(tree, given)
    _check(flatten(tree))
    return tree

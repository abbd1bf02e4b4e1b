"""One validated configuration: built-in defaults <- YAML file <- `key=value` overrides.

Each section is a frozen dataclass, and each key is declared once, with its type, default and allowed values.
A Config is checked whole when it is made, so that a typo fails in a second, not after a model load, and a
changed copy (`Config.with_values`) is checked again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import GradprobeError
from .objective import LEGACY_NORMALIZATION, LOSS_TYPES, SCALE_REWARDS
from .probe.schedules import NAMES as SCHEDULE_NAMES

PRESETS = ("tiny", "micro", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def key(default: Any, choices: tuple[str, ...] = (), positive: bool = False) -> Any:
    """A config key with its allowed values (or >= 1 for a count)."""
    return field(default=default, metadata={"choices": choices, "positive": positive})


@dataclass(frozen=True)
class ModelSection:
    name_or_path: str | None = None
    preset: str = key("tiny", PRESETS)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class QuantSection:
    mode: str = key("nf4", ("none", "nf4", "fp4"))
    compute_dtype: str = key("bfloat16", ("bfloat16", "float16", "float32"))
    double_quant: bool = False  # bitsandbytes' bnb_4bit_use_double_quant (the absmax scales quantised too)


@dataclass(frozen=True)
class LoraSection:
    adapter_path: str | None = None
    r: int = key(8, positive=True)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    init: str = key("random", ("random", "zero_b"))
    dtype: str = key("float32", ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class BatchSection:
    rollouts: str | None = None
    num_prompts: int = key(8, positive=True)
    group_size: int = key(4, positive=True)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = key(16, positive=True)
    reward: str = "builtin"
    entropy_rollouts: str | None = None


@dataclass(frozen=True)
class ProbeSection:
    """What the probe engine and its schedules read."""

    mode: str = key("exact", ("exact", "blocks"))
    schedule: str = key("packed", SCHEDULE_NAMES)
    microbatch_size: int = key(8, positive=True)
    block_size: int = key(2, positive=True)
    accumulate_on: str = key("device", ("device", "cpu"))
    bank: str = key("auto", ("auto", "device", "host", "none"))
    loss_type: str = key("group_lmax", LOSS_TYPES)
    normalization: str = key("dr_grpo", tuple(LEGACY_NORMALIZATION))  # the older key, kept in step with loss_type
    scale_rewards: str = key("none", SCALE_REWARDS)
    max_completion_length: int | None = None
    max_grad_norm: float | None = None
    # TRL's pass (docs/objective.md): passes over each batch, the ratio's clip range, two-sided clip, KL weight
    num_iterations: int = key(1, positive=True)
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    kl_bias_correction: bool = True
    precondition: str = key("identity", ("adam", "identity"))
    optimizer_state: str | None = None
    optimizer_order: str = key("auto", ("auto", "trainer", "named"))
    learning_rate: float | None = None
    entropy_batch: str = key("same", ("same", "independent"))
    warmup_steps: int | None = None


@dataclass(frozen=True)
class ValidateSection:
    method: str = key("auto", ("auto", "exact", "importance"))
    points: int = 7
    step_min: float = 1.0e-5
    step_max: float = 1.0e-2
    eval_num_prompts: int = 32
    eval_group_size: int = 8
    is_samples: int = 256
    max_enumerate: int = 20000
    direction: str = key("real", ("real", "plain"))


@dataclass(frozen=True)
class Config:
    """The embedded default is the seed's environment on a tiny model (configs/tiny.yaml mirrors it)."""

    seed: int = 0
    device: str = key("auto", ("auto", "cpu", "cuda"))
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    autocast: str = key("bf16", ("bf16", "fp16", "off"))
    checkpointing: str = key("reentrant", ("reentrant", "non_reentrant", "off"))
    batch: BatchSection = field(default_factory=BatchSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    validate: ValidateSection = field(default_factory=ValidateSection)

    def __post_init__(self) -> None:
        _check(self.flat())

    def flat(self) -> dict[str, Any]:
        """{dotted key: value}."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k.name}": getattr(value, k.name) for k in dataclasses.fields(value)})
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data, as a YAML file or a result's "config" holds it."""
        return _plain(dataclasses.asdict(self))

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A copy with dotted keys changed (coerced to each key's type), validated whole. probe.normalization
        follows a changed probe.loss_type and the other way round, as in a file."""
        flat = self.flat()
        for k, value in values.items():
            flat[k] = coerce(k, value)
        _resolve_loss_type(flat, set(values))
        return _build(flat)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Config:
        """A whole configuration as a result file stored it (--resume), validated like a YAML file."""
        return _build({**cls().flat(), **_file_values(data, source)})


SECTION_TYPES: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)
                                  if f.default_factory is not dataclasses.MISSING}


@dataclass(frozen=True)
class KeySpec:
    """One key as its dataclass field declares it."""

    default: Any
    type: type  # str, int, float, bool or tuple (a list of strings)
    optional: bool  # may be null
    choices: tuple[str, ...]
    positive: bool


def _specs(cls: type = Config, prefix: str = "") -> dict[str, KeySpec]:
    """{dotted key: spec} in the order Config.flat() gives."""
    out: dict[str, KeySpec] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in SECTION_TYPES and cls is Config:
            out.update(_specs(SECTION_TYPES[f.name], f"{f.name}."))
            continue
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hints[f.name]
        out[prefix + f.name] = KeySpec(f.default, typing.get_origin(base) or base, optional,
                                       f.metadata.get("choices", ()), f.metadata.get("positive", False))
    return out


SPECS = _specs()
VALID_KEYS = tuple(SPECS)
SECTIONS = tuple(SECTION_TYPES)
CHOICES: dict[str, tuple[str, ...]] = {k: s.choices for k, s in SPECS.items() if s.choices}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def _build(flat: dict[str, Any]) -> Config:
    """A Config from {dotted key: value} holding every key."""
    sections = {name: cls(**{k.name: flat[f"{name}.{k.name}"] for k in dataclasses.fields(cls)})
                for name, cls in SECTION_TYPES.items()}
    return Config(**{k: v for k, v in flat.items() if "." not in k}, **sections)


def _unknown(name: str) -> GradprobeError:
    near = difflib.get_close_matches(name, VALID_KEYS + SECTIONS, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return GradprobeError(f"unknown config key '{name}'{hint}")


def coerce(name: str, value: Any) -> Any:
    """Bring a YAML or command-line value to the key's type."""
    spec = SPECS.get(name)
    if spec is None:
        raise _unknown(name)
    want = spec.type
    if value is None:
        if spec.optional:
            return None
        raise GradprobeError(f"config key '{name}' cannot be null")
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
        except (TypeError, ValueError, OverflowError):
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
    elif want is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise GradprobeError(f"config key '{name}' wants {'list' if want is tuple else want.__name__}, got {value!r}")


def _check_types(flat: dict[str, Any]) -> None:
    """A Config made in code (not through coerce) holds each key's type too."""
    for name, value in flat.items():
        spec = SPECS[name]
        if value is None and spec.optional:
            continue
        ok = isinstance(value, spec.type) and not (spec.type is int and isinstance(value, bool))
        if spec.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if spec.type is tuple:
            ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        if not ok:
            want = "list" if spec.type is tuple else spec.type.__name__
            raise GradprobeError(f"config key '{name}' wants {want}{' or null' if spec.optional else ''}, "
                                 f"got {value!r}")


def _check(flat: dict[str, Any]) -> None:
    _check_types(flat)
    for name, allowed in CHOICES.items():
        if flat[name] not in allowed:
            raise GradprobeError(f"config key '{name}' must be one of {', '.join(allowed)}; got {flat[name]!r}")
    if flat["batch.group_size"] < 2:
        raise GradprobeError(f"batch.group_size (G) must be >= 2: the leave-one-out baseline needs two responses; "
                             f"got {flat['batch.group_size']}")
    for name, spec in SPECS.items():
        if spec.positive and flat[name] < 1:
            raise GradprobeError(f"config key '{name}' must be >= 1; got {flat[name]}")
    for name, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise GradprobeError(f"config key '{name}' must be a finite number; got {value}")
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
        raise GradprobeError("probe.warmup_steps trains a fresh AdamW, but probe.optimizer_state (or --checkpoint) "
                             "gives the run's own: set one of them")
    if flat["batch.entropy_rollouts"] and flat["probe.entropy_batch"] != "independent":
        raise GradprobeError("batch.entropy_rollouts is the independent entropy batch: set "
                             "probe.entropy_batch=independent with it")
    lr = flat["probe.learning_rate"]
    if lr is not None and not lr > 0:
        raise GradprobeError(f"probe.learning_rate must be > 0; got {lr}")
    clip = flat["probe.max_grad_norm"]
    if clip is not None and not (clip > 0 and clip != float("inf")):
        raise GradprobeError(f"probe.max_grad_norm must be > 0 (null: no clipping); got {clip}")
    eps, eps_high, delta = flat["probe.epsilon"], flat["probe.epsilon_high"], flat["probe.delta"]
    if not 0 <= eps < 1 or (eps_high is not None and not eps_high >= 0):
        raise GradprobeError(f"probe.epsilon must be in [0, 1) and probe.epsilon_high >= 0 (null: epsilon); got "
                             f"{eps}, {eps_high}")
    if delta is not None and not delta > 1:
        raise GradprobeError(f"probe.delta (TRL's two-sided clip of the ratio) must be > 1 (null: off); got {delta}")
    if not flat["probe.beta"] >= 0:
        raise GradprobeError(f"probe.beta (the KL term's weight) must be >= 0; got {flat['probe.beta']}")
    length = flat["probe.max_completion_length"]
    if length is not None and length < 1:
        raise GradprobeError(f"probe.max_completion_length must be >= 1; got {length}")
    if flat["probe.loss_type"] == "dr_grpo" and length is None:
        raise GradprobeError("probe.loss_type=dr_grpo (TRL's) divides by a constant: set "
                             "probe.max_completion_length to the run's (the group's longest response is group_lmax)")


def _resolve_loss_type(flat: dict[str, Any], given: set[str]) -> None:
    """probe.loss_type, or the older probe.normalization it replaces (its dr_grpo is group_lmax): the one
    that was given sets the other; both given must agree."""
    norm, loss = flat["probe.normalization"], flat["probe.loss_type"]
    if norm not in LEGACY_NORMALIZATION or loss not in LOSS_TYPES:
        return  # _check names the bad value
    legacy = LEGACY_NORMALIZATION[norm]
    if "probe.normalization" in given and "probe.loss_type" in given and loss != legacy:
        raise GradprobeError(f"probe.normalization={norm} (the older key; it means loss_type {legacy}) contradicts "
                             f"probe.loss_type={loss}; set only probe.loss_type")
    if "probe.normalization" in given and "probe.loss_type" not in given:
        flat["probe.loss_type"] = legacy
    else:  # kept in step where the older key has a name for the loss type
        flat["probe.normalization"] = next((k for k, v in LEGACY_NORMALIZATION.items() if v == loss), norm)


def _file_values(data: Any, source: str) -> dict[str, Any]:
    """A YAML mapping (or a stored config) as {dotted key: coerced value}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradprobeError(f"{source}: the top level must be a mapping of config keys")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            if name not in SECTIONS:
                raise _unknown(name)
            out.update({f"{name}.{k}": v for k, v in value.items()})
        elif name in SECTIONS:
            raise GradprobeError(f"{source}: '{name}' is a section; give its keys as a mapping")
        else:
            out[name] = value
    return {name: coerce(name, value) for name, value in out.items()}


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise GradprobeError(f"--set wants key=value, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name not in VALID_KEYS:
        raise _unknown(name)
    value = yaml.safe_load(raw) if raw.strip() else None
    return name, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise GradprobeError(f"{self.name}: line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                                     f"(first on line {seen[key]}); YAML would keep the last one silently")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: Path) -> Any:
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or type(exc).__name__)
        raise GradprobeError(f"cannot read config file {p}: {why}") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise GradprobeError(f"{p}: not valid YAML{where}") from exc
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                seed: int | None = None) -> Config:
    """Defaults, then the YAML file, then each override; validated as a whole."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise GradprobeError(f"config file {p} is a directory; give a YAML file")
        if not p.is_file():
            raise GradprobeError(f"config file not found: {p}")
        values.update(_file_values(_read_yaml(p), str(p)))
    for text in overrides:
        name, value = parse_override(text)
        values[name] = value
    if seed is not None:
        values["seed"] = seed
    return Config().with_values(values)

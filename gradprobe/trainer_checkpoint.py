"""Point the probe at a training run: a checkpoint directory as the transformers Trainer writes it
(and trainers built on it, such as TRL's GRPOTrainer), or a PEFT adapter plus an optimizer state.

A Trainer checkpoint of a PEFT model holds
    adapter_config.json, adapter_model.safetensors | .bin   the LoRA adapter (and the base model's name)
    optimizer.pt        optimizer.state_dict(): Adam state keyed by integer index in param_groups order
    scheduler.pt        lr_scheduler.state_dict(): its _last_lr is the rate the optimizer holds now,
                        i.e. the rate the next step will use (the Trainer steps the scheduler after
                        every optimizer step)
    trainer_state.json  global_step and the log history
    training_args.bin   torch.save(TrainingArguments), or of a subclass such as TRL's GRPOConfig: the loss
                        (loss_type, scale_rewards, num_generations, temperature, max_completion_length;
                        the pass: num_iterations, epsilon, epsilon_high, delta, beta, use_bias_correction_kl),
                        max_grad_norm, bf16/fp16 and activation checkpointing
load_checkpoint turns these into ordinary config keys (model.name_or_path, lora.adapter_path,
probe.precondition, probe.optimizer_state, probe.learning_rate, and RUN_SETTINGS), so every command uses a
checkpoint the same way and the JSON output records exactly what was probed and where each setting came
from. Every file is read with torch.load(weights_only=True) or as JSON/safetensors: nothing in a checkpoint
can run code. training_args.bin names config classes and enums; each allowed name loads as a stand-in of
ours (_Stored) that keeps the pickled values and runs no code of the class, and any other name refuses the
file (a note; the settings then stay the config's, marked assumed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import CHOICES, Config
from .errors import GradprobeError
from .files import load_torch_file
from .objective import LOSS_TYPES
from .optim.lr import next_learning_rate
from .optim.state import load_state_dict
from .run_model import QUANT_KEYS, UNRECORDED_WHY, quant_settings

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
    training_args: str | None = None  # the config class read from training_args.bin
    # config key -> {"value", "source"}: "read: <file> (<field>)", "given: --set ...", "assumed: ..."
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "assumed_stack": self.assumed_stack()}

    def assumed_stack(self) -> dict[str, Any]:
        """The stack settings no file of the run gave (key -> the value probed): what the headline must say."""
        return {k: e["value"] for k, e in self.settings.items()
                if k in STACK_KEYS and e["source"].startswith("assumed")}

    def source(self, key: str) -> str | None:
        entry = self.settings.get(key)
        return entry["source"] if entry else None


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


# The globals a training_args.bin of transformers' Trainer or TRL's GRPOTrainer holds: its config class,
# the enums and helper objects among its fields. Nothing else is loaded.
TRAINING_ARGS_CLASSES = {
    "transformers.training_args.TrainingArguments": "TrainingArguments",
    "trl.trainer.grpo_config.GRPOConfig": "GRPOConfig",
}
TRAINING_ARGS_GLOBALS = (
    *TRAINING_ARGS_CLASSES,
    "transformers.trainer_utils.SchedulerType", "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy", "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.FSDPOption", "transformers.debug_utils.DebugOption",
    "transformers.training_args.OptimizerNames", "transformers.trainer_pt_utils.AcceleratorConfig",
    "accelerate.state.PartialState", "accelerate.utils.dataclasses.DistributedType",
    # model_init_kwargs' quantization_config (TRL's scripts put a BitsAndBytesConfig there)
    "transformers.utils.quantization_config.BitsAndBytesConfig",
    "transformers.utils.quantization_config.QuantizationMethod",
)
TRAINING_ARGS = "training_args.bin"


class _Stored:
    """Stands in for one allowed class while training_args.bin is unpickled: keeps the constructor's
    arguments (an enum member's value) or the pickled state (a config's fields); runs no code of the class."""

    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


STAND_INS: dict[str, type] = {name: type(name.rsplit(".", 1)[1], (_Stored,), {"qualname": name})
                              for name in TRAINING_ARGS_GLOBALS}


def _plain(value: Any) -> Any:
    """The stand-ins as plain values: an enum member as its value, an object as the dict of its state."""
    if isinstance(value, _Stored):
        if value.state is None:
            return _plain(value.args[0]) if len(value.args) == 1 else None
        return _plain(value.state) if isinstance(value.state, dict) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_training_args(directory: Path) -> tuple[str | None, dict[str, Any], list[str]]:
    """(config class, its fields as plain values, notes) of the checkpoint's training_args.bin; (None, {}, notes)
    when it is missing or cannot be read safely."""
    path = directory / TRAINING_ARGS
    if not path.is_file():
        return None, {}, [f"no {TRAINING_ARGS} in {directory}: the run's loss and stack settings are the config's "
                          f"(assumed)"]
    try:
        obj = load_torch_file(path, "training arguments", allow=STAND_INS)
    except GradprobeError as exc:
        return None, {}, [f"{exc}; the run's loss and stack settings are the config's (assumed), none read from "
                          f"it: give the run's with --set"]
    name = getattr(type(obj), "qualname", None)
    if name not in TRAINING_ARGS_CLASSES or not isinstance(obj.state, dict):
        what = name or type(obj).__name__
        return None, {}, [f"{path} holds a {what}, not TrainingArguments or GRPOConfig: the run's loss and stack "
                          f"settings are the config's (assumed)"]
    return TRAINING_ARGS_CLASSES[name], _plain(obj.state), []


def _checkpointing(args: dict[str, Any]) -> tuple[str, str, bool]:
    """(checkpointing mode, the fields it came from, whether it is certain). transformers 5 renamed
    gradient_checkpointing to activation_checkpointing; unset use_reentrant means non-reentrant there
    (PreTrainedModel._activation_checkpointing_enable) and in TRL on older versions (GRPOTrainer sets it
    False), but reentrant in a plain Trainer of transformers 4."""
    new = "activation_checkpointing" in args
    on_key = "activation_checkpointing" if new else "gradient_checkpointing"
    kw_key = f"{on_key}_kwargs"
    if not args.get(on_key):
        return "off", on_key, True
    kwargs = args.get(kw_key) or {}
    if isinstance(kwargs, dict) and kwargs.get("use_reentrant") is not None:
        return ("reentrant" if kwargs["use_reentrant"] else "non_reentrant"), f"{on_key}, {kw_key}", True
    return "non_reentrant", f"{on_key}, {kw_key} without use_reentrant", new


def run_settings(cls: str, args: dict[str, Any]) -> tuple[dict[str, tuple[Any, str, bool]], list[str]]:
    """Config key -> (value, the fields it came from, certain) from a training_args.bin's fields, and notes
    on what the probe does not model."""
    out: dict[str, tuple[Any, str, bool]] = {}
    notes: list[str] = []
    clip = args.get("max_grad_norm")
    out["probe.max_grad_norm"] = (float(clip) if isinstance(clip, (int, float)) and clip > 0 else None,
                                  "max_grad_norm", True)
    bf16, fp16 = bool(args.get("bf16")), bool(args.get("fp16"))
    out["autocast"] = ("bf16" if bf16 else "fp16" if fp16 else "off", "bf16, fp16", True)
    mode, fields, certain = _checkpointing(args)
    out["checkpointing"] = (mode, fields, certain)
    if cls != "GRPOConfig":
        return out, notes
    loss = args.get("loss_type")
    if loss in LOSS_TYPES:
        out["probe.loss_type"] = (loss, "loss_type", True)
    else:
        notes.append(f"the run's loss_type {loss!r} has no model in gradprobe ({', '.join(LOSS_TYPES[2:])} do): "
                     f"the probe uses probe.loss_type")
    scale = args.get("scale_rewards")
    scale = {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale
    if scale in CHOICES["probe.scale_rewards"]:
        out["probe.scale_rewards"] = (scale, "scale_rewards", True)
    if isinstance(args.get("temperature"), (int, float)) and args["temperature"] > 0:
        out["batch.temperature"] = (float(args["temperature"]), "temperature", True)
    if isinstance(args.get("num_generations"), int) and args["num_generations"] >= 2:
        out["batch.group_size"] = (args["num_generations"], "num_generations", True)
    if isinstance(args.get("max_completion_length"), int) and args["max_completion_length"] > 0:
        out["probe.max_completion_length"] = (args["max_completion_length"], "max_completion_length", True)
    out.update(_pass_settings(args))
    unmodelled = {"top_entropy_quantile": lambda v: isinstance(v, (int, float)) and v < 1.0,
                  "mask_truncated_completions": bool,
                  "importance_sampling_level": lambda v: v not in (None, "token"),
                  "off_policy_mask_threshold": lambda v: v is not None,
                  "use_vllm": bool, "entropy_coef": lambda v: isinstance(v, (int, float)) and v != 0}
    notes += [f"the run sets {key}={args[key]}, which the probe's loss does not model"
              for key, differs in unmodelled.items() if differs(args.get(key))]
    steps = args.get("steps_per_generation")
    accumulation = args.get("gradient_accumulation_steps")
    if isinstance(steps, int) and isinstance(accumulation, int) and steps != accumulation:
        notes.append(f"the run splits each generation batch over {steps} optimizer steps (steps_per_generation) "
                     f"with {accumulation} accumulation steps: give the probe one optimizer step's batch")
    return out, notes


def _pass_settings(args: dict[str, Any]) -> dict[str, tuple[Any, str, bool]]:
    """TRL's pass (objective.PassSpec): num_iterations, the clip range, two-sided clip, the KL term."""
    out: dict[str, tuple[Any, str, bool]] = {}

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(args.get("num_iterations"), int) and args["num_iterations"] >= 1:
        out["probe.num_iterations"] = (args["num_iterations"], "num_iterations", True)
    if number(args.get("epsilon")):
        out["probe.epsilon"] = (float(args["epsilon"]), "epsilon", True)
    if "epsilon_high" in args and (args["epsilon_high"] is None or number(args["epsilon_high"])):
        high = args["epsilon_high"]
        out["probe.epsilon_high"] = (None if high is None else float(high), "epsilon_high", True)
    if "delta" in args and (args["delta"] is None or number(args["delta"])):
        out["probe.delta"] = (None if args["delta"] is None else float(args["delta"]), "delta", True)
    if number(args.get("beta")):
        out["probe.beta"] = (float(args["beta"]), "beta", True)
    if isinstance(args.get("use_bias_correction_kl"), bool):
        out["probe.kl_bias_correction"] = (args["use_bias_correction_kl"], "use_bias_correction_kl", True)
    return out


def _adapter_dtypes(path: Path) -> list[str]:
    """The dtypes the adapter's weights were saved in (those the run trained them in), sorted."""
    import torch

    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32",
             torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            found = {f.get_slice(k).get_dtype() for k in f.keys()}
    else:
        state = load_torch_file(path, "adapter weights")
        found = {v.dtype for v in state.values() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else set()
    return sorted({names.get(d, str(d)) for d in found})


def run_settings_of(cfg: Config, d: Path | None, adapter: Path | None, given: set[str], notes: list[str],
                    changes: dict[str, Any], base: str | None = None) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """RUN_SETTINGS from the checkpoint's training_args.bin, adapter weights and the records of how the base
    was loaded (run_model.py), put in `changes` except the keys the user gave (--set); returns the config
    class read and each key's value and source."""
    read: dict[str, tuple[Any, str]] = {}
    cls = None
    args: dict[str, Any] = {}
    if d is not None:
        cls, args, arg_notes = read_training_args(d)
        notes.extend(arg_notes)
        if cls is not None:
            settings, more = run_settings(cls, args)
            notes.extend(more)
            for key, (value, fields, certain) in settings.items():
                doubt = "" if certain else "; if transformers 4 wrote it, its plain Trainer was reentrant"
                read[key] = (value, f"{'read' if certain else 'assumed'}: {TRAINING_ARGS} ({cls} {fields}{doubt})")
    why = dict(UNRECORDED)
    if d is not None:
        quant, quant_notes = quant_settings(d, args, base)
        notes.extend(quant_notes)
        read.update(quant)
        if quant.get("quant.mode", (None,))[0] == "none":  # no 4-bit layers: their settings are unused, not unknown
            flat = cfg.flat()
            read.update({k: (flat[k], f"{quant['quant.mode'][1]}; unused without 4-bit layers")
                         for k in QUANT_KEYS if k not in quant})
    if adapter is not None:
        dtypes = _adapter_dtypes(adapter)
        if len(dtypes) == 1 and dtypes[0] in CHOICES["lora.dtype"]:
            read["lora.dtype"] = (dtypes[0], f"read: {adapter.name} (the dtype the run kept the adapter in)")
        else:
            why["lora.dtype"] = f"{adapter.name} holds {', '.join(dtypes) or 'no tensors'}; lora.dtype sets one for all"
    flat = cfg.flat()
    result: dict[str, dict[str, Any]] = {}
    for key in RUN_SETTINGS:
        if key in given:
            was = f"; the run used {read[key][0]}" if key in read and read[key][0] != flat[key] else ""
            result[key] = {"value": flat[key], "source": f"given: --set{was}"}
        elif key in read:
            changes[key] = read[key][0]
            result[key] = {"value": read[key][0], "source": read[key][1]}
        else:
            because = why.get(key, f"{TRAINING_ARGS} unread" if cls is None else f"not in {cls}")
            result[key] = {"value": flat[key], "source": f"assumed: the config's; {because}"}
    return cls, result


# The settings of the run a checkpoint can tell (training_args.bin, the adapter's dtype) or cannot (the base
# model's quantisation): each is reported with its source.
RUN_SETTINGS = ("probe.loss_type", "probe.scale_rewards", "batch.group_size", "batch.temperature",
                "probe.max_completion_length", "probe.max_grad_norm", "probe.num_iterations", "probe.epsilon",
                "probe.epsilon_high", "probe.delta", "probe.beta", "probe.kl_bias_correction", "autocast",
                "checkpointing", "lora.dtype", *QUANT_KEYS)
UNRECORDED = dict.fromkeys(QUANT_KEYS, UNRECORDED_WHY)
STACK_KEYS = (*QUANT_KEYS, "lora.dtype", "autocast", "checkpointing")  # what model is probed, not which loss


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def load_checkpoint(directory: str | Path | None, cfg: Config, optimizer_state: str | Path | None = None,
                    given: set[str] | frozenset[str] = frozenset()) -> tuple[Config, CheckpointInfo]:
    """Config keys for probing the step a run is about to take, and a record of where each came from.

    `directory`: a Trainer checkpoint, or a PEFT adapter directory (then `optimizer_state` names the
    optimizer's state_dict file). With directory None, only the optimizer state (and the scheduler
    next to it) is applied. Keys the user set explicitly (model.name_or_path, lora.adapter_path,
    probe.learning_rate) win over the checkpoint's and are noted; so do the RUN_SETTINGS keys in `given`
    (the user's --set keys).
    """
    changes: dict[str, Any] = {}
    notes: list[str] = []
    d = Path(directory).expanduser() if directory is not None else None
    adapter_cfg: dict[str, Any] = {}
    adapter_weights = None
    if d is not None:
        if not d.is_dir():
            raise GradprobeError(f"checkpoint directory not found: {d}")
        if not (d / "adapter_config.json").is_file():
            raise GradprobeError(f"no adapter_config.json in {d}: --checkpoint wants a Trainer checkpoint or a "
                                 f"PEFT adapter directory")
        adapter_cfg = _read_json(d / "adapter_config.json")
        adapter_weights = _check_adapter_weights(d)

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
    rate, rate_source, rate_notes = next_learning_rate(cfg.probe.learning_rate, state, opt_path)
    notes.extend(rate_notes)

    global_step = None
    state_json = (d or opt_path.parent) / "trainer_state.json"
    if state_json.is_file():
        global_step = _read_json(state_json).get("global_step")
        if adam_step is not None and isinstance(global_step, int) and global_step != adam_step:
            notes.append(f"trainer_state.json says global_step {global_step} but the Adam state has step {adam_step}")

    # Base model: the adapter's record unless the user named one.
    base = adapter_cfg.get("base_model_name_or_path")
    if cfg.model.name_or_path is not None:
        base_source = "model.name_or_path"
        if base and base != cfg.model.name_or_path:
            notes.append(f"base model {cfg.model.name_or_path} from the config; the adapter was trained "
                         f"on {base}")
    elif d is not None:
        if not base:
            raise GradprobeError(f"{d / 'adapter_config.json'} names no base model; set model.name_or_path")
        if _looks_local(base) and not Path(base).expanduser().exists():
            raise GradprobeError(f"the base model {base} named by {d / 'adapter_config.json'} was not found; "
                                 f"set model.name_or_path to where it is now")
        changes["model.name_or_path"] = base
        base_source = "adapter_config.json"
    else:
        base_source = "config"

    if d is not None:
        if cfg.lora.adapter_path is None:
            changes["lora.adapter_path"] = str(d)
        elif Path(cfg.lora.adapter_path).expanduser().resolve() != d.resolve():
            notes.append(f"adapter from lora.adapter_path {cfg.lora.adapter_path}, optimizer state from {d}")
    given = set(given) | ({"probe.loss_type"} if "probe.normalization" in given else set())
    base_dir = changes.get("model.name_or_path", cfg.model.name_or_path)
    args_class, settings = run_settings_of(cfg, d, adapter_weights, given, notes, changes, base_dir)
    fresh = not any(isinstance(st, dict) and st for st in state["state"].values())
    if fresh:  # a run saved before its first step (capture.save_initial): no moments yet, P has nothing to read
        notes.append("the optimizer has taken no step yet: the real step is its first (from zero moments); "
                     "deltaH1's plain step uses the identity preconditioner")
    changes.update({"probe.precondition": "adam", "probe.optimizer_state": str(opt_path), "probe.learning_rate": rate})
    out = cfg.with_values(changes)
    info = CheckpointInfo(
        path=str(d) if d is not None else None, adapter=out.lora.adapter_path,
        base_model=out.model.name_or_path, base_model_source=base_source,
        lora_r=adapter_cfg.get("r"), lora_target_modules=adapter_cfg.get("target_modules"),
        optimizer_state=str(opt_path), scheduler=rate_source.split(" (")[0] if "scheduler.pt" in rate_source else None,
        global_step=global_step, adam_step=adam_step, learning_rate=out.probe.learning_rate,
        learning_rate_source=rate_source, notes=notes, training_args=args_class, settings=settings)
    return out, info

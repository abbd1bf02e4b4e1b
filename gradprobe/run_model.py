"""What the run loaded for its base model: 4-bit or not, the 4-bit compute dtype, double quantisation.

A checkpoint's adapter does not record it, so probing a checkpoint would otherwise guess the stack. Three
records can say, most direct first:
  1. `gradprobe_run.json` in the checkpoint: written at every save by GradprobeCallback from the live model
     (`model_record`), so it is what the run really trained;
  2. training_args.bin's `model_init_kwargs.quantization_config` (TRL loads a model named by a string with
     those arguments; its scripts put the BitsAndBytesConfig there);
  3. the base model's config.json `quantization_config` (a base saved already quantised always loads so).
When none says, the config's values stay and every report says "assumed" where it leads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_RECORD = "gradprobe_run.json"
QUANT_KEYS = ("quant.mode", "quant.compute_dtype", "quant.double_quant")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _dtype_name(value: Any) -> str | None:
    """'bfloat16' for torch.bfloat16, 'torch.bfloat16' or 'bfloat16'; None for anything else."""
    text = str(value).removeprefix("torch.")
    return text if text in DTYPE_NAMES else None


def from_quantization_config(q: Any) -> tuple[dict[str, Any], str | None]:
    """({config key: value}, why not) from a BitsAndBytesConfig as plain data (its fields as a dict)."""
    if not isinstance(q, dict):
        return {}, f"a quantization_config that is not a bitsandbytes config ({type(q).__name__})"
    q = {k.lstrip("_"): v for k, v in q.items()}  # the object's state keeps load_in_4bit as _load_in_4bit
    method = q.get("quant_method", "bitsandbytes")
    method = str(getattr(method, "value", method)).lower()  # a QuantizationMethod member or its value
    if "bitsandbytes" not in method:
        return {}, f"quant_method {method!r}, which gradprobe does not model (bitsandbytes 4-bit only)"
    if q.get("load_in_8bit"):
        return {}, "an 8-bit (LLM.int8) base, which gradprobe does not model (4-bit nf4/fp4 or none)"
    if not q.get("load_in_4bit"):
        return {"quant.mode": "none"}, None
    out: dict[str, Any] = {"quant.mode": str(q.get("bnb_4bit_quant_type", "fp4"))}
    compute = _dtype_name(q.get("bnb_4bit_compute_dtype", "float32"))
    if compute is not None:
        out["quant.compute_dtype"] = compute
    out["quant.double_quant"] = bool(q.get("bnb_4bit_use_double_quant", False))
    return out, None


def model_record(model: Any) -> dict[str, Any]:
    """What a live model was loaded as: {"quant": {mode, compute_dtype, double_quant}, "lora_dtypes": [...]}
    from its bitsandbytes 4-bit layers themselves (not from its config, which a user can edit)."""
    quant: dict[str, Any] = {"mode": "none"}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not hasattr(module, "compute_dtype"):
            continue
        quant = {"mode": str(getattr(weight, "quant_type", getattr(state, "quant_type", "nf4"))),
                 "compute_dtype": _dtype_name(module.compute_dtype) or _dtype_name(getattr(state, "dtype", None)),
                 "double_quant": bool(getattr(state, "nested", False))}
        break
    lora = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {"quant": quant, "lora_dtypes": lora}


def write_record(model: Any, directory: str | Path) -> None:
    """The record beside a checkpoint's files (files.write_atomic: a crash leaves no half file)."""
    from .files import write_atomic

    write_atomic(Path(directory) / RUN_RECORD, json.dumps(model_record(model), indent=1) + "\n", "the run record")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def quant_settings(checkpoint: Path | None, training_args: dict[str, Any], base: str | None
                   ) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """{config key: (value, 'read: ...')} for the quantisation keys a record gives, and notes on records that
    exist but cannot be used. Keys it cannot read are left out (the caller marks them assumed)."""
    notes: list[str] = []
    record = _json(checkpoint / RUN_RECORD) if checkpoint is not None else None
    if record is not None and isinstance(record.get("quant"), dict):
        q = record["quant"]
        out = {"quant.mode": (q.get("mode"), f"read: {RUN_RECORD} (the live model's 4-bit layers)")}
        if q.get("mode") != "none":
            out["quant.compute_dtype"] = (q.get("compute_dtype"), f"read: {RUN_RECORD} (the layers' compute dtype)")
            out["quant.double_quant"] = (bool(q.get("double_quant")), f"read: {RUN_RECORD} (the layers' quant state)")
        return out, notes
    init = training_args.get("model_init_kwargs")
    if isinstance(init, dict) and init.get("quantization_config") is not None:
        found, why = from_quantization_config(init["quantization_config"])
        if why is None:
            return {k: (v, "read: training_args.bin (model_init_kwargs quantization_config)")
                    for k, v in found.items()}, notes
        notes.append(f"training_args.bin's model_init_kwargs has {why}")
    config = _json(Path(base).expanduser() / "config.json") if base else None
    if config is not None and config.get("quantization_config") is not None:
        found, why = from_quantization_config(config["quantization_config"])
        if why is None:
            return {k: (v, f"read: {base}/config.json (quantization_config)") for k, v in found.items()}, notes
        notes.append(f"the base's config.json has {why}")
    return {}, notes


UNRECORDED_WHY = (f"nothing the run saved records how its base was loaded (no {RUN_RECORD}, no quantization_config "
                  f"in training_args.bin's model_init_kwargs or the base's config.json); GradprobeCallback "
                  f"writes {RUN_RECORD} at every save")

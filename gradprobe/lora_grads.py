"""Deprecated: moved to gradprobe.probe.lora_grads (gradprobe.deprecated)."""

from .deprecated import alias

alias(__name__)

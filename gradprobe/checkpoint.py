"""Deprecated: moved to gradprobe.trainer_checkpoint (gradprobe.deprecated)."""

from .deprecated import alias

alias(__name__)

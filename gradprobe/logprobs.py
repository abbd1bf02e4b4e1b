"""Deprecated: moved to gradprobe.objective (gradprobe.deprecated)."""

from .deprecated import alias

alias(__name__)

"""Deprecated: moved to gradprobe.probe.ustat (gradprobe.deprecated)."""

from .deprecated import alias

alias(__name__)

"""The delta-H1 probe: per-unit gradients from backward() alone, schedules, and the U-statistics."""

from .engine import ProbeResult, run_probe, unit_directions, unit_gradients

__all__ = ["ProbeResult", "run_probe", "unit_directions", "unit_gradients"]

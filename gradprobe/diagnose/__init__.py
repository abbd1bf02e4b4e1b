"""Gradient-flow checks, the differential experiment and the root-cause verdict behind `gradprobe diagnose`."""

from .causes import CAUSES, RootCause
from .check import FAIL, PASS, WARN, Check
from .core import SCHEMA, DiagnoseResult, diagnose
from .verdict import Verdict

__all__ = ["CAUSES", "FAIL", "PASS", "SCHEMA", "WARN", "Check", "DiagnoseResult", "RootCause", "Verdict", "diagnose"]

"""Gradient-flow checks, the differential experiment and the root-cause verdict behind `gradprobe diagnose`."""

from .check import FAIL, PASS, WARN, Check
from .core import SCHEMA, DiagnoseResult, diagnose
from .verdict import ROOT_CAUSES, Verdict

__all__ = ["FAIL", "PASS", "ROOT_CAUSES", "SCHEMA", "WARN", "Check", "DiagnoseResult", "Verdict", "diagnose"]

"""Gradient-flow diagnosis: checks, a differential experiment and a root-cause verdict (`gradprobe diagnose`)."""

from .check import FAIL, PASS, WARN, Check
from .core import SCHEMA, DiagnoseResult, diagnose
from .verdict import ROOT_CAUSES, Verdict

__all__ = ["FAIL", "PASS", "ROOT_CAUSES", "SCHEMA", "WARN", "Check", "DiagnoseResult", "Verdict", "diagnose"]

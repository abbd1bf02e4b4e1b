"""JSON Schemas of gradprobe's machine-readable outputs (shipped as package data)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load(name: str) -> dict[str, Any]:
    """load('diagnose') -> the schema that `gradprobe diagnose --json` output follows."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.schema.json").read_text())

"""The unit every check returns, and the statuses it may carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"
SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}

Evidence = dict[str, Any]  # numbers, strings, booleans, or lists of names


@dataclass
class Check:
    """One finding: a stable id, a status, the numbers behind it and the fix in one sentence."""

    name: str
    title: str
    status: str
    evidence: Evidence = field(default_factory=dict)
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

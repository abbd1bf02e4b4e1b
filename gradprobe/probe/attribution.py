"""Per-unit attribution: each unit's share of deltaH and deltaH1, with its prompts, for the report and the JSON.

The shares come from the estimators' own per-unit terms, so they sum to the estimates exactly: for a
U-statistic (deltaH1 = -lr U_cross; deltaH on the same batch = -U(K)) unit u's share is -r[u]/B (times lr
for deltaH1), r[u] the Hoeffding row mean, which gives each pair (u, v) half to u and half to v; for the
independent entropy batch it is -X_E[u] . Delta theta / B (real_step.py, docs/real_step.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..rollouts import Batch, prompt_text


def unit_rows(batch: Batch, units: list[list[int]], tokenizer, deltaH1: Sequence[float] | None,
              deltaH: Sequence[float] | None) -> list[dict[str, Any]]:
    """One {"unit", "prompts", "text", "deltaH", "deltaH1"} per unit; NaN where a quantity has no per-unit terms
    (deltaH under the literal schedule, deltaH1 on an entropy batch). text: the unit's first prompt."""
    def at(terms: Sequence[float] | None, u: int) -> float:
        return float(terms[u]) if terms is not None else math.nan

    return [{"unit": u, "prompts": list(ps), "text": prompt_text(tokenizer, batch.groups[ps[0]].prompt),
             "deltaH": at(deltaH, u), "deltaH1": at(deltaH1, u)} for u, ps in enumerate(units)]

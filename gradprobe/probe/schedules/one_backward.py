"""one_backward: the packed machinery with one unit per forward (one forward and ONE backward per unit).
Kept to measure what packing adds; refuses like packed where a trainable tensor is not a LoRA weight."""

from __future__ import annotations

from .base import Context, Outcome
from .packed import refuse_token_weights, run_packed


def run(ctx: Context) -> Outcome:
    refuse_token_weights(ctx, "one_backward")
    return run_packed(ctx, "one_backward", one_unit_each=True)

"""literal: the seed's Plan A, kept as the cross-check. An X-pass and a Y-pass over packed forwards give
the sums; a diagonal loop with two fresh forwards and backwards per unit gives X[u] and Y[u] one at a
time (about 4 forwards + 4 backwards per unit). Keeps no bank: no cross matrix, no unbiased SE."""

from __future__ import annotations

import torch

from ...params import GradReader
from ..engine import plan_chunks
from .base import Context, Outcome


def run(ctx: Context) -> Outcome:
    eng, layout, acc, m = ctx.eng, ctx.layout, ctx.acc, ctx.m
    model = ctx.stack.model
    reader = GradReader(ctx.stack.params, layout)
    pvec = ctx.pvec(acc)
    sx, sy, xu, yu = (torch.zeros(layout.n, device=acc) for _ in range(4))
    diag_t = torch.zeros(m, len(layout.sizes), dtype=torch.float64, device=acc)
    x_dot_sy = torch.zeros(m, dtype=torch.float64, device=acc)
    y_dot_sx = torch.zeros(m, dtype=torch.float64, device=acc)

    def pass_sum(kind: str, out: torch.Tensor) -> None:
        """The X-pass or the Y-pass: sum of per-unit gradients over packed forwards."""
        chunks = plan_chunks(list(range(ctx.batch.B)), eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            s = eng.forward(chunk)
            wx, wy = eng.weights(chunk, s)
            eng.backward((s * wx).sum() if kind == "x" else eng.y_loss(chunk, s, wy))
            (ctx.x_present if kind == "x" else ctx.y_present).append(reader.add(out))
        model.zero_grad(set_to_none=True)

    pass_sum("x", sx)
    pass_sum("y", sy)
    if pvec is not None:
        sy.mul_(pvec)
    for u in range(m):  # the diagonal loop: two fresh forwards and backwards per unit
        xu.zero_()
        yu.zero_()
        chunks = plan_chunks(ctx.units[u], eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            for kind, out in (("x", xu), ("y", yu)):
                s = eng.forward(chunk)
                wx, wy = eng.weights(chunk, s)
                eng.backward((s * wx).sum() if kind == "x" else eng.y_loss(chunk, s, wy))
                (ctx.x_present if kind == "x" else ctx.y_present).append(reader.add(out))
        model.zero_grad(set_to_none=True)
        if pvec is not None:
            yu.mul_(pvec)
        diag_t[u] = layout.dots(xu, yu)
        x_dot_sy[u] = layout.dots(xu, sy).sum()
        y_dot_sx[u] = layout.dots(yu, sx).sum()
        if ctx.progress:
            ctx.progress(u + 1, m)
    return Outcome(sx, sy, diag_t, x_dot_sy, y_dot_sx, None, "literal")

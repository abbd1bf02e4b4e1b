"""fused: one forward and two backwards per unit (retain_graph between them). backward() adds straight into
two flat fp32 buffers behind .grad (X[u] and grad LY[u]); the unit sink (sink.py) takes them from there.
LY is the engine's (_Engine.y_loss): per-token weights where the run's pass needs them (TRL's ratio, KL)."""

from __future__ import annotations

import torch

from ...params import FlatGrads, GradReader
from ..engine import plan_chunks
from ..sink import UnitSink, real_step_hook
from .base import Context, Outcome


def new_sink(ctx: Context) -> UnitSink:
    return UnitSink(ctx.layout, ctx.m, ctx.stack.device, ctx.cfg.accumulate_on == "device",
                    ctx.pvec(torch.device("cpu")), shard=ctx.shard)


def finish(ctx: Context, sink: UnitSink, schedule: str) -> Outcome:
    hook = None if ctx.step_parts is None else \
        real_step_hook(ctx.layout, sink, ctx.pvec(torch.device("cpu")), ctx.total, ctx.step_parts)
    cross = sink.finish(hook)
    return Outcome(sink.sx, sink.sy, sink.diag_t, cross.sum(1), cross.sum(0), cross, schedule, real=sink.then_result)


def run(ctx: Context) -> Outcome:
    eng, layout, stack = ctx.eng, ctx.layout, ctx.stack
    sink = new_sink(ctx)
    fx = torch.zeros(layout.n, device=stack.device)
    fy = torch.zeros(layout.n, device=stack.device)
    reader = GradReader(stack.params, layout)
    grads = FlatGrads(stack.params, layout) if FlatGrads.usable(stack.params) else None
    try:
        for u in range(ctx.m):
            if ctx.restored(u, sink, fx, fy):
                continue
            nx, ny = len(ctx.x_present), len(ctx.y_present)
            chunks = plan_chunks(ctx.units[u], eng.group_sizes, eng.mb)
            eng.prepare(chunks)
            for k, chunk in enumerate(chunks):
                s = eng.forward(chunk)
                wx, wy = eng.weights(chunk, s)
                if k == 0:
                    sink.wait_free()
                    fx.zero_()
                    fy.zero_()
                for buf, loss, retain, present in ((fx, (s * wx).sum(), True, ctx.x_present),
                                                   (fy, eng.y_loss(chunk, s, wy), False, ctx.y_present)):
                    if grads is not None:
                        grads.point(buf)
                        eng.backward(loss, retain=retain, zero=False)
                        present.append(grads.take())
                    else:
                        eng.backward(loss, retain=retain)
                        present.append(reader.add(buf))
            ctx.save(u, fx, fy, nx, ny)
            sink.push(u, fx, fy)
            if ctx.progress:
                ctx.progress(u + 1, ctx.m)
    finally:
        if grads is not None:
            grads.close()
        stack.model.zero_grad(set_to_none=True)
    del fx, fy
    return finish(ctx, sink, "fused")

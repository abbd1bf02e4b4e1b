"""one_backward: one forward and ONE backward per unit; the X and Y gradients of the LoRA weights are formed
where the weight gradient is (lora_grads.py). Exact in real arithmetic; its bf16 rounding differs from Plan
A's (bench/RESULTS.md). Needs every trainable tensor to be a bias-free linear weight, and says so otherwise."""

from __future__ import annotations

import torch

from .. import lora_grads
from ..engine import plan_chunks
from .base import Context, Outcome
from .fused import finish, new_sink


def run(ctx: Context) -> Outcome:
    eng, layout, stack = ctx.eng, ctx.layout, ctx.stack
    lora_grads.require_linear(stack.model, stack.params, stack.names, "one_backward")
    sink = new_sink(ctx)
    fx = torch.zeros(layout.n, device=stack.device)
    fy = torch.zeros(layout.n, device=stack.device)
    try:
        with lora_grads.patch(stack.model, stack.params, layout.views(fx), layout.views(fy)) as streams:
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
                    streams.wx, streams.wy = wx, wy
                    eng.backward(s.sum(), zero=False)
                    ctx.x_present.append(streams.take())
                    ctx.y_present.append(ctx.x_present[-1])
                ctx.save(u, fx, fy, nx, ny)
                sink.push(u, fx, fy)
                if ctx.progress:
                    ctx.progress(u + 1, ctx.m)
    finally:
        stack.model.zero_grad(set_to_none=True)
    del fx, fy
    return finish(ctx, sink, "one_backward")

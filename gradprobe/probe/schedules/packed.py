"""packed (default): k units per forward and ONE backward of sum S over them; every unit's X[u] and grad LY[u]
of the LoRA weights are formed inside that backward as one batched product per layer (lora_grads.py).
k = microbatch_size // G for whole groups (a unit longer than a microbatch splits across forwards, its
leave-one-out baseline from engine.prepare). The per-unit gradients go to a bank on the device when it
fits, else on the host, else nowhere (streaming sums and a second pass; sink.choose_bank, probe.bank), reported
in the result's notes. When a trainable tensor is not the weight of a bias-free linear layer (DoRA magnitudes,
modules_to_save heads, biases), its per-unit gradient can only come from backward() into .grad: the whole
probe then takes the two-backward path (fused), and the result says so (schedule 'fused', a note naming the
tensors). one_backward refuses instead. Where LY weights each token (TRL's ratio and KL term, engine.y_loss),
the layers' per-sequence weighting cannot give it: each forward then takes a second backward, of LY, with
every row weighted 1 (the per-unit split still holds: sequences do not interact)."""

from __future__ import annotations

import torch

from ... import distributed
from ...errors import GradprobeError
from ...params import FlatLayout
from .. import lora_grads
from ..engine import Chunk, plan_chunks
from ..sink import UnitSink, choose_bank
from . import fused
from .base import Context, Outcome

BANKS = ("device", "host", "none")  # best first


def forwards(ctx: Context, one_unit_each: bool) -> list[Chunk]:
    """Forwards of whole groups in unit order; with one_unit_each, no forward holds two units."""
    eng = ctx.eng
    if one_unit_each:
        return [c for ps in ctx.units for c in plan_chunks(ps, eng.group_sizes, eng.mb)]
    return plan_chunks([p for ps in ctx.units for p in ps], eng.group_sizes, eng.mb)


TOKEN_WEIGHTS = ("TRL's per-token surrogate (the ratio to old_logprobs, the KL term) weights each token of LY, "
                 "which a layer's per-sequence weighting inside one backward of sum S cannot give")


def refuse_token_weights(ctx: Context, name: str) -> None:
    if ctx.eng.token_y:
        raise GradprobeError(f"probe.schedule={name}: {TOKEN_WEIGHTS}; use probe.schedule=packed or fused")


def run_packed(ctx: Context, name: str, one_unit_each: bool = False) -> Outcome:
    eng, layout, stack = ctx.eng, ctx.layout, ctx.stack
    lora_grads.require_linear(stack.model, stack.params, stack.names, name)
    chunks = forwards(ctx, one_unit_each)
    unit_of = eng.unit_of_prompt
    chunk_units = [sorted({unit_of[p] for p, _, _ in c}) for c in chunks]
    last = {u: i for i, us in enumerate(chunk_units) for u in us}  # the forward that completes each unit
    where, why = choose_bank(ctx.cfg.bank, ctx.m, layout.n, stack.device, ctx.batch.B)
    if ctx.shard is not None:  # one place for every rank's bank (the ring needs a bank on all or none)
        worst = max(distributed.exchange("choosing the bank", where), key=BANKS.index)
        if worst != where:
            where, why = choose_bank(worst, ctx.m, layout.n, stack.device, ctx.batch.B)
    if where == "none" and eng.token_y:  # the no-bank second pass takes directional derivatives of sum S
        out = fused.run(ctx)
        out.notes.append(f"{why}; {TOKEN_WEIGHTS} in a directional pass: ran fused")
        return out
    pvec = ctx.pvec(torch.device("cpu"))
    sink = UnitSink(layout, ctx.m, stack.device, ctx.cfg.accumulate_on == "device", pvec, bank=where,
                    slots=max(len(us) for us in chunk_units), shard=ctx.shard)
    eng.prepare(chunks)
    saved = {u: ctx.store.load(u) for u in range(ctx.m)} if ctx.store is not None else {}
    saved = {u: v for u, v in saved.items() if v is not None}  # units an interrupted run finished
    first: dict[int, int] = {}  # each computed unit's first entry in the present counts
    done = 0
    try:
        with lora_grads.patch(stack.model, stack.params, stack.names, layout, name) as streams:
            for i, (chunk, us) in enumerate(zip(chunks, chunk_units)):
                skip = all(u in saved for u in us)
                if skip:
                    xbuf, ybuf = sink.rows(us)
                else:
                    for u in us:
                        first.setdefault(u, len(ctx.x_present))
                    s = eng.forward(chunk)
                    wx, wy = eng.weights(chunk, s)
                    counts = [sum(b - a for p, a, b in chunk if unit_of[p] == u) for u in us]
                    xbuf, ybuf = sink.rows(us)
                    if eng.token_y:  # per-token LY: X inside a backward of sum S, LY in a second backward
                        streams.set_forward(wx, None, counts, xbuf, None)
                        eng.backward(s.sum(), retain=True, zero=False)
                        ctx.x_present.append(streams.take())
                        streams.set_forward(torch.ones_like(wy), None, counts, ybuf, None)
                        eng.backward(eng.y_loss(chunk, s, wy), zero=False)
                        ctx.y_present.append(streams.take())
                    else:
                        streams.set_forward(wx, wy, counts, xbuf, ybuf)
                        eng.backward(s.sum(), zero=False)
                        ctx.x_present.append(streams.take())
                        ctx.y_present.append(ctx.x_present[-1])
                for j, u in enumerate(us):
                    if last[u] != i:
                        continue
                    if u in saved:  # the saved fp32 bits, pushed where the uninterrupted run pushed them
                        xbuf[j].copy_(saved[u]["x"])
                        ybuf[j].copy_(saved[u]["y"])
                        ctx.x_present.append(saved[u]["x_present"])
                        ctx.y_present.append(saved[u]["y_present"])
                    else:
                        ctx.save(u, xbuf[j], ybuf[j], first[u], first[u])
                    sink.push(u, xbuf[j], ybuf[j])
                    done += 1
                    if ctx.progress:
                        ctx.progress(done, ctx.m)
    finally:
        stack.model.zero_grad(set_to_none=True)
    k = max(len(us) for us in chunk_units)
    notes = [f"{name}: up to {k} unit(s) per forward, one backward each", why]
    if eng.token_y:
        notes[0] = f"{name}: up to {k} unit(s) per forward, two backwards each: {TOKEN_WEIGHTS}, so LY takes a " \
                   f"backward of its own"
    if where != "none":
        out = fused.finish(ctx, sink, name)  # the one finishing step of every banked schedule
        out.notes = notes
        return out
    sink.finish()
    # no bank: X[u].sum Y and Y[u].sum X = grad LY[u].(P sum X) as directional derivatives, a second pass
    pvec = ctx.pvec(stack.device)
    x_dot_sy, y_dot_sx = _directions(ctx, sink.sy, sink.sx * pvec if pvec is not None else sink.sx, name)
    x_dot_sy, y_dot_sx = sink.gather(x_dot_sy), sink.gather(y_dot_sx)
    return Outcome(sink.sx, sink.sy, sink.diag_t, x_dot_sy, y_dot_sx, None, name, notes=notes)


def directions(ctx: Context, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X[u].v and Y[u].v = grad LY[u].(P v) for every unit (fp64 [m] each) from the packed forwards and one
    backward each, without forming any per-unit gradient: per layer and sequence, g . (V x) weighted.
    v: [n_params] in the probe's parameter order (FlatLayout(params, block=1))."""
    stack = ctx.stack
    flat = FlatLayout(stack.params, block=1)
    vx = ctx.layout.gather(flat.views(v.float().to(stack.device)), stack.device)
    pvec = ctx.pvec(stack.device)
    return _directions(ctx, vx, vx * pvec if pvec is not None else vx, "packed")


def _directions(ctx: Context, vx: torch.Tensor, vy: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X[u].vx and grad LY[u].vy (fp64 [m], CPU) for flat vectors at the layout's offsets."""
    eng, layout, stack = ctx.eng, ctx.layout, ctx.stack
    refuse_token_weights(ctx, "packed (directional derivatives)")
    chunks = forwards(ctx, one_unit_each=False)
    unit_of = eng.unit_of_prompt
    out_x = torch.zeros(ctx.m, dtype=torch.float64, device=stack.device)
    out_y = torch.zeros(ctx.m, dtype=torch.float64, device=stack.device)
    eng.prepare(chunks)
    try:
        with lora_grads.patch(stack.model, stack.params, stack.names, layout, name) as streams:
            streams.vx, streams.vy = vx, vy
            for chunk in chunks:
                us = sorted({unit_of[p] for p, _, _ in chunk})
                s = eng.forward(chunk)
                wx, wy = eng.weights(chunk, s)
                streams.set_forward(wx, wy, [sum(b - a for p, a, b in chunk if unit_of[p] == u) for u in us])
                eng.backward(s.sum(), zero=False)
                out_x[us[0]:us[-1] + 1] += streams.dx
                out_y[us[0]:us[-1] + 1] += streams.dy
    finally:
        stack.model.zero_grad(set_to_none=True)
    return out_x.cpu(), out_y.cpu()


def run(ctx: Context) -> Outcome:
    stack = ctx.stack
    others = lora_grads.not_linear(stack.model, stack.params, stack.names)
    if others:
        out = fused.run(ctx)
        out.notes.append(f"packed needs every trainable tensor to be a bias-free linear weight (LoRA A/B); "
                         f"{len(others)} tensor(s) are not (first: '{others[0]}'): ran fused, two backwards per unit")
        return out
    return run_packed(ctx, "packed")

"""Per-unit X[u] and grad LY[u] of the LoRA weights from ONE backward over many units.

Both losses weight whole sequences: LX = sum_i wx[i] S[i], LY = sum_i wy[i] S[i], and the sequences of
one forward do not interact. So the gradient reaching any activation of sequence i under sum_i S[i] is
its own, and a linear layer's weight gradient sum_t g[t] x[t]^T splits by sequence and therefore by unit:
one backward of sum_i S[i] over k units, with each sequence's rows weighted by wx[i] (or wy[i]) where the
weight gradient is formed, gives every unit's X and grad LY at once, as one batched product per layer
(k units x [out, rows*T] @ [rows*T, in]). Activation gradients flow once; only the small LoRA weight
products are done per unit. A unit of one sequence with weight 1 gives that sequence's grad S (its row
of the Jacobian).

Precision: the r-sized side (LoRA's rank) is weighted in fp32 and rounded once to the compute dtype; on
CUDA the products take bf16/fp16 operands with fp32 accumulation and an fp32 output (torch.bmm out_dtype;
design notes: 1.02-1.03x a packed training step, 0.2% from fp32-operand products); on the CPU, fp32.
The same backward gives per-unit directional derivatives X[u].v and grad LY[u].v for fixed vectors v
without forming the products (set Streams.vx / vy; schedules/packed.py directions()).
Applies when every trainable tensor is the weight of a bias-free nn.Linear (LoRA A and B);
`require_linear` names the first tensor that is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import GradprobeError
from ..params import FlatLayout


class Streams:
    """What the patched layers need at backward time, set per forward by `set_forward`."""

    def __init__(self, layout: FlatLayout):
        self.layout = layout
        self.xbuf: torch.Tensor | None = None  # [k, layout.n] fp32: X of this forward's units (added into)
        self.ybuf: torch.Tensor | None = None  # [k, layout.n] fp32: grad LY of this forward's units
        self.wx: torch.Tensor | None = None  # [rows] fp32 per-sequence weights
        self.wy: torch.Tensor | None = None
        self.counts: list[int] = []  # rows of each unit, in order
        self.unit_of_row: torch.Tensor | None = None  # [rows] long
        self.vx: torch.Tensor | None = None  # [layout.n] direction v for X[u].v (None: none)
        self.vy: torch.Tensor | None = None  # [layout.n] direction for grad LY[u].v
        self.dx: torch.Tensor | None = None  # [k] fp64: X[u].vx accumulated
        self.dy: torch.Tensor | None = None
        self._reached: set[int] = set()

    def set_forward(self, wx: torch.Tensor, wy: torch.Tensor | None, counts: list[int],
                    xbuf: torch.Tensor | None = None, ybuf: torch.Tensor | None = None) -> None:
        self.wx, self.wy, self.counts, self.xbuf, self.ybuf = wx, wy, counts, xbuf, ybuf
        if self.vx is not None or self.vy is not None:
            self.unit_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(wx.device)
            self.dx = torch.zeros(len(counts), dtype=torch.float64, device=wx.device)
            self.dy = torch.zeros(len(counts), dtype=torch.float64, device=wx.device)

    def take(self) -> int:
        """Weights reached since the last call."""
        n = len(self._reached)
        self._reached.clear()
        return n


def _mixed(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fn(a, b) with an fp32 result: fp32 accumulation of bf16/fp16 operands where torch offers it."""
    if a.dtype == torch.float32:
        return fn(a, b)
    try:
        return fn(a, b, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):  # no out_dtype here (torch < 2.8, some backends)
        return fn(a.float(), b.float())


def _products(gs: torch.Tensor, xs: torch.Tensor, counts: list[int], out: torch.Tensor) -> None:
    """out[j] += sum over unit j's rows of gs^T xs; gs [rows, T, o], xs [rows, T, i], out [k, o, i] fp32."""
    if len(set(counts)) == 1:
        k = len(counts)
        a = gs.reshape(k, -1, gs.shape[-1]).transpose(1, 2)
        b = xs.reshape(k, -1, xs.shape[-1])
        out.add_(_mixed(torch.bmm, a, b))
        return
    start = 0
    for j, c in enumerate(counts):  # units of unequal size in this forward
        a = gs[start:start + c].reshape(-1, gs.shape[-1]).t()
        b = xs[start:start + c].reshape(-1, xs.shape[-1])
        out[j].add_(_mixed(torch.mm, a, b))
        start += c


class _Linear(torch.autograd.Function):
    """y = x W^T in the compute dtype; backward returns the input gradient and adds the per-unit weighted
    weight gradients (fp32) into the streams' buffers instead of returning one for W."""

    @staticmethod
    def forward(ctx, x, weight, dtype, index, streams):
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.index, ctx.streams = dtype, index, streams
        return F.linear(x, weight.to(dtype))

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        st: Streams = ctx.streams
        grad_x = g @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        rows, (n_out, n_in) = g.shape[0], weight.shape
        cd = g.dtype if g.device.type == "cuda" else torch.float32  # CPU: fp32 products
        g3 = g.reshape(rows, -1, n_out)
        x3 = x.reshape(rows, -1, n_in)
        lay = st.layout
        o, size = lay.offsets[ctx.index], lay.sizes[ctx.index]
        for w, buf in ((st.wx, st.xbuf), (st.wy, st.ybuf)):
            if buf is not None:
                wr = w[:, None, None]
                # weight the rank-sized side in fp32, round once
                if n_out <= n_in:
                    gs, xs = (g3.float() * wr).to(cd), x3.to(cd)
                else:
                    gs, xs = g3.to(cd), (x3.float() * wr).to(cd)
                _products(gs, xs, st.counts, buf[:, o:o + size].view(-1, n_out, n_in))
        for v, w, acc in ((st.vx, st.wx, st.dx), (st.vy, st.wy, st.dy)):
            if v is not None:
                h = x3.float() @ v[o:o + size].view(n_out, n_in).t()  # [rows, T, out]
                d = (g3.float() * h).sum((1, 2), dtype=torch.float64)  # [rows]: g . (V x) per sequence
                acc.index_add_(0, st.unit_of_row, d * w.double())
        st._reached.add(ctx.index)
        return grad_x, None, None, None, None


def not_linear(model: torch.nn.Module, params: list[torch.nn.Parameter], names: list[str]) -> list[str]:
    """Names of the trainable tensors that are not the weight of a bias-free nn.Linear (DoRA magnitudes,
    modules_to_save heads, biases, norms): the ones whose gradients cannot be formed here."""
    by_id = {id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear and m.bias is None}
    return [n for n, p in zip(names, params) if id(p) not in by_id]


def require_linear(model: torch.nn.Module, params: list[torch.nn.Parameter], names: list[str],
                   schedule: str) -> list[torch.nn.Linear]:
    """The bias-free nn.Linear owning each trainable tensor; a clear refusal naming the first that has none."""
    by_id = {id(m.weight): m for m in model.modules() if type(m) is torch.nn.Linear and m.bias is None}
    owners = [by_id.get(id(p)) for p in params]
    for name, owner in zip(names, owners):
        if owner is None:
            raise GradprobeError(
                f"probe.schedule={schedule} forms gradients inside bias-free linear layers (LoRA A/B), but trainable "
                f"tensor '{name}' is not the weight of one; use probe.schedule=fused (two backwards per unit)")
    return owners


@contextlib.contextmanager
def patch(model: torch.nn.Module, params: list[torch.nn.Parameter], names: list[str], layout: FlatLayout,
          schedule: str) -> Iterator[Streams]:
    """Route the trainable linear layers through _Linear while inside; refuses (require_linear) when a
    trainable tensor is not such a layer's weight."""
    owners = require_linear(model, params, names, schedule)
    streams = Streams(layout)

    def make(index: int, module: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            kind = x.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else module.weight.dtype
            with torch.autocast(kind, enabled=False):
                return _Linear.apply(x.to(dtype), module.weight, dtype, index, streams)
        return forward

    for i, m in enumerate(owners):
        m.forward = make(i, m)
    try:
        yield streams
    finally:
        for m in owners:
            del m.forward

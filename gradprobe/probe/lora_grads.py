"""X[u] and grad LY[u] of LoRA weights from ONE backward pass instead of two.

Both losses weight whole sequences: LX = sum_i wx[i] S[i], LY = sum_i wy[i] S[i], and the sequences of
one forward do not interact. So the gradient reaching any activation of sequence i is w[i] times its
gradient under sum_i S[i], and a linear layer's weight gradient sum_t g[t] x[t]^T splits by sequence:
one backward of sum_i S[i], with each sequence's rows scaled by wx[i] (or wy[i]) where the weight
gradient is formed, gives both gradients exactly. The activation gradients flow once; only the small
LoRA weight products are done twice. Applies when every trainable tensor is the weight of a bias-free
nn.Linear (LoRA A and B); `require_linear` names the first tensor that is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import GradprobeError


class Streams:
    """What the patched layers need at backward time: per-sequence weights and the two flat buffers."""

    def __init__(self, x_views: list[torch.Tensor], y_views: list[torch.Tensor]):
        self.x_views = x_views
        self.y_views = y_views
        self.wx: torch.Tensor | None = None  # [sequences] fp32, on the device
        self.wy: torch.Tensor | None = None
        self._reached: set[int] = set()

    def take(self) -> int:
        """Weights reached since the last call."""
        n = len(self._reached)
        self._reached.clear()
        return n


class _Linear(torch.autograd.Function):
    """y = x W^T in the compute dtype; backward returns the input gradient and adds the two weighted
    weight gradients (fp32) into the streams' buffers instead of returning one for W."""

    @staticmethod
    def forward(ctx, x, weight, dtype, index, streams):
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.index, ctx.streams = dtype, index, streams
        return F.linear(x, weight.to(dtype))

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        st = ctx.streams
        grad_x = g @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        rows = g.shape[0]
        gf = g.reshape(rows, -1, g.shape[-1]).float()  # [sequences, tokens, out]
        xf = x.reshape(rows, -1, x.shape[-1]).float().flatten(0, 1)  # [sequences * tokens, in]
        for w, views in ((st.wx, st.x_views), (st.wy, st.y_views)):
            views[ctx.index].addmm_((gf * w[:, None, None]).flatten(0, 1).t(), xf)
        st._reached.add(ctx.index)
        return grad_x, None, None, None, None


def require_linear(model: torch.nn.Module, params: list[torch.nn.Parameter], names: list[str],
                   schedule: str) -> list[torch.nn.Linear]:
    """The bias-free nn.Linear owning each trainable tensor; a clear refusal naming the first that has none
    (DoRA magnitudes, modules_to_save heads, biases, norms)."""
    by_id = {id(m.weight): m for m in model.modules() if type(m) is torch.nn.Linear and m.bias is None}
    owners = [by_id.get(id(p)) for p in params]
    for name, owner in zip(names, owners):
        if owner is None:
            raise GradprobeError(
                f"probe.schedule={schedule} forms gradients inside bias-free linear layers (LoRA A/B), but trainable "
                f"tensor '{name}' is not the weight of one; use probe.schedule=fused (two backwards per unit)")
    return owners


@contextlib.contextmanager
def patch(model: torch.nn.Module, params: list[torch.nn.Parameter], x_views: list[torch.Tensor],
          y_views: list[torch.Tensor]) -> Iterator[Streams]:
    """Route the trainable linear layers through _Linear while inside (require_linear has checked them)."""
    owners = require_linear(model, params, [f"params[{i}]" for i in range(len(params))], "one_backward")
    streams = Streams(x_views, y_views)

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

"""Optimizer states as a run leaves them, for tests that need momentum."""

from __future__ import annotations

import torch


def random_steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, scale: float,
                 seed: int) -> None:
    """`steps` real optimizer steps on random gradients (scale x N(0, 1)), then no .grad left behind."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (scale * torch.randn(p.shape, generator=g)).to(p.dtype)
        opt.step()
    opt.zero_grad(set_to_none=True)

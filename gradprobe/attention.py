"""Which attention kernels gradprobe's own forwards and backwards use on a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """cuDNN attention builds an execution plan for every new sequence shape, about 1 s each on an H100,
    and rollouts bring a new shape almost every unit; the flash and memory-efficient kernels need no plan
    and run as fast once warm (bench/RESULTS.md, "Attention kernels"). The setting is global in torch, so
    it is switched off for the duration and put back, recomputation under checkpointing included."""
    backends = torch.backends.cuda
    if not hasattr(backends, "cudnn_sdp_enabled"):
        yield
        return
    before = backends.cudnn_sdp_enabled()
    backends.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        backends.enable_cudnn_sdp(before)

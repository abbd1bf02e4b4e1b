"""Shared fixtures: tiny 4-bit stacks built offline from a config in code, and one fixed rollouts file."""

from __future__ import annotations

import os

# The suite checks CPU numbers (sampling streams, rounding, brute force at 1e-4), which is what CI runs:
# a visible GPU would change them. tests/test_cuda.py checks the GPU paths on their own terms:
#   GRADPROBE_TEST_CUDA=1 python -m pytest tests/test_cuda.py
if os.environ.get("GRADPROBE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

import gradprobe as gp  # noqa: E402

# fp32 everywhere the numbers are compared to 1e-4: 4-bit base dequantised to fp32, no autocast.
FP32 = ["autocast=off", "quant.compute_dtype=float32"]


def make_cfg(*overrides: str) -> dict:
    return gp.load_config(overrides=list(overrides))


@pytest.fixture(scope="session")
def rollouts_file(tmp_path_factory) -> str:
    """A batch sampled once from the embedded default, then teacher-forced by every test that needs it."""
    cfg = make_cfg("batch.num_prompts=6", "batch.group_size=4", "batch.max_new_tokens=10")
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    path = tmp_path_factory.mktemp("rollouts") / "batch.jsonl"
    gp.write_rollouts(batch, path)
    return str(path)


@pytest.fixture(scope="session")
def fp32_stacks() -> dict:
    """The tiny nf4 stack with fp32 compute, one per checkpointing mode."""
    return {mode: gp.load_stack(make_cfg(*FP32, f"checkpointing={mode}"))
            for mode in ("reentrant", "non_reentrant")}

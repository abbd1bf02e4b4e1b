"""The stack the diagnose test modules share (built once per session: every test puts back what it changes)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def off():
    """The QLoRA stack (nf4, LoRA, bf16 autocast) without activation checkpointing, and a sampled batch."""
    from tests.diagnose.test_diagnose_inside import build

    return build("checkpointing=off")

"""diagnose under DistributedDataParallel: the two DDP faults users report, on 2 real gloo ranks (spawned processes)
of the tiny 4-bit stack (tests/support/ddp_diagnose.py builds, proves and diagnoses them), named by layer."""

from __future__ import annotations

import json

import pytest

from tests.support import ddp_diagnose
from tests.support.dist_worker import spawn_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    codes, _ = spawn_ranks(ddp_diagnose.worker, 2, str(out), timeout=300)
    errors = sorted(out.glob("ddp.*.error"))
    assert codes == [0, 0], errors[0].read_text() if errors else "no error file"
    return json.loads((out / "ddp.json").read_text())


def test_find_unused_parameters_over_reentrant_checkpointing(found):
    """accelerate #2017, transformers #4659: 'Expected to mark a variable ready only once'."""
    assert "Expected to mark a variable ready only once" in found["reentrant_proof"]  # plain torch
    r = found["reentrant"]
    assert r["ids"][0] == "ddp_reentrant_checkpointing", r["summary"]
    ev = r["evidence"][0]
    assert ev["find_unused_parameters"] is True and ev["checkpointing"] == "reentrant"
    assert ev["checkpointed_blocks"] == ["layers.0", "layers.1"]
    assert "loss_exception" not in r["ids"]
    healthy = found["non_reentrant_lookalike"]  # the look-alike: the same DDP over non-reentrant checkpointing
    assert healthy["ids"] == [], healthy["summary"]


def test_lora_weights_the_loss_never_uses_under_ddp(found):
    """FlagEmbedding #736: find_unused_parameters=False, 'Expected to have finished reduction'."""
    layer1 = found["lora_layer_1"]
    assert found["unused_missing"] == layer1  # plain torch: exactly layer 1's LoRA gets no gradient ...
    assert "Expected to have finished reduction" in found["unused_proof"]  # ... and the next forward raises
    for case in ("unused_after_step", "unused_fresh"):
        r = found[case]
        assert r["ids"][0] == "ddp_unused_parameters", (case, r["summary"])
        ev = r["evidence"][0]
        assert ev["unused_tensors"] == len(layer1), (case, ev)
        assert all(x.startswith("layers.1.") for x in ev["unused_by_layer"]) and len(ev["unused_by_layer"]) == 7
        assert all(a == "ddp_unused_parameters" for a in r["after"][1:])
    healthy = found["all_used_lookalike"]  # the look-alike: a loss that uses every LoRA weight, same DDP settings
    assert healthy["ids"] == [], healthy["summary"]

"""One rank of a 2-process (gloo, CPU) transformers Trainer run with GradprobeCallback(diagnose=...), for
tests/training/test_callback_diagnose.py: each rank writes what its callback diagnosed and its final weights."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch

        import gradprobe as gp
        from tests.support.trainer_run import micro_trainer

        torch.set_num_threads(1)
        trainer, _ = micro_trainer(Path(out) / f"run{rank}", steps=2, batch_size=4, ddp_backend="gloo")
        cb = gp.GradprobeCallback(forecast=False, on_fault="raise").attach(trainer)
        trainer.train()
        weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters()
                   if p.requires_grad}
        record = dict(world=trainer.args.world_size, diagnoses=cb.diagnoses,
                      root_cause=cb.diagnosis.verdict.root_cause if cb.diagnosis else None,
                      losses=[h["loss"] for h in trainer.state.log_history if "loss" in h], weights=weights)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise

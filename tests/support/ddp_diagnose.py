"""One rank of a DistributedDataParallel job (gloo, CPU) on the tiny 4-bit stack, for
tests/diagnose/test_diagnose_ddp.py: the DDP faults users report, each proved with plain torch, then
diagnosed; rank 0 saves what it found."""

from __future__ import annotations

import gc
import json
import os
import traceback
from pathlib import Path

SMALL = ["batch.num_prompts=4", "batch.group_size=4", "batch.max_new_tokens=8", "probe.microbatch_size=8"]


def _wrap(model, find_unused: bool):
    from torch.nn.parallel import DistributedDataParallel

    # every rank builds the same seeded stack; init_sync=False skips the start-up broadcast of the 4-bit buffers
    return DistributedDataParallel(model, find_unused_parameters=find_unused, init_sync=False,
                                   broadcast_buffers=False)


def _raises(fn) -> str:
    try:
        fn()
    except RuntimeError as exc:
        return str(exc)
    return ""


def _found(result) -> dict:
    return {"ids": [c.id for c in result.verdict.causes], "after": [c.after for c in result.verdict.causes],
            "evidence": [c.evidence for c in result.verdict.causes], "summary": result.verdict.summary}


def cases() -> dict:
    import gradprobe as gp
    from tests.diagnose.test_diagnose_inside import s_of, tokens

    cfg = gp.load_config(overrides=[*SMALL, "checkpointing=reentrant"])
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    tb = tokens(stack, batch)
    model = stack.model
    out: dict = {"lora_layer_1": sorted(n for n in stack.names if ".layers.1." in n)}

    def policy(ddp):
        return lambda: s_of(stack, tb, model=ddp).sum()

    def first_layer_only(ddp):  # FlagEmbedding #736: the loss reads layer 0's output; layer 1's LoRA is unused
        def loss_fn():
            with stack.autocast():
                h = ddp(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                        output_hidden_states=True, use_cache=False).hidden_states[1]
            return h.float().pow(2).mean()
        return loss_fn

    def diagnosed(find_unused: bool, make_loss) -> dict:
        ddp = _wrap(model, find_unused)
        try:
            return _found(gp.diagnose(ddp, stack.params, make_loss(ddp)))
        finally:
            del ddp
            gc.collect()  # the wrapper's reducer, and its autograd hooks, go with it
            model.zero_grad(set_to_none=True)

    # accelerate #2017, transformers #4659: find_unused_parameters=True over reentrant checkpointing
    ddp = _wrap(model, True)
    out["reentrant_proof"] = _raises(lambda: policy(ddp)().backward())  # plain torch: DDP's backward raises
    del ddp
    gc.collect()
    model.zero_grad(set_to_none=True)
    out["reentrant"] = diagnosed(True, policy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out["non_reentrant_lookalike"] = diagnosed(True, policy)
    out["all_used_lookalike"] = diagnosed(False, policy)
    # LoRA weights the loss never uses, under find_unused_parameters=False
    out["unused_fresh"] = diagnosed(False, first_layer_only)
    ddp = _wrap(model, False)
    loss_fn = first_layer_only(ddp)
    loss_fn().backward()  # plain torch: a training step's backward leaves layer 1's LoRA without gradient ...
    out["unused_missing"] = sorted(n for n, p in zip(stack.names, stack.params) if p.grad is None)
    model.zero_grad(set_to_none=True)
    out["unused_proof"] = _raises(loss_fn)  # ... and the next forward raises
    out["unused_after_step"] = _found(gp.diagnose(ddp, stack.params, loss_fn))  # what the user then runs
    return out


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = cases()
        if rank == 0:
            (Path(out) / "ddp.json").write_text(json.dumps(result, default=str))
    except BaseException as exc:
        (Path(out) / f"ddp.{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()

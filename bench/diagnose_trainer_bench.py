"""What `GradprobeCallback(diagnose="first_step")` costs inside a real transformers Trainer at real shapes: the
first step's checks against the training step itself, and the later steps with and without the callback, side
by side in one process.

    python bench/diagnose_trainer_bench.py --preset qwen2.5-1.5b --json out.json       (an H200)
    python bench/diagnose_trainer_bench.py --preset tiny --device cpu --seqs 8 --tokens 32 --rank 8   (a smoke run)

The model: the preset with random weights, nf4, LoRA r on all seven projections, bf16, non-reentrant
checkpointing (the QLoRA stack TRL builds); a plain Trainer on a causal-LM loss over random token ids
(--seqs sequences of --tokens per optimizer step, --micro per forward, the rest accumulated), AdamW.
Per run: the wall time of every step (CUDA-synchronised), and for the checked run the callback's own
`gradprobe/diagnose/seconds`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradprobe as gp  # noqa: E402


class Ids(torch.utils.data.Dataset):
    def __init__(self, n: int, tokens: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, tokens), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def run(a: argparse.Namespace, checked: bool, work: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cfg = gp.load_config(overrides=[f"model.preset={a.preset}", f"lora.r={a.rank}", f"lora.alpha={2 * a.rank}",
                                    f"device={a.device}", "checkpointing=non_reentrant"])
    stack = gp.load_stack(cfg)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if stack.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if stack.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=a.micro,
                             gradient_accumulation_steps=a.seqs // a.micro, max_steps=a.steps, learning_rate=1e-5,
                             bf16=stack.device.type == "cuda", logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=stack.device.type != "cuda", dataloader_num_workers=0, disable_tqdm=True)
    vocab = stack.model.get_input_embeddings().num_embeddings
    trainer = Trainer(model=stack.model, args=args, train_dataset=Ids(a.seqs * a.steps, a.tokens, vocab),
                      callbacks=[Clock()])
    cb = None
    if checked:
        cb = gp.GradprobeCallback(forecast=False, diagnose="first_step", tokenizer=stack.tokenizer).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "gradprobe/diagnose/seconds" in h]
    return dict(checked=checked, step_seconds=times, preset=a.preset, seqs=a.seqs, tokens=a.tokens, micro=a.micro,
                trainable=stack.n_params,
                diagnose_seconds=logged[0]["gradprobe/diagnose/seconds"] if logged else None,
                root_cause=cb.diagnosis.verdict.root_cause if cb is not None and cb.diagnosis is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checked-first", action="store_true", help="run the checked training first (order effects)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checked in ((True, False) if a.checked_first else (False, True)):
            row = run(a, checked, Path(tmp) / str(checked))
            print(json.dumps(row), flush=True)
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

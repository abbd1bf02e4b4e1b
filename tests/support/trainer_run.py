"""A plain transformers Trainer on the micro QLoRA stack (gradprobe/stack.py, exact-entropy settings of
validate.GROUND_TRUTH): language-modelling loss on fixed sequences, built in a second on the CPU.

    trainer, tokenizer = micro_trainer(tmp_path / "run", lr=1e-4, steps=4)
    trainer.train()
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradprobe.config import load_config
from gradprobe.rollouts import MICRO_PROMPTS
from gradprobe.stack import load_stack
from gradprobe.validate import GROUND_TRUTH


def micro_trainer(output_dir: str | Path, lr: float = 1e-4, steps: int = 4, optim: str = "adamw_torch",
                  rows: int = 32, batch_size: int = 8, seed: int = 0, **args_overrides):
    """(Trainer, tokenizer): AdamW (weight decay 0.1), max_grad_norm 1, linear decay, a log every step; each
    row is a micro prompt and a random 4-letter tail, padded to 12 tokens. `args_overrides`: more
    TrainingArguments fields (e.g. gradient_checkpointing)."""
    from transformers import Trainer, TrainingArguments

    stack = load_stack(load_config(overrides=[*GROUND_TRUTH, f"seed={seed}"]))
    tok = stack.tokenizer
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(rows):
        tail = "".join("abcdefg"[j] for j in torch.randint(7, (4,), generator=gen).tolist())
        ids = torch.tensor((tok.encode(MICRO_PROMPTS[i % len(MICRO_PROMPTS)] + tail, add_bos=True)
                            + [tok.pad_token_id] * 12)[:12])
        data.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, weight_decay=0.1, max_grad_norm=1.0, logging_steps=1,
                             report_to="none", use_cpu=True, seed=seed, save_strategy="no", disable_tqdm=True,
                             optim=optim, **args_overrides)
    return Trainer(model=stack.model, args=args, train_dataset=data), tok

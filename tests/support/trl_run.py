"""A real TRL GRPOTrainer run on the CPU, in seconds: the tiny Qwen2 preset (gradprobe/stack.py) saved as an
ordinary model directory with its character tokenizer, LoRA through TRL's own peft_config path, a dozen
text prompts and a rule-based reward.

    trainer = train_grpo(tmp_path / "run", callbacks=[MyCallback()], loss_type="bnpo")
    checkpoint = tmp_path / "run" / "checkpoint-2"

Everything not given keeps TRL's defaults (loss_type dapo, scale_rewards group, beta 0, temperature 1,
bf16 autocast, gradient checkpointing), except what keeps the run small: 3 steps of 2 prompts x 4
generations, completions of at most 8 tokens, a checkpoint every 2 steps, no reporting. quant="nf4" loads
the base in 4-bit through bitsandbytes (QLoRA: TRL then casts the LoRA weights to bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradprobe.config import LoraSection
from gradprobe.rollouts import BUILTIN_PROMPTS
from gradprobe.stack import quiet_libraries
from tests.support.export import save_preset

# Small enough for 2 CI cores: per step 2 prompts x 4 completions of <= 8 tokens.
SMALL_RUN: dict[str, Any] = dict(
    max_steps=3, save_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
    learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0, report_to="none", use_cpu=True,
    save_only_model=False, dataloader_num_workers=0,
)


def vowel_reward(completions: list[str], **_: Any) -> list[float]:
    """A rule-based reward that varies within a group: the share of vowels in the completion."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def base_model(directory: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """The preset's model and tokenizer as a directory (reused when it is already there)."""
    d = Path(directory)
    return d if (d / "config.json").is_file() else save_preset(preset, d, seed=seed)


def lora_config(**overrides: Any):
    """gradprobe's default adapter (r, alpha, dropout, all seven projections), as a PEFT LoraConfig."""
    from peft import LoraConfig

    lora = LoraSection()
    kwargs = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                  target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return LoraConfig(**{**kwargs, **overrides})


def train_grpo(output_dir: str | Path, callbacks: Sequence[Any] = (), *, base_dir: str | Path | None = None,
               quant: str | None = None, lora: dict[str, Any] | None = None, prompts: Sequence[str] = BUILTIN_PROMPTS,
               reward=vowel_reward, trainer_class=None, by_path: bool = False, model: Any = None, **config: Any):
    """Train with trl.GRPOTrainer and return the trainer after train(). `config` overrides GRPOConfig fields
    (SMALL_RUN's and TRL's defaults); `by_path`: TRL loads the base from its directory with the quantisation
    in GRPOConfig.model_init_kwargs (recorded in training_args.bin); `base_dir` shares one saved base model
    between runs (default: a `base` directory inside output_dir); `trainer_class` a GRPOTrainer subclass (e.g.
    one that records); `model` a model built by the caller (e.g. a PeftModel loaded from an adapter: TRL then
    gets no peft_config)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    out = Path(output_dir)
    base = base_model(base_dir if base_dir is not None else out / "base")
    kwargs: dict[str, Any] = dict(dtype=torch.float32)
    if quant is not None:
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                                             bnb_4bit_compute_dtype=torch.bfloat16),
                      device_map={"": "cpu"})
    if by_path:  # TRL loads the model itself, from its name and model_init_kwargs (as its scripts do)
        config["model_init_kwargs"] = kwargs
    args = GRPOConfig(output_dir=str(out), **{**SMALL_RUN, **config})
    with quiet_libraries():
        given = model is not None
        if not given:
            model = str(base) if by_path else AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        cls = trainer_class or GRPOTrainer
        trainer = cls(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                      peft_config=None if given else lora_config(**(lora or {})), callbacks=list(callbacks))
        trainer.train()
    return trainer

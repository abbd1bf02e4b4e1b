"""Capture the batches a TRL GRPOTrainer steps with, as gradprobe rollouts files (docs/rollouts.md).

    trainer = GRPOTrainer(..., args=GRPOConfig(save_steps=1, ...))
    BatchCapture("batches").attach(trainer)
    trainer.train()
    # batches/step-000003-pass-1.jsonl is the batch of optimizer step 3, the step checkpoint-2 was about to take:
    #   gradprobe delta-h1 --checkpoint out/checkpoint-2 --rollouts batches/step-000003-pass-1.jsonl
    # batches/checkpoint-0 is the run before its first step (the initial adapter, optimizer and scheduler)

Each optimizer step writes one file, `step-<global step, 6 digits>-pass-<p>.jsonl`: p is the pass over the
generation batch (1 .. num_iterations; TRL steps num_iterations times on each sampled batch). One line per
prompt, its G completions in generation order: prompt and completion token ids (completion padding removed
with TRL's completion_mask, EOS kept where it was generated), the rewards (the reward functions' weighted
sum), TRL's advantages (already scaled), and the per-token log-probs TRL's loss uses: `old_logprobs` (its
old_per_token_logps, the sampler's, when TRL computed them: num_iterations > 1 or an unaligned accumulation)
and `ref_logprobs` (its ref_per_token_logps, when beta != 0); `step` and `pass` on every line.

How: TRL writes no batch of its own, so attach() wraps three of the trainer's methods on the instance:
_calculate_rewards (reads the rewards), _generate_and_score_completions (keeps the generation batch on the
CPU and tags its rows with their generation index), _prepare_inputs (notes which rows each micro-step gets and
hands TRL the batch without the tag). Nothing the trainer computes changes, nor any random stream: the
trajectory is the same with and without it (tests/training/test_trl_passes.py). One process only, and
steps_per_generation == gradient_accumulation_steps (TRL's default), so that an optimizer step sees whole
response groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import GradprobeError
from .files import write_atomic
from .rollouts import Batch, Group, write_rollouts
from .run_model import record_checkpoint, write_record

ROW = "gradprobe_row"  # the generation index each row carries through TRL's shuffle and split
INITIAL = "checkpoint-0"


def batch_name(step: int, pass_: int) -> str:
    return f"step-{step:06d}-pass-{pass_}.jsonl"


class BatchCapture(TrainerCallback):
    """Write each optimizer step's batch of a TRL GRPOTrainer as a rollouts file (module docstring)."""

    def __init__(self, directory: str | Path, save_initial: bool = True):
        self.directory = Path(directory)
        self.save_initial = save_initial
        self.trainer: Any = None
        self.written: list[Path] = []
        self._generation: dict[str, Any] | None = None
        self._rewards: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []
        self._passes: set[int] = set()

    def attach(self, trainer: Any) -> BatchCapture:
        """Wrap the trainer's generation and input methods and add this callback; returns self."""
        for name in ("_calculate_rewards", "_generate_and_score_completions", "_prepare_inputs"):
            if not callable(getattr(trainer, name, None)):
                raise GradprobeError(f"BatchCapture needs a TRL GRPOTrainer (it has no {name})")
        args = trainer.args
        if trainer.accelerator.num_processes > 1:
            raise GradprobeError("BatchCapture captures one process's batch; run it without a distributed launch")
        if args.steps_per_generation != args.gradient_accumulation_steps:
            raise GradprobeError(f"BatchCapture needs steps_per_generation == gradient_accumulation_steps (TRL's "
                                 f"default), so that each optimizer step sees whole response groups; the run has "
                                 f"{args.steps_per_generation} and {args.gradient_accumulation_steps}")
        self.trainer = trainer
        rewards, generate, prepare = (trainer._calculate_rewards, trainer._generate_and_score_completions,
                                      trainer._prepare_inputs)

        def calculate_rewards(*a: Any, **kw: Any) -> torch.Tensor:
            per_func = rewards(*a, **kw)
            weights = trainer.reward_weights.to(per_func.device).unsqueeze(0)
            self._rewards = torch.nan_to_num((per_func * weights).nansum(dim=1)).detach().cpu()
            return per_func

        def generate_and_score(inputs: Any) -> dict[str, Any]:
            out = generate(inputs)
            if trainer.model.training:
                self._generation = {k: v.detach().cpu().clone() for k, v in out.items()
                                    if isinstance(v, torch.Tensor) and v.ndim >= 1}
                self._generation["rewards"] = self._rewards
                out[ROW] = torch.arange(out["prompt_ids"].shape[0], device=out["prompt_ids"].device)
            return out

        def prepare_inputs(generation_batch: Any) -> Any:
            pass_ = (trainer._step % (args.steps_per_generation * trainer.num_iterations)) \
                // args.steps_per_generation + 1
            inputs = prepare(generation_batch)
            if not (isinstance(inputs, dict) and ROW in inputs):
                return inputs
            self._rows.append(inputs[ROW].detach().cpu())
            self._passes.add(pass_)
            return {k: v for k, v in inputs.items() if k != ROW}

        trainer._calculate_rewards = calculate_rewards
        trainer._generate_and_score_completions = generate_and_score
        trainer._prepare_inputs = prepare_inputs
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.trainer is None:
            raise GradprobeError("BatchCapture wraps its trainer's methods: use BatchCapture(...).attach(trainer)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.save_initial and state.global_step == 0:
            save_initial(self.trainer, self.directory / INITIAL, optimizer, lr_scheduler)

    def on_save(self, args, state, control, model=None, **kwargs):
        """How the live model was loaded, beside each checkpoint (run_model.RUN_RECORD), so that --checkpoint
        reads the quantisation instead of assuming it."""
        record_checkpoint(args, state, model)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._rows:
            return
        rows, passes = torch.cat(self._rows), sorted(self._passes)
        self._rows, self._passes = [], set()
        if len(passes) != 1:
            raise GradprobeError(f"optimizer step {state.global_step} mixed passes {passes} of its batches")
        path = self.directory / batch_name(state.global_step, passes[0])
        batch = to_batch(self._generation, rows, self.trainer.num_generations)
        batch.meta.update(step=state.global_step, **{"pass": passes[0]})
        write_rollouts(batch, path)
        self.written.append(path)


def to_batch(gen: dict[str, torch.Tensor], rows: torch.Tensor, group_size: int) -> Batch:
    """The rows a step used, one Group per prompt in generation order, padding stripped with TRL's masks."""
    groups = []
    for g in sorted({int(r) // group_size for r in rows}):
        members = sorted(int(r) for r in rows if int(r) // group_size == g)
        if len(members) < 2:
            raise GradprobeError(f"the step holds {len(members)} completion(s) of prompt group {g}; G >= 2 is needed")
        pmask = gen["prompt_mask"][members[0]].bool()
        groups.append(Group(gen["prompt_ids"][members[0]][pmask].tolist(), _completions(gen, "completion_ids", members),
                            [float(gen["rewards"][i]) for i in members],
                            [float(gen["advantages"][i]) for i in members],
                            old_logprobs=_completions(gen, "old_per_token_logps", members),
                            ref_logprobs=_completions(gen, "ref_per_token_logps", members)))
    return Batch(groups)


def _completions(gen: dict[str, torch.Tensor], key: str, members: list[int]) -> list[list[Any]] | None:
    """Rows `members` of a [N, T] completion tensor, each cut to its completion_mask (TRL's padding removed)."""
    if key not in gen:
        return None
    rows = [gen[key][i][gen["completion_mask"][i].bool()] for i in members]
    return [r.tolist() if key == "completion_ids" else r.double().tolist() for r in rows]


def save_initial(trainer: Any, directory: Path, optimizer: Any, lr_scheduler: Any) -> None:
    """The run before its first step as a Trainer checkpoint: the adapter, the (empty) optimizer state, the
    scheduler, trainer_state.json and training_args.bin, so that step 1 is probed like any other step."""
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(directory))
    optimizer = optimizer if optimizer is not None else trainer.optimizer
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    scheduler = lr_scheduler if lr_scheduler is not None else trainer.lr_scheduler
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    write_atomic(directory / "trainer_state.json", json.dumps({"global_step": 0}), "the trainer state")
    write_record(trainer.model, directory)

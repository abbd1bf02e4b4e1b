"""TRL's sampler against the exact policy (issue 23, item 5): on the tiny model after one GRPOTrainer step,
600 two-token completions per prompt from TRL's own generation path; their first-token distribution (chi2
against the softmax) and mean log-probability (against the exact -H by enumeration).

    PYTHONPATH=. python bench/trl_sampler_check.py
"""
import contextlib
import tempfile
from pathlib import Path

import torch

from gradprobe.capture import to_batch
from gradprobe.entropy import enumerate_prompt
from gradprobe.objective import pack, sequence_logprobs
from gradprobe.stack import live_stack
from tests.support.trl_run import train_grpo

L = 2
trainer = train_grpo(Path(tempfile.mkdtemp()) / "run", max_steps=1, bf16=False, max_completion_length=L,
                     learning_rate=1e-2, save_steps=100)
tok = trainer.processing_class
stack = live_stack(trainer.model, tok, None)
texts = ["say hi:", "count to five:"]
G = 4
S = {0: [], 1: []}
first = {0: [], 1: []}
prompts = None
for _ in range(150):
    out = trainer._generate_and_score_completions([{"prompt": t} for t in texts for _ in range(G)])
    gd = {kk: v.detach().cpu() for kk, v in out.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    gd["rewards"] = torch.zeros(gd["completion_mask"].shape[0])
    batch = to_batch(gd, torch.arange(8), G)
    prompts = [g.prompt for g in batch.groups]
    with torch.no_grad():
        for p, g in enumerate(batch.groups):
            tb = pack([(g.prompt, r) for r in g.responses], tok.pad_token_id, stack.device)
            S[p] += sequence_logprobs(stack.model, tb, 1.0, contextlib.nullcontext()).tolist()
            first[p] += [r[0] for r in g.responses]
print("prompts", prompts, "padded prompt ids", gd["prompt_ids"][:, :3].tolist()[::4])
with torch.no_grad():
    for p in (0, 1):
        e = enumerate_prompt(stack, prompts[p], 1.0, L)
        H = float(e.entropy())
        s = torch.tensor(S[p])
        print(f"prompt {p}: exact E[S] = {-H:.4f}; TRL samples mean S {float(s.mean()):.4f} "
              f"+- {float(s.std() / len(s) ** .5):.4f}")
        ids = torch.tensor([prompts[p]])
        probs = torch.softmax(stack.model(input_ids=ids).logits[0, -1].float(), -1)
        cnt = torch.bincount(torch.tensor(first[p]), minlength=probs.numel()).double()
        n = cnt.sum()
        chi = float(((cnt - n * probs) ** 2 / (n * probs)).sum())
        print(f"   first token chi2 {chi:.1f} on {probs.numel()-1} dof; n={int(n)}")

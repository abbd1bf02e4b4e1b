"""Is X (the entropy gradient estimator) biased on TRL's own batches? Issue 23, item 5.

After 2 real GRPOTrainer steps (tiny Qwen2, fp32, completions of up to 16 tokens), theta is held fixed and K
batches of 16 prompts x G=4 are drawn through TRL's own generation path (_generate_and_score_completions,
cut and masked by TRL, turned into rollouts by gradprobe.capture.to_batch) and K through gradprobe's sampler;
every K/4-th step also a G=16 batch. For each batch, mean_u X[u].d for a fixed random direction d and its SE
over the units; z against the pooled G=16 mean. An unbiased X with a calibrated SE gives mean z ~ 0, rms ~ 1.

    PYTHONPATH=. python bench/trl_batch_x.py 200
"""
import sys
import tempfile
from pathlib import Path

import torch

from gradprobe.capture import to_batch
from gradprobe.config import ProbeSection
from gradprobe.optim.precondition import Preconditioner
from gradprobe.probe import unit_gradients
from gradprobe.rollouts import BUILTIN_PROMPTS
from gradprobe.stack import live_stack
from gradprobe.validate import Policy, sampled_batch
from tests.support.trl_run import train_grpo

L, K = 16, int(sys.argv[1])
trainer = train_grpo(Path(tempfile.mkdtemp()) / "run", max_steps=2, bf16=False, max_completion_length=L,
                     learning_rate=1e-2, save_steps=100)
tok = trainer.processing_class
stack = live_stack(trainer.model, tok, None)
stack.model.eval()
texts = BUILTIN_PROMPTS[:16]
cfg = ProbeSection(microbatch_size=16)
d = torch.randn(stack.n_params, generator=torch.Generator().manual_seed(0)).double()
policy = Policy(stack, "importance", 1.0, L)
gen = torch.Generator().manual_seed(1)
prompts = None
res = {"trl G=4": [], "gradprobe G=4": [], "gradprobe G=16": []}
def est(batch):
    x = unit_gradients(stack, batch, cfg, Preconditioner(None), kinds=("x",))["x"].double() @ d
    return float(x.mean()), float(x.std() / len(x) ** 0.5)
for k in range(K):
    out = trainer._generate_and_score_completions([{"prompt": t} for t in texts for _ in range(4)])
    gd = {kk: v.detach().cpu() for kk, v in out.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    gd["rewards"] = torch.zeros(gd["completion_mask"].shape[0])
    b = to_batch(gd, torch.arange(gd["completion_mask"].shape[0]), 4)
    prompts = prompts or [g.prompt for g in b.groups]
    res["trl G=4"].append(est(b))
    res["gradprobe G=4"].append(est(sampled_batch(stack, policy, prompts, 4, gen, 1.0)))
    if k % 4 == 0:
        res["gradprobe G=16"].append(est(sampled_batch(stack, policy, prompts, 16, gen, 1.0)))
ref = torch.tensor([m for m, _ in res["gradprobe G=16"]]).mean()
print(f"L={L}, B=16, K={K}; reference (pooled G=16 mean) {float(ref):.4f}")
for name, v in res.items():
    m = torch.tensor([a for a, _ in v])
    se = torch.tensor([b for _, b in v])
    z = (m - ref) / se
    print(f"{name:15s} mean {float(m.mean()):.4f} +- {float(m.std() / len(m) ** .5):.4f}  "
          f"median {float(m.median()):.4f}  below ref {float((m < ref).double().mean()):.0%}  "
          f"mean z {float(z.mean()):+.2f}  rms z {float(z.pow(2).mean().sqrt()):.2f}  "
          f"within 2SE {float((z.abs() < 2).double().mean()):.0%}")

"""TRL's per-token surrogate as the Y loss (objective.token_y_weights) against TRL's loss written out in plain
torch and differentiated by autograd: the weights on random log-probs, then the probe's per-unit Y on a batch
with old and reference log-probs against per-sequence forwards and backwards that share nothing with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gradprobe as gp
from gradprobe.errors import GradprobeError
from gradprobe.objective import PassSpec, token_y_weights
from gradprobe.optim.precondition import Preconditioner
from gradprobe.probe import unit_gradients
from gradprobe.rollouts import read_rollouts
from tests.conftest import FP32, make_cfg


def trl_per_token_loss(logp, old, ref, adv, spec: PassSpec):
    """grpo_trainer.py (trl 1.16) _compute_loss l.3083-3150, token level, loss types grpo/bnpo/dr_grpo/dapo."""
    coef_1 = torch.exp(logp - old)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if spec.kl_bias_correction:
        per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - spec.epsilon, 1 + spec.eps_high)
    if spec.delta is not None:
        coef_1 = torch.clamp(coef_1, max=spec.delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if spec.beta != 0.0:
        per_token_loss = per_token_loss + spec.beta * per_token_kl
    return per_token_loss


SPECS = [PassSpec(), PassSpec(epsilon=0.2, epsilon_high=0.28, delta=1.5), PassSpec(beta=0.04),
         PassSpec(beta=0.04, kl_bias_correction=False, epsilon=0.1)]


@pytest.mark.parametrize("spec", SPECS)
def test_token_weights_are_the_gradient_of_trls_loss(spec):
    gen = torch.Generator().manual_seed(3)
    n, t = 12, 9
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(n, t, generator=gen, dtype=torch.float64)  # ratios from ~0.3 to ~3
    old[0] = logp[0]  # a sequence at ratio exactly 1 (TRL's on-policy pass: ties in torch.min)
    ref = logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (n,), generator=gen)[:, None]
    norm = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    x = logp.clone().requires_grad_(True)
    loss = (trl_per_token_loss(x, old, ref, adv[:, None], spec) * mask * norm[:, None]).sum()
    loss.backward()
    w, clipped = token_y_weights(logp, mask, adv, norm, spec, old, ref)
    torch.testing.assert_close(w, -x.grad, rtol=1e-12, atol=1e-14)  # LY is the objective: minus TRL's loss
    r = torch.exp(logp - old)
    region = (((r < 1 - spec.epsilon) & (adv[:, None] < 0)) | ((r > 1 + spec.eps_high) & (adv[:, None] > 0))) & mask
    assert torch.equal(clipped, region) and 0.1 < clipped.sum() / mask.sum() < 0.6


def test_without_old_logprobs_the_ratio_is_one_and_the_weights_are_the_sequences():
    logp = -torch.rand(4, 5, dtype=torch.float64)
    adv, norm = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    w, clipped = token_y_weights(logp, torch.ones(4, 5, dtype=torch.bool), adv, norm, PassSpec())
    assert torch.equal(w, (adv * norm)[:, None].expand(4, 5)) and not clipped.any()


def _token_logprobs(stack, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(y_t | prefix) of each response token, from one unpadded forward."""
    ids = torch.tensor([prompt + response])
    logits = stack.model(input_ids=ids, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None])[:, 0]


def _brute_force_y(stack, batch, spec: PassSpec) -> torch.Tensor:
    """Y[u] for loss_type grpo: B/N sum_{i in u} (1/L_i) sum_t dj/dtheta, one unpadded forward per sequence."""
    b, n = batch.B, sum(len(g.responses) for g in batch.groups)
    rows = []
    for grp in batch.groups:
        total = torch.zeros(stack.n_params, dtype=torch.float64)
        for k, resp in enumerate(grp.responses):
            stack.model.zero_grad(set_to_none=True)
            logp = _token_logprobs(stack, grp.prompt, resp)
            old = torch.tensor(grp.old_logprobs[k]) if grp.old_logprobs else logp.detach()
            ref = torch.tensor(grp.ref_logprobs[k])
            loss = trl_per_token_loss(logp, old, ref, torch.tensor(grp.advantages[k]), spec).mean() * b / n
            (-loss).backward()
            total += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                for p in stack.params])
        rows.append(total)
    stack.model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def surrogate_batch(fp32_stacks, rollouts_file, tmp_path_factory):
    """The shared rollouts with advantages, and old and reference log-probs a perturbation away from the
    model's own (so that the ratio clips on a good share of the tokens)."""
    stack = fp32_stacks["reentrant"]
    batch = read_rollouts(rollouts_file, stack.tokenizer)
    gen = torch.Generator().manual_seed(11)
    lines = []
    with torch.no_grad():
        for grp in batch.groups:
            old, ref = [], []
            for resp in grp.responses:
                lp = _token_logprobs(stack, grp.prompt, resp).double()
                for out, scale in ((old, 0.3), (ref, 0.2)):
                    noise = scale * torch.randn(len(resp), generator=gen, dtype=torch.float64)
                    out.append((lp + noise).clamp(max=0).tolist())
            adv = torch.randn(len(grp.responses), generator=gen).tolist()
            lines.append(json.dumps({"prompt": grp.prompt, "responses": grp.responses, "rewards": grp.rewards,
                                     "advantages": adv, "old_logprobs": old, "ref_logprobs": ref}))
    path = tmp_path_factory.mktemp("surrogate") / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("sets", [["probe.beta=0.04"], ["probe.num_iterations=2", "probe.epsilon_high=0.28"]])
def test_probe_y_is_trls_gradient_per_unit(fp32_stacks, surrogate_batch, sets):
    stack = fp32_stacks["reentrant"]
    cfg = make_cfg(*FP32, f"batch.rollouts={surrogate_batch}", "probe.loss_type=grpo", *sets)
    batch = gp.build_batch(stack, cfg)
    spec = PassSpec.from_config(cfg.probe)
    ref = _brute_force_y(stack, batch, spec)
    got = unit_gradients(stack, batch, cfg.probe, Preconditioner(None), kinds=("y",))["y"].double()
    assert float((got - ref).norm() / ref.norm()) < 1e-4
    # every schedule gives the same deltaH1; packed takes two backwards per forward and says why
    results = {s: gp.delta_h1(stack, batch, cfg.with_values({"probe.schedule": s, "probe.microbatch_size": 8}))
               for s in ("packed", "fused", "literal")}
    assert results["packed"].schedule == "packed" and any("per-token" in n for n in results["packed"].notes)
    assert results["packed"].backwards == 2 * results["packed"].forwards == 2 * 3  # 2 units per forward
    for other in ("fused", "literal"):
        assert math.isclose(results["packed"].deltaH1, results[other].deltaH1, rel_tol=1e-4), other
    assert math.isclose(results["packed"].deltaH, results["fused"].deltaH, rel_tol=1e-4)
    assert results["packed"].trl_pass["clipped_share"] > 0.05 and results["packed"].trl_pass["per_token"]
    with pytest.raises(GradprobeError, match="per-token"):
        gp.delta_h1(stack, batch, cfg.with_values({"probe.schedule": "one_backward"}))


def test_a_batch_without_the_logprobs_the_pass_needs_is_refused(fp32_stacks, rollouts_file):
    stack = fp32_stacks["reentrant"]
    for sets, match in ((["probe.num_iterations=2"], "num_iterations=2 passes"), (["probe.beta=0.04"], "KL term")):
        cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}", *sets)
        with pytest.raises(GradprobeError, match=match):
            gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
    # the plain case stays the sequence-weighted packed path
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}")
    result = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
    assert result.schedule == "packed" and result.trl_pass["per_token"] is False

"""deltaH against ground truth: step along the batch's update and measure the entropy change.

validate.direction=real (default): d = the step the run's optimizer would take on the update batch
(optim/update.py real_update: its own step on copies), theta' = theta + eta d for a sweep of multiples eta,
so eta = 1 is the real next step and deltaH is the prediction there. validate.direction=plain: d = P grad LY
(the mean of the probe's Y[u]) and eta a learning rate, the plain step deltaH1 describes.
The first-order prediction of H(theta') - H(theta) is eta grad H . d; the probe estimates grad H by
-Xbar_E on an evaluation batch sampled independently of the update batch, so -eta Xbar_E . d has a
plain standard error over the evaluation units (d is held fixed). The truth comes from exact
enumeration when the model is small enough, else from importance sampling (entropy.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .api import learning_rate, preconditioner, real_step, step_source, step_summary
from .attention import without_cudnn_attention
from .entropy import (
    count_responses,
    enumerate_prompt,
    is_delta_entropy,
    sample_enumerated,
    sample_responses,
    score,
)
from .errors import GradprobeError
from .optim.precondition import Preconditioner
from .params import GradReader
from .probe import unit_gradients
from .rollouts import Batch, Group, _decode, builtin_prompts, builtin_reward, encode_prompt, read_rollouts

if TYPE_CHECKING:
    from .config import Config

Z95 = 1.959964  # two-sided 95% normal quantile
NONLINEAR = 0.05  # second-order effects "begin" where Delta H leaves the small-step line by this fraction

# The ground-truth model `gradprobe validate` runs on without --config (configs/micro.yaml mirrors it):
# the micro preset, responses of at most 4 tokens (7,381 per prompt), fp32 compute and no autocast so
# that H resolves tiny steps, no checkpointing (the enumeration's backward is one plain graph).
GROUND_TRUTH = ("model.preset=micro", "quant.compute_dtype=float32", "autocast=off", "checkpointing=off",
                "batch.max_new_tokens=4", "validate.eval_num_prompts=256")


@dataclass
class SweepPoint:
    eta: float
    step: float  # ||eta d|| / ||theta||
    delta_true: float  # H(theta + eta d) - H(theta)
    delta_true_se: float  # 0 on the exact path
    predicted: float  # -eta Xbar_E . d
    predicted_se: float
    ratio: float  # delta_true / predicted
    ratio_se: float
    ratio_low: float  # 95% interval
    ratio_high: float
    first_order_exact: float | None  # eta grad H . d (exact path only)
    ratio_exact: float | None  # delta_true / first_order_exact


@dataclass
class ValidateResult:
    method: str  # "exact" or "importance"
    points: list[SweepPoint]
    entropy: float  # H(theta), mean over the evaluation prompts
    slope_fit: float  # dH/deta fitted on the two smallest steps
    slope_probe: float  # -Xbar_E . d
    slope_probe_se: float
    slope_exact: float | None  # grad H . d
    eta_nonlinear: float | None  # smallest eta whose Delta H leaves the fitted line by > NONLINEAR
    grad_cosine: float | None  # cos(-Xbar_E, grad H) (exact path)
    d_norm: float
    theta_norm: float
    eta_run: float  # the run's learning rate (probe.learning_rate, else the optimizer state's, else the default)
    step_run: float  # its relative step ||eta_run d|| / ||theta||
    n_params: int
    update_units: int
    update_group_size: int
    eval_units: int
    eval_group_size: int
    responses_per_prompt: int | None  # enumerated responses per prompt (exact path)
    is_samples: int | None  # fresh samples per prompt (importance path)
    is_min_ess: float | None
    max_len: int
    temperature: float
    precondition: str
    autocast: str
    timings: dict[str, float] = field(default_factory=dict)
    direction: str = "plain"  # "real": d is the optimizer's step (eta = 1 is it); "plain": d = P grad LY
    step: dict[str, Any] = field(default_factory=dict)  # the StepSettings of the real step (direction=real)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_method(cfg: Config, vocab_size: int) -> str:
    vcfg = cfg.validate
    n = count_responses(vocab_size, cfg.batch.max_new_tokens)
    if vcfg.method == "exact" and n > vcfg.max_enumerate:
        raise GradprobeError(f"validate.method=exact would enumerate {n:,} responses per prompt (vocabulary "
                             f"{vocab_size}, {cfg.batch.max_new_tokens} tokens), above validate.max_enumerate="
                             f"{vcfg.max_enumerate:,}; use validate.method=importance")
    if vcfg.method == "auto":
        return "exact" if n <= vcfg.max_enumerate else "importance"
    return vcfg.method


def check_config(cfg: Config) -> None:
    """Settings under which the ground truth would not describe the probe's sampling distribution."""
    v = cfg.validate
    if v.points < 2:
        raise GradprobeError(f"validate.points must be >= 2; got {v.points}")
    if not 0 < v.step_min < v.step_max:
        raise GradprobeError(f"validate wants 0 < step_min < step_max; got {v.step_min} and {v.step_max}")
    if v.eval_num_prompts < 2 or v.eval_group_size < 2:
        raise GradprobeError("validate.eval_num_prompts and validate.eval_group_size must be >= 2")
    if v.is_samples < 2 or v.max_enumerate < 1:
        raise GradprobeError("validate.is_samples must be >= 2 and validate.max_enumerate >= 1")
    if cfg.batch.top_p != 1.0:
        raise GradprobeError("validate needs batch.top_p=1: the entropy is that of the full softmax at the "
                             "sampling temperature")
    if cfg.lora.dropout > 0:
        raise GradprobeError("validate needs lora.dropout=0: with dropout the forward is random and H is undefined")
    if cfg.probe.mode != "exact":
        raise GradprobeError("validate uses probe.mode=exact (one unit per prompt)")


def distinct(prompts: list[list[int]]) -> list[tuple[list[int], float]]:
    """Each distinct prompt once, with its share of the list (a mean over prompts enumerates each once)."""
    counts: dict[tuple[int, ...], int] = {}
    for p in prompts:
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    return [(list(k), c / len(prompts)) for k, c in counts.items()]


class Policy:
    """Samples and entropies of pi_theta for a list of prompts, by enumeration or by sampling."""

    def __init__(self, stack, method: str, temperature: float, max_len: int):
        self.stack, self.method, self.tau, self.max_len = stack, method, temperature, max_len
        self._enums: dict[tuple[int, ...], Any] = {}

    def enumeration(self, prompt: list[int]):
        key = tuple(prompt)
        if key not in self._enums:
            with torch.no_grad():
                self._enums[key] = enumerate_prompt(self.stack, prompt, self.tau, self.max_len)
        return self._enums[key]

    def sample(self, prompts: list[list[int]], n: int, gen: torch.Generator) -> list[list[list[int]]]:
        if self.method == "exact":
            return [sample_enumerated(self.enumeration(p), n, gen) for p in prompts]
        return sample_responses(self.stack, prompts, n, self.tau, self.max_len, gen)

    def entropy(self, prompts: list[list[int]]) -> float:
        """Exact mean entropy over prompts at the current parameters (not cached: theta moves)."""
        with torch.no_grad():
            return sum(w * float(enumerate_prompt(self.stack, p, self.tau, self.max_len).entropy())
                       for p, w in distinct(prompts))


class EntropyChange:
    """H(theta') - H(theta) on fixed prompts, theta the parameters at construction: exact by enumeration, or
    self-normalised importance sampling with `is_samples` draws per distinct prompt made at theta (common
    random numbers for every later theta'; entropy.is_delta_entropy)."""

    def __init__(self, stack, policy: Policy, prompts: list[list[int]], is_samples: int, seed: int):
        self.stack, self.policy, self.prompts = stack, policy, prompts
        if policy.method == "exact":
            self.h0 = policy.entropy(prompts)
            return
        self.distinct, self.shares = (list(x) for x in zip(*distinct(prompts)))
        self.draws = sample_responses(stack, self.distinct, is_samples, policy.tau, policy.max_len,
                                      torch.Generator().manual_seed(seed))
        self.logq = self._scores()
        self.h0 = sum(w * float(-q.mean()) for w, q in zip(self.shares, self.logq))

    def _scores(self) -> list[torch.Tensor]:
        return [score(self.stack, p, r, self.policy.tau) for p, r in zip(self.distinct, self.draws)]

    def measure(self) -> tuple[float, float, float]:
        """(H(theta_now) - H(theta), its SE (0 when exact), the smallest effective sample size (nan when exact))."""
        if self.policy.method == "exact":
            return self.policy.entropy(self.prompts) - self.h0, 0.0, math.nan
        est = is_delta_entropy(self.logq, self._scores(), self.shares)
        return est.delta, est.se, est.ess


def sampled_batch(stack, policy: Policy, prompts: list[list[int]], group_size: int, gen: torch.Generator,
                   temperature: float) -> Batch:
    texts = [_decode(stack.tokenizer, p) for p in prompts]
    groups = []
    for text, prompt, responses in zip(texts, prompts, policy.sample(prompts, group_size, gen)):
        rewards = [float(builtin_reward(text, _decode(stack.tokenizer, r))) for r in responses]
        groups.append(Group(prompt, responses, rewards))
    return Batch(groups, temperature=temperature, meta={"source": "sampled for validate"})


def exact_entropy_grad(stack, prompts: list[list[int]], temperature: float, max_len: int) -> tuple[float, torch.Tensor]:
    """H (mean over prompts) and grad H as a flat fp32 vector, by autograd through the enumeration.
    Read through backward() and .grad, so it works under any checkpointing mode."""
    stack.model.zero_grad(set_to_none=True)
    total = 0.0
    for p, w in distinct(prompts):
        with torch.enable_grad():
            h = enumerate_prompt(stack, p, temperature, max_len).entropy() * w
            h.backward()
        total += float(h.detach())
    grad = torch.zeros(stack.n_params)
    GradReader(stack.params).add(grad)
    stack.model.zero_grad(set_to_none=True)
    return total, grad


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


class _Step:
    """theta + eta d in place under no_grad; restored by copying the saved values back (no drift)."""

    def __init__(self, params: list[torch.nn.Parameter], d: torch.Tensor):
        self.params = params
        self.saved = [p.detach().clone() for p in params]
        self.d = []
        offset = 0
        for p in params:
            self.d.append(d[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype))
            offset += p.numel()

    @torch.no_grad()
    def apply(self, eta: float) -> None:
        for p, s, d in zip(self.params, self.saved, self.d):
            p.copy_(s).add_(d, alpha=eta)

    @torch.no_grad()
    def restore(self) -> None:
        for p, s in zip(self.params, self.saved):
            p.copy_(s)


def _ratio(num: float, num_se: float, den: float, den_se: float) -> tuple[float, float]:
    """num/den and its delta-method SE (independent errors)."""
    if den == 0:
        return math.nan, math.nan
    r = num / den
    rel = (num_se / num) ** 2 if num else 0.0
    rel += (den_se / den) ** 2
    return r, abs(r) * math.sqrt(rel)


@without_cudnn_attention()
def sweep(stack, cfg: Config, progress: Callable[[int, int], None] | None = None,
                 optimizer: Any = None, stage: Callable[[str], None] | None = None) -> ValidateResult:
    """The whole comparison; theta (and `optimizer`, the real step's source when given) is unchanged afterwards.
    `stage` is told each part as it begins (sampling, the probe, the truth at theta, the sweep of points)."""
    stage = stage or (lambda name: None)
    check_config(cfg)
    vcfg, bcfg = cfg.validate, cfg.batch
    vocab = stack.model.get_input_embeddings().num_embeddings
    method = choose_method(cfg, vocab)
    tau, max_len = bcfg.temperature, bcfg.max_new_tokens
    policy = Policy(stack, method, tau, max_len)
    precond = preconditioner(stack, cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # The update batch (a rollouts file when given) and an independent evaluation batch.
    stage("sample")
    gen = torch.Generator().manual_seed(cfg.seed)
    if bcfg.rollouts:
        update = read_rollouts(bcfg.rollouts, stack.tokenizer, vocab, temperature=tau)
        pool = [g.prompt for g in update.groups]
    else:
        pool = [encode_prompt(stack.tokenizer, t) for t in builtin_prompts(stack.tokenizer)]
        update = sampled_batch(stack, policy, [pool[i % len(pool)] for i in range(bcfg.num_prompts)],
                                bcfg.group_size, gen, tau)
    eval_prompts = [pool[i % len(pool)] for i in range(vcfg.eval_num_prompts)]
    gen_eval = torch.Generator().manual_seed(cfg.seed + 7919)
    evaluation = sampled_batch(stack, policy, eval_prompts, vcfg.eval_group_size, gen_eval, tau)
    timings["sample"] = time.perf_counter() - t0

    # d (the real step, or mean_u P grad LY[u]) and the probe's per-unit X_E[u] . d.
    t1 = time.perf_counter()
    stage("probe")
    real = vcfg.direction == "real"
    settings = None
    if real:
        settings, _ = step_source(stack, cfg, precond, optimizer)
        d = real_direction(stack, update, cfg, settings, optimizer).double()
    else:
        d = unit_gradients(stack, update, cfg.probe, precond, kinds=("y",))["y"].mean(0).double()
    x_eval = unit_gradients(stack, evaluation, cfg.probe, precond, kinds=("x",))["x"].double()
    xd = x_eval @ d
    slope_probe = -float(xd.mean())
    slope_probe_se = float(xd.std(unbiased=True)) / math.sqrt(xd.numel())
    timings["probe"] = time.perf_counter() - t1
    if not float(d.norm()) > 0:
        raise GradprobeError("the update direction is zero (all advantages zero?): nothing to validate")

    t2 = time.perf_counter()
    stage("truth at theta")
    slope_exact = grad_cosine = None
    if method == "exact":
        h0, grad_h = exact_entropy_grad(stack, eval_prompts, tau, max_len)
        slope_exact = float(grad_h.double() @ d)
        xbar = x_eval.mean(0)
        grad_cosine = float(-xbar @ grad_h.double() / (xbar.norm() * grad_h.double().norm()))
    truth = EntropyChange(stack, policy, eval_prompts, vcfg.is_samples, cfg.seed + 104729)
    h0 = truth.h0
    timings["truth at theta"] = time.perf_counter() - t2

    theta_norm = float(_flat(stack.params).double().norm())
    d_norm = float(d.norm())
    eta_run = 1.0 if real else learning_rate(cfg, precond)
    n = vcfg.points
    steps = [vcfg.step_min * (vcfg.step_max / vcfg.step_min) ** (k / (n - 1)) for k in range(n)]
    scale = (theta_norm if theta_norm > 0 else 1.0) / d_norm
    t3 = time.perf_counter()
    stage("sweep")
    step = _Step(stack.params, d.float())
    points: list[SweepPoint] = []
    min_ess = math.inf
    try:
        for k, rho in enumerate(steps):
            eta = rho * scale
            step.apply(eta)
            delta, delta_se, ess = truth.measure()
            min_ess = min(min_ess, ess) if method == "importance" else min_ess
            step.restore()
            pred, pred_se = eta * slope_probe, eta * slope_probe_se
            ratio, ratio_se = _ratio(delta, delta_se, pred, pred_se)
            first = eta * slope_exact if slope_exact is not None else None
            points.append(SweepPoint(eta=eta, step=rho, delta_true=delta, delta_true_se=delta_se, predicted=pred,
                                     predicted_se=pred_se, ratio=ratio, ratio_se=ratio_se,
                                     ratio_low=ratio - Z95 * ratio_se, ratio_high=ratio + Z95 * ratio_se,
                                     first_order_exact=first,
                                     ratio_exact=delta / first if first else None))
            if progress:
                progress(k + 1, n)
    finally:
        step.restore()
    timings["sweep"] = time.perf_counter() - t3

    small = points[:2]
    slope_fit = sum(p.eta * p.delta_true for p in small) / sum(p.eta ** 2 for p in small)
    eta_nonlinear = next((p.eta for p in points
                          if slope_fit and abs(p.delta_true / (slope_fit * p.eta) - 1) > NONLINEAR), None)
    return ValidateResult(
        method=method, points=points, entropy=h0, slope_fit=slope_fit, slope_probe=slope_probe,
        slope_probe_se=slope_probe_se, slope_exact=slope_exact, eta_nonlinear=eta_nonlinear,
        grad_cosine=grad_cosine, d_norm=d_norm, theta_norm=theta_norm, eta_run=eta_run,
        step_run=eta_run * d_norm / (theta_norm if theta_norm > 0 else 1.0), n_params=stack.n_params,
        update_units=update.B, update_group_size=update.G, eval_units=evaluation.B,
        eval_group_size=evaluation.G,
        responses_per_prompt=count_responses(vocab, max_len) if method == "exact" else None,
        is_samples=vcfg.is_samples if method == "importance" else None,  # per distinct prompt
        is_min_ess=min_ess if method == "importance" else None, max_len=max_len, temperature=tau,
        precondition=precond.source, autocast=cfg.autocast, timings=timings,
        direction=vcfg.direction, step=step_summary(settings) if settings is not None else {})


def real_direction(stack, update: Batch, cfg: Config, settings, optimizer: Any = None) -> torch.Tensor:
    """The step the optimizer's next step() makes on the update batch's loss -mean_u LY[u], flat fp32: its own
    arithmetic on copies (optim/update.py real_update), the source as step_source resolved it."""
    g = -unit_gradients(stack, update, cfg.probe, Preconditioner(None), kinds=("y",))["y"].mean(0)
    grads = [t.view_as(p) for t, p in zip(g.split([p.numel() for p in stack.params]), stack.params)]
    return torch.cat([t.reshape(-1) for t in real_step(stack, cfg, settings, grads, optimizer)])

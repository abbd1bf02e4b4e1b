"""The next optimizer step's update, reconstructed without taking it (gradprobe/optim/update.py): checked
against real optimizer.step() calls (torch Adam/AdamW/SGD in every implementation, bitsandbytes 8-bit and
32-bit) on real gradients of the tiny 4-bit stack, after a few real steps so that the state has history."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprobe.errors import GradprobeError
from gradprobe.objective import pack, sequence_logprobs
from gradprobe.optim.update import decompose, mapped_state, real_update, step_settings

HISTORY = 3  # real steps before the one that is predicted
# bitsandbytes runs paged optimizers unpaged on a CPU (same arithmetic) and says so each time
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


@pytest.fixture(scope="module")
def stack(fp32_stacks):
    return fp32_stacks["reentrant"]


@pytest.fixture(autouse=True)
def restore(stack):
    """Every test steps the shared stack's adapter for real: put it back afterwards."""
    saved = [p.detach().clone() for p in stack.params]
    yield
    with torch.no_grad():
        for p, s in zip(stack.params, saved):
            p.copy_(s)
            p.grad = None


def loss_grads(stack, seed: int) -> list[torch.Tensor]:
    """The gradient of a real loss (random weights on teacher-forced log-probabilities of random tokens)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randint(3, 40, (4,), generator=gen).tolist(), torch.randint(3, 40, (5,), generator=gen).tolist())
             for _ in range(4)]
    tb = pack(pairs, stack.tokenizer.pad_token_id, stack.device)
    for p in stack.params:
        p.grad = None
    s = sequence_logprobs(stack.model, tb, 1.0, stack.autocast())
    (torch.randn(len(pairs), generator=gen).to(s.device) * s).sum().backward()
    grads = [p.grad.detach().clone() for p in stack.params]
    for p in stack.params:
        p.grad = None
    return grads


def real_step(stack, opt, grads, max_grad_norm=None) -> list[torch.Tensor]:
    """What a training loop does: set the gradients, clip, step. Returns the parameters' change."""
    before = [p.detach().clone() for p in stack.params]
    for p, g in zip(stack.params, grads):
        p.grad = g.clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(stack.params, max_grad_norm)
    opt.step()
    for p in stack.params:
        p.grad = None
    return [p.detach() - b for p, b in zip(stack.params, before)]


def trained(stack, make, steps: int = HISTORY):
    opt = make(stack.params)
    for k in range(steps):
        real_step(stack, opt, loss_grads(stack, 100 + k))
    return opt


def assert_same_state(a, b) -> None:
    """Bitwise equality of two nested state_dicts."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def assert_parts_sum(parts, grads, want, params) -> None:
    """The parts add up to the real update within fp32 rounding of each term (a few ulp of every part: the
    fresh and decay parts of torch Adam's coupled decay can be large and nearly cancel where g ≈ −wd·θ),
    of θ + Δθ, which the real step stores before the difference is taken, and 1e-6 of the update."""
    eps = torch.finfo(torch.float32).eps
    for total, w, p, a, g, m, d in zip(parts.total(grads), want, params, parts.fresh, grads, parts.momentum,
                                       parts.decay):
        terms = (parts.clip_factor * a * g.cpu()).abs() + m.abs() + d.abs() + p.detach().abs().cpu()
        bound = 1e-6 * w.abs().max() + 4 * eps * terms
        assert ((total - w).abs() <= bound).all(), ((total - w).abs() - bound).max()


TORCH = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    # amsgrad with a short β2 memory, so that max(vmax₋, v) differs from v (with 0.999 v only grows early on)
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, amsgrad=True, betas=(0.9, 0.5)),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    "adamw-fused-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True, amsgrad=True,
                                                        betas=(0.9, 0.5)),
    "adamw-single-maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=False,
                                                          maximize=True, betas=(0.8, 0.99), eps=1e-6),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1),
    "adam-wd-amsgrad-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, amsgrad=True, foreach=True,
                                                           betas=(0.9, 0.5)),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.1),
}


def _bnb(name: str, **kw):
    bnb = pytest.importorskip("bitsandbytes")
    return lambda ps: getattr(bnb.optim, name)(ps, lr=1e-3, weight_decay=0.1, **kw)


# min_8bit_size: bitsandbytes keeps tensors under 4096 values in 32-bit state, and every tiny LoRA tensor is
# smaller; 256 makes them all 8-bit (the test checks that they are).
BNB = {"paged-adamw-8bit": ("PagedAdamW8bit", dict(min_8bit_size=256)),
       "adamw-8bit": ("AdamW8bit", dict(min_8bit_size=256)),
       "adam-8bit": ("Adam8bit", dict(min_8bit_size=256)),
       "adamw-32bit": ("AdamW32bit", {}),
       "paged-adamw-32bit": ("PagedAdamW32bit", {})}


def _make(kind: str):
    if kind in TORCH:
        return TORCH[kind]
    name, kw = BNB[kind]
    return _bnb(name, **kw)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("kind", [*TORCH, *BNB])
def test_real_update_is_the_step_and_the_parts_sum_to_it(stack, kind, max_grad_norm):
    opt = trained(stack, _make(kind))
    if "8bit" in kind:
        assert all(opt.state[p]["state1"].dtype == torch.uint8 for p in stack.params)
    grads = loss_grads(stack, 7)
    if "amsgrad" in kind:  # the stored maximum is above the current moment somewhere: amsgrad matters
        assert any((opt.state[p]["max_exp_avg_sq"] > opt.state[p]["exp_avg_sq"]).any() for p in stack.params)
    params_before = [p.detach().clone() for p in stack.params]
    state_before = copy.deepcopy(opt.state_dict())

    predicted = real_update(opt, stack.params, grads, max_grad_norm=max_grad_norm)
    settings = step_settings(opt, stack.names, stack.params, max_grad_norm=max_grad_norm)
    parts = decompose(settings, mapped_state(opt, stack.names, stack.params), stack.names, stack.params, grads)

    # neither call changed the model or the optimizer, bit for bit
    for p, b in zip(stack.params, params_before):
        assert torch.equal(p.detach(), b) and p.grad is None
    assert_same_state(opt.state_dict(), state_before)

    if max_grad_norm is None:
        assert parts.clip_factor == 1.0
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        assert norm > max_grad_norm  # the clip is active, and its factor is clip_grad_norm_'s
        assert parts.clip_factor == pytest.approx(max_grad_norm / (norm + 1e-6), rel=1e-5)
    assert settings.step == (HISTORY + 1 if settings.family == "adam" else 1)  # SGD counts no steps
    assert all(m.abs().max() > 0 for m in parts.momentum)  # the history is really there

    truth = real_step(stack, opt, grads, max_grad_norm)
    for got, want in zip(predicted, truth):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert_parts_sum(parts, grads, truth, params_before)


@pytest.mark.parametrize("kind", ["adamw", "adam-wd", "adamw-8bit"])
def test_the_parts_are_what_each_term_does(stack, kind):
    """Each part on its own: no gradient leaves momentum + decay; no history leaves fresh + decay;
    no weight decay leaves a zero decay part."""
    opt = trained(stack, _make(kind))
    settings = step_settings(opt, stack.names, stack.params)
    state = mapped_state(opt, stack.names, stack.params)
    zero = [torch.zeros_like(p) for p in stack.params]
    parts = decompose(settings, state, stack.names, stack.params, zero)
    assert_parts_sum(parts, zero, real_update(opt, stack.params, zero), stack.params)
    assert all(m.abs().max() > 0 for m in parts.momentum) and all(d.abs().max() > 0 for d in parts.decay)

    fresh = _make(kind)(stack.params)
    grads = loss_grads(stack, 8)
    parts = decompose(step_settings(fresh, stack.names, stack.params), mapped_state(fresh, stack.names, stack.params),
                      stack.names, stack.params, grads)
    assert all(m.abs().max() == 0 for m in parts.momentum)
    assert_parts_sum(parts, grads, real_update(fresh, stack.params, grads), stack.params)
    assert step_settings(fresh, stack.names, stack.params).sources["step"].startswith("assumed: the first step")


def test_settings_are_read_from_a_live_optimizer_and_a_saved_state(stack, tmp_path):
    named = [(n, p) for n, p in zip(stack.names, stack.params)]
    a_names = [n for n in stack.names if "lora_A" in n]
    # two groups in an order other than named_parameters, with different weight decay; built from names,
    # so the saved state carries them
    groups = [{"params": [(n, p) for n, p in named if n not in a_names], "weight_decay": 0.05},
              {"params": [(n, p) for n, p in named if n in a_names], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.85, 0.995), eps=1e-7, amsgrad=True)
    for k in range(HISTORY):
        real_step(stack, opt, loss_grads(stack, 200 + k))
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    want_wd = [0.0 if n in a_names else 0.05 for n in stack.names]

    for source in (opt, opt.state_dict(), path):
        s = step_settings(source, stack.names, stack.params)
        assert (s.optimizer, s.lr, s.betas, s.eps, s.amsgrad, s.maximize) == ("AdamW", 2e-3, (0.85, 0.995), 1e-7,
                                                                              True, False)
        assert s.weight_decays == want_wd and s.weight_decay == 0.05 and s.decoupled
        assert s.step == HISTORY + 1 and s.steps == [HISTORY + 1] * len(stack.params)
        assert s.max_grad_norm is None and s.sources["max_grad_norm"].startswith("assumed: no clipping")
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "step"):
            assert s.sources[key].startswith("read:"), (key, s.sources[key])

    # given values say so; a scheduler.pt beside the file gives the next learning rate
    s = step_settings(path, stack.names, stack.params, lr=1e-4, max_grad_norm=1.0)
    assert s.lr == 1e-4 and s.sources["lr"] == "given: lr"
    assert s.max_grad_norm == 1.0 and s.sources["max_grad_norm"] == "given: max_grad_norm"
    torch.save({"_last_lr": [7e-4, 7e-4]}, tmp_path / "scheduler.pt")
    s = step_settings(path, stack.names, stack.params)
    assert s.lr == 7e-4 and "scheduler.pt" in s.sources["lr"]

    # the saved state (mapped by the names it carries) predicts what the live optimizer does
    grads = loss_grads(stack, 9)
    from_file = real_update(path, stack.params, grads, names=stack.names, lr=2e-3, max_grad_norm=0.05)
    from_dict = real_update(opt.state_dict(), stack.params, grads, names=stack.names, max_grad_norm=0.05)
    truth = real_step(stack, opt, grads, max_grad_norm=0.05)
    for a, b, t in zip(from_file, from_dict, truth):
        torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(b, t, rtol=1e-6, atol=1e-9)


def test_adam_or_adamw_and_bitsandbytes_from_a_saved_state(stack):
    adam = trained(stack, TORCH["adam-wd"], steps=2)
    s = step_settings(adam.state_dict(), stack.names, stack.params)
    assert s.optimizer == "Adam" and not s.decoupled and "decoupled_weight_decay=False" in s.sources["optimizer"]
    grads = loss_grads(stack, 10)
    got = real_update(adam.state_dict(), stack.params, grads, names=stack.names)
    for a, b in zip(got, real_update(adam, stack.params, grads)):
        assert torch.equal(a, b)

    bnb8 = trained(stack, _bnb("PagedAdamW8bit", min_8bit_size=256), steps=2)
    sd = bnb8.state_dict()
    s = step_settings(sd, stack.names, stack.params)
    assert s.library == "bitsandbytes" and s.optimizer == "AdamW8bit" and s.decoupled and s.step == 3
    assert "paged" in s.sources["optimizer"]
    got = real_update(sd, stack.params, grads, names=stack.names)
    parts = decompose(s, mapped_state(sd, stack.names, stack.params), stack.names, stack.params, grads)
    truth = real_step(stack, bnb8, grads)
    for a, t in zip(got, truth):
        torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-9)
    assert_parts_sum(parts, grads, truth, stack.params)


def test_no_optimizer_is_plain_sgd_and_says_so(stack):
    grads = loss_grads(stack, 11)
    s = step_settings(None, stack.names, stack.params, lr=0.01, max_grad_norm=0.05)
    assert s.optimizer == "SGD" and s.sources["optimizer"].startswith("assumed: no optimizer state")
    parts = decompose(s, None, stack.names, stack.params, grads)
    assert parts.clip_factor < 1
    real = real_update(None, stack.params, grads, lr=0.01, max_grad_norm=0.05)
    assert_parts_sum(parts, grads, real, stack.params)
    for a, m, dec in zip(parts.fresh, parts.momentum, parts.decay):
        assert torch.all(a == -0.01) and not m.any() and not dec.any()
    with pytest.raises(GradprobeError, match="plain SGD and needs a learning rate"):
        step_settings(None, stack.names, stack.params)


def test_bad_sources_are_clear_errors(stack, tmp_path):
    opt = trained(stack, TORCH["adamw"], steps=1)
    with pytest.raises(GradprobeError, match="max_grad_norm must be > 0"):
        step_settings(opt, stack.names, stack.params, max_grad_norm=0.0)
    with pytest.raises(GradprobeError, match="not an optimizer"):
        step_settings([1, 2], stack.names, stack.params)
    with pytest.raises(GradprobeError, match="is not supported"):
        step_settings(torch.optim.Adagrad(stack.params), stack.names, stack.params)
    with pytest.raises(GradprobeError, match="does not match the model"):
        step_settings(opt.state_dict(), stack.names[:-2], stack.params[:-2])
    with pytest.raises(GradprobeError, match="optimizer state file not found"):
        step_settings(tmp_path / "missing.pt", stack.names, stack.params)


# ---- the run's own loss: the Y weights of each loss type against TRL's formula, computed here independently

def _loss_batch(advantages=False):
    from gradprobe.rollouts import Batch, Group

    groups = [Group([1, 2], [[3] * 2, [4] * 5, [5] * 3, [6] * 1], [0.5, 1.0, -0.25, 0.0]),
              Group([7], [[3] * 6, [4] * 4, [5] * 6, [6] * 2], [1.0, 1.0, 1.0, 1.0]),  # flat: no signal
              Group([2, 2, 2], [[3] * 3, [4] * 1, [5] * 2, [6] * 4], [2.0, 0.0, 0.0, 1.5], lengths=[4, 2, 2, 5])]
    if advantages:
        groups[0].advantages = [0.3, -0.1, 0.2, -0.4]
    return Batch(groups)


def _trl_token_grads(batch, loss_type, scale_rewards, max_completion_length):
    """TRL GRPOTrainer's loss at the sampling policy (importance ratio exp(lp − lp.detach()) = 1, so its
    clipping is inactive), written from its definition; returns −∂loss/∂logp[i, t] on every loss token."""
    g = len(batch.groups[0].responses)
    rewards = torch.tensor([r for grp in batch.groups for r in grp.rewards], dtype=torch.float64)
    lengths = [n for grp in batch.groups for n in grp.loss_lengths()]
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    if scale_rewards == "group":
        std = rewards.view(-1, g).std(1).repeat_interleave(g)  # Bessel, as TRL's nanstd
    else:
        std = rewards.std().expand_as(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    n, width = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * k + [0.0] * (width - k) for k in lengths], dtype=torch.float64)
    lp = torch.randn(n, width, dtype=torch.float64, requires_grad=True)
    ratio = torch.exp(lp - lp.detach())
    per_token = -ratio * adv[:, None]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n * max_completion_length)
    else:  # dapo: num_items_in_batch = the loss tokens of the whole batch
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    (grad,) = torch.autograd.grad(loss, lp)
    return -grad, mask


@pytest.mark.parametrize("scale_rewards", ["none", "group", "batch"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_y_weights_are_trls_loss(loss_type, scale_rewards):
    from gradprobe.objective import y_weights_for_batch

    batch = _loss_batch()
    weights = y_weights_for_batch(batch, loss_type, scale_rewards, max_completion_length=8)
    want, mask = _trl_token_grads(batch, loss_type, scale_rewards, 8)
    # the probe's batch loss is the mean over the B groups of sum(w * S): S[i]'s weight is w[i] / B, and
    # S[i] is the sum of its tokens' log-probabilities, so every loss token's gradient is w[i] / B
    per_seq = torch.cat(weights) / batch.B
    assert per_seq.abs().max() > 0
    torch.testing.assert_close(per_seq[:, None] * mask, want * mask, rtol=1e-12, atol=1e-15)
    assert torch.all(weights[1] == 0)  # the flat group: TRL gives it nothing either


def test_gradprobes_own_loss_types_and_the_default():
    from gradprobe.objective import group_y_weights, y_weights_for_batch

    batch = _loss_batch()
    for loss_type, scale in (("group_lmax", lambda n: max(n)), ("per_token", lambda n: torch.tensor(n))):
        got = y_weights_for_batch(batch, loss_type)
        for w, grp in zip(got, batch.groups):
            r = torch.tensor(grp.rewards, dtype=torch.float64)
            n = grp.loss_lengths()
            torch.testing.assert_close(w, (r - r.mean()) / scale(n) / len(n), rtol=0, atol=0)
    # the default config is group_lmax, which the probe's per-group path (probe.normalization) agrees with
    from gradprobe.config import load_config
    cfg = load_config()
    assert cfg.probe.loss_type == "group_lmax" and cfg.probe.scale_rewards == "none"
    for w, grp in zip(y_weights_for_batch(batch), batch.groups):
        assert torch.equal(w, group_y_weights(grp, cfg.probe.normalization))
    with pytest.raises(GradprobeError, match="needs the whole batch"):
        group_y_weights(batch.groups[0], "dapo")
    with pytest.raises(GradprobeError, match="max_completion_length"):
        y_weights_for_batch(batch, "dr_grpo")


def test_given_advantages_are_not_rescaled():
    from gradprobe.objective import y_weights_for_batch

    batch = _loss_batch(advantages=True)
    a = y_weights_for_batch(batch, "dapo", "group")
    b = y_weights_for_batch(batch, "dapo", "none")
    assert torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])
    tokens = sum(sum(g.loss_lengths()) for g in batch.groups)
    torch.testing.assert_close(a[0], batch.B * torch.tensor([0.3, -0.1, 0.2, -0.4], dtype=torch.float64) / tokens)

"""`diagnose` on the real tiny 4-bit stack: the seed's bug, one injected fault per root cause, and a healthy run.

Every fault is injected into real components (bitsandbytes 4-bit layers, PEFT LoRA, autograd); each test
asserts the root-cause id, the evidence, and where a claim is about autograd, checks it with its own
torch calls instead of trusting the tool's.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

import gradprobe as gp
from gradprobe import diagnose
from gradprobe.diagnose.model_state import checkpointing_state, short_name
from gradprobe.objective import pack, sequence_logprobs
from gradprobe.rollouts import Batch, Group

# Small batch: 4 prompts x G=4, 8 new tokens; the gradient checks use one microbatch of 8 rows.
SMALL = ["batch.num_prompts=4", "batch.group_size=4", "batch.max_new_tokens=8", "probe.microbatch_size=8"]


def build(*overrides: str):
    cfg = gp.load_config(overrides=[*SMALL, *overrides])
    stack = gp.load_stack(cfg)
    return stack, gp.build_batch(stack, cfg), cfg


@pytest.fixture(scope="module")
def reentrant():
    """The embedded default's checkpointing: the seed's environment."""
    return build()


@pytest.fixture(scope="module")
def healthy():
    return build("checkpointing=non_reentrant")


@contextlib.contextmanager
def restored(stack):
    """Undo what a test does to the shared stack (weights, requires_grad)."""
    saved = [(p, p.detach().clone(), p.requires_grad) for p in stack.model.parameters() if p.is_floating_point()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data, flag in saved:
                p.copy_(data)
                p.requires_grad_(flag)
        stack.model.zero_grad(set_to_none=True)


def s_fn(stack, batch, groups=(0, 1)):
    """A user's own loss-building callable: S over two groups, built with gradprobe's log-prob code."""
    pairs = [(batch.groups[p].prompt, r) for p in groups for r in batch.groups[p].responses]
    tb = pack(pairs, stack.tokenizer.pad_token_id, stack.device)
    return lambda: sequence_logprobs(stack.model, tb, batch.temperature, stack.autocast())


def run_fault(stack, batch, cfg, **kw):
    result = diagnose(stack=stack, batch=batch, cfg=cfg, **kw)
    json.dumps(result.to_dict())  # always serialisable
    return result


def diff(result, factor):
    return next(r for r in result.differential if r.factor == factor)


# ---------------------------------------------------------------- the seed's bug, on the default

def test_default_reentrant_hides_params_from_autograd_grad_only(reentrant):
    stack, batch, cfg = reentrant
    n = len(stack.params)
    hooks_before = {name: len(m._forward_hooks) for name, m in stack.model.named_modules()}
    result = run_fault(stack, batch, cfg)

    # Independent check of the symptom the verdict explains, with plain torch calls.
    loss = s_fn(stack, batch)().sum()
    grads = torch.autograd.grad(loss, stack.params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    stack.model.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.any()) for p in stack.params)
    stack.model.zero_grad(set_to_none=True)

    v = result.verdict
    assert v.root_cause == "reentrant_checkpointing_hides_params"
    assert [c.id for c in v.causes] == ["reentrant_checkpointing_hides_params"]
    strict = result.check("strict_autograd_grad")
    assert strict.status == "fail"
    assert "appears to not have been used in the graph" in strict.evidence["error"]
    assert strict.evidence["unused"] == f"{n}/{n}"
    assert strict.evidence["unused_names"] == [short_name(x) for x in stack.names]
    cov = result.check("coverage").evidence
    assert cov["Y autograd.grad"].startswith(f"0/{n}") and cov["X autograd.grad"].startswith(f"0/{n}")
    assert cov["Y backward"].startswith(f"{n}/{n}") and cov["X backward"].startswith(f"{n}/{n}")
    assert result.check("checkpointing").evidence["mode"] == "reentrant"

    # Confirmed by the differential run; autocast is not the cause.
    nr = diff(result, "checkpointing=non_reentrant")
    assert nr.fixes_all and nr.before["autograd_grad_nonnull"] == 0 and nr.after["autograd_grad_nonnull"] == n
    assert diff(result, "checkpointing=off").fixes_all
    assert not diff(result, "autocast=off").resolved
    assert "checkpointing=non_reentrant" in v.causes[0].confirmed_by
    assert "Confirmed by the differential run" in v.summary

    # The backward() path the probe uses is healthy, and the verdict says so.
    assert v.probe_path_healthy and result.check("probe_path").status == "pass"
    assert "delta-h1" in v.summary and "is healthy" in v.summary
    assert result.exit_code() == 1

    # Nothing left changed on the model.
    assert checkpointing_state(stack.model)["mode"] == "reentrant"
    assert {name: len(m._forward_hooks) for name, m in stack.model.named_modules()} == hooks_before


def test_healthy_non_reentrant_is_healthy_with_exit_0(healthy):
    stack, batch, cfg = healthy
    result = run_fault(stack, batch, cfg)
    assert result.verdict.root_cause == "healthy" and result.verdict.causes == []
    assert [c.name for c in result.checks if c.status != "pass"] == []
    assert result.exit_code() == 0 and result.exit_code("warn") == 0
    assert result.differential == []  # nothing to explain, nothing re-run
    n = len(stack.params)
    assert result.check("coverage").evidence["Y autograd.grad"].startswith(f"{n}/{n}")


def test_user_grads_and_flags_are_put_back(reentrant):
    stack, batch, cfg = reentrant
    marks = [torch.full_like(p, 7.0) for p in stack.params]
    for p, g in zip(stack.params, marks):
        p.grad = g
    try:
        diagnose(stack=stack, batch=batch, cfg=cfg)
        assert all(p.grad is g for p, g in zip(stack.params, marks))
        assert all(p.requires_grad for p in stack.params) and stack.autocast_dtype == torch.bfloat16
    finally:
        stack.model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- one injected fault per root cause

def test_reentrant_without_input_grads_starves_backward_too(reentrant):
    """Without enable_input_require_grads, reentrant blocks record nothing: backward() gets nothing either."""
    stack, batch, cfg = reentrant
    emb = stack.model.get_input_embeddings()
    saved = dict(emb._forward_hooks)
    emb._forward_hooks.clear()  # the fault: no input of the checkpointed blocks requires grad
    try:
        result = run_fault(stack, batch, cfg)
    finally:
        emb._forward_hooks.update(saved)
    n = len(stack.params)
    assert result.verdict.root_cause == "checkpoint_inputs_no_grad"
    assert result.check("input_grads").status == "fail" and result.check("probe_path").status == "fail"
    for factor in ("inputs_require_grad", "checkpointing=non_reentrant"):
        run = diff(result, factor)
        assert run.fixes_all and run.before["backward_nonnull"] == 0 and run.after["backward_nonnull"] == n
    assert not diff(result, "autocast=off").resolved


def test_adapter_loaded_without_is_trainable(healthy, tmp_path):
    from peft import PeftModel

    from gradprobe.stack import Stack, _keep_trainable_4bit_layout, _random_model

    stack, batch, cfg = healthy
    stack.model.save_pretrained(tmp_path)
    base = _random_model("tiny", cfg, stack.device)
    base.config.use_cache = False
    _keep_trainable_4bit_layout(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base, str(tmp_path), is_trainable=False)  # the fault
    frozen = Stack(model=model, tokenizer=stack.tokenizer, device=stack.device, autocast_dtype=torch.bfloat16,
                   checkpointing="non_reentrant")
    frozen.refresh_params()
    assert frozen.params == []  # nothing trainable: diagnose falls back to the adapter weights

    result = run_fault(frozen, batch, cfg)
    n = result.n_params
    assert n == len(stack.params)
    assert result.verdict.root_cause == "adapter_not_trainable"
    assert result.check("adapters").status == "fail"
    assert result.check("adapters").evidence["trainable"] == f"0/{n}"
    assert result.check("probe_path").status == "fail"
    fix = diff(result, "adapters_trainable")
    assert fix.fixes_all and fix.before["backward_nonnull"] == 0 and fix.after["backward_nonnull"] == n
    assert "is_trainable=True" in result.verdict.fix
    assert not any(p.requires_grad for _, p in model.named_parameters())  # put back as found


def test_param_list_captured_before_peft_wrapper(healthy):
    from peft import LoraConfig, get_peft_model

    from gradprobe.stack import _keep_trainable_4bit_layout, _random_model

    stack, batch, cfg = healthy
    base = _random_model("tiny", cfg, stack.device)
    base.config.use_cache = False
    _keep_trainable_4bit_layout(base)
    captured = [p for p in base.parameters() if p.requires_grad]  # the fault: taken before the wrapper
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tb = pack([(batch.groups[0].prompt, r) for r in batch.groups[0].responses], 0, stack.device)

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sequence_logprobs(model, tb, 1.0, torch.autocast("cpu", dtype=torch.bfloat16))

    result = diagnose(model, captured, loss_fn)
    assert result.verdict.root_cause == "param_identity_mismatch"
    ident = result.check("param_identity")
    assert ident.status == "fail"
    assert ident.evidence["trainable_in_list"] == f"0/{len(trainable)}"
    assert ident.evidence["frozen_in_list"] == len(captured)
    assert "before the PEFT wrapper" in result.verdict.summary
    swap = diff(result, "params=model_trainable")
    assert swap.fixes_all and swap.after["backward_nonnull"] == len(trainable)


def test_param_list_of_a_deep_copy(healthy):
    stack, batch, cfg = healthy
    stale = [p for p in copy.deepcopy(stack.model).parameters() if p.requires_grad]
    result = run_fault(stack, batch, cfg, params=stale)
    n = len(stale)
    assert result.verdict.root_cause == "param_identity_mismatch"
    assert result.check("param_identity").evidence["in_model"] == f"0/{n}"
    assert result.check("param_identity").evidence["not_in_model"] == n
    assert result.check("s_alive").evidence["backward(S.sum()) fills"] == f"0/{n}"
    assert diff(result, "params=model_trainable").fixes_all


@pytest.mark.parametrize("cut", ["detach", "float_round_trip"])
def test_s_detached(healthy, cut):
    stack, batch, _ = healthy
    build_s = s_fn(stack, batch)

    def loss_fn():
        s = build_s()
        return s.detach() if cut == "detach" else torch.tensor([float(x) for x in s])

    result = diagnose(stack.model, stack.params, loss_fn)
    assert result.verdict.root_cause == "graph_detached"
    alive = result.check("s_alive")
    assert alive.status == "fail" and alive.evidence["requires_grad"] is False and alive.evidence["grad_fn"] is None
    assert result.verdict.causes[0].evidence["logits_require_grad"] is True
    assert result.check("grad_mode").status == "pass"  # grad mode was on: the cut is in the loss code
    assert not any(r.fixes_all for r in result.differential)


def test_loss_built_under_no_grad(healthy):
    stack, batch, _ = healthy
    build_s = s_fn(stack, batch)

    def loss_fn():
        with torch.no_grad():
            return build_s()

    result = diagnose(stack.model, stack.params, loss_fn)
    assert result.verdict.root_cause == "grad_disabled"
    gm = result.check("grad_mode")
    assert gm.status == "fail" and gm.evidence["grad_enabled_at_forward"] is False
    assert "inside the loss code" in result.verdict.summary


def test_diagnose_called_under_no_grad_is_confirmed_by_forcing_grad_on(healthy):
    stack, batch, _ = healthy
    with torch.no_grad():
        result = diagnose(stack.model, stack.params, s_fn(stack, batch))
    assert result.verdict.root_cause == "grad_disabled"
    assert result.check("grad_mode").evidence["caller_grad_enabled"] is False
    on = diff(result, "grad_mode=on")
    assert on.fixes_all and on.after["backward_nonnull"] == len(stack.params)
    assert result.verdict.causes[0].confirmed_by == ["grad_mode=on"]


def test_every_response_empty(healthy):
    stack, batch, cfg = healthy
    empty = Batch([Group(g.prompt, [[] for _ in g.responses], [0.0, 1.0, 0.0, 1.0]) for g in batch.groups])
    result = run_fault(stack, empty, cfg)
    rows = sum(len(g.responses) for g in batch.groups)
    assert result.verdict.root_cause == "empty_generation"
    gen = result.check("generation")
    assert gen.status == "fail" and gen.evidence["empty_rows"] == f"{rows}/{rows}" and gen.evidence["mean_length"] == 0
    assert result.check("probe_path").status == "fail"
    assert result.verdict.causes[0].evidence["backward_nonzero"] == 0


def test_identical_rewards_mean_no_learning_signal(healthy):
    stack, batch, cfg = healthy
    flat = Batch([Group(g.prompt, g.responses, [0.5] * len(g.responses)) for g in batch.groups])
    result = run_fault(stack, flat, cfg)
    assert result.verdict.root_cause == "no_learning_signal"
    assert result.check("generation").status == "warn"
    assert result.check("probe_path").status == "pass" and result.exit_code() == 0  # expected zeros, not a bug
    assert result.differential == []
    assert result.check("coverage").evidence["Y backward"].endswith("(non-zero 0)")
    assert result.check("coverage").evidence["X backward"].endswith(f"(non-zero {len(stack.params)})")


def test_optimizer_state_missing_for_some_params(healthy, tmp_path):
    stack, batch, cfg = healthy
    with restored(stack):
        opt = torch.optim.AdamW(stack.params, lr=1e-3)
        for i, p in enumerate(stack.params):
            p.grad = torch.randn_like(p) if i % 2 == 0 else None  # odd tensors never get a step
        opt.step()
        stack.model.zero_grad(set_to_none=True)
        missing = [short_name(n) for n, p in zip(stack.names, stack.params) if p not in opt.state]
        result = run_fault(stack, batch, cfg, optimizer=opt)
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        from_file = run_fault(stack, batch, gp.load_config(overrides=[
            *SMALL, "checkpointing=non_reentrant", "probe.precondition=adam",
            f"probe.optimizer_state={tmp_path / 'opt.pt'}"]))
    n = len(stack.params)
    assert len(missing) == n // 2
    assert result.verdict.root_cause == "missing_optimizer_state"
    ev = result.check("optimizer_state").evidence
    assert result.check("optimizer_state").status == "fail"
    assert ev["missing"] == f"{n // 2}/{n}" and ev["missing_names"] == missing
    assert result.verdict.probe_path_healthy  # the gradients themselves are fine
    assert from_file.verdict.root_cause == "missing_optimizer_state"
    assert from_file.check("optimizer_state").evidence["missing_names"] == missing


def test_nan_in_a_lora_weight_outranks_reentrant(reentrant):
    stack, batch, cfg = reentrant
    with restored(stack):
        with torch.no_grad():
            stack.params[2][0, 0] = float("nan")
        result = run_fault(stack, batch, cfg)
    assert [c.id for c in result.verdict.causes] == ["nonfinite_gradients", "reentrant_checkpointing_hides_params"]
    nf = result.check("nonfinite")
    assert nf.status == "fail" and nf.evidence["nonfinite_weight_names"] == [short_name(stack.names[2])]
    assert nf.evidence["nonfinite_grads_Y"] > 0


def test_zero_lora_b_gives_expected_zeros_not_a_bug(healthy):
    stack, batch, cfg = healthy
    with restored(stack):
        with torch.no_grad():
            for name, p in zip(stack.names, stack.params):
                if ".lora_B." in name:
                    p.zero_()  # a fresh adapter with lora.init=zero_b
        result = run_fault(stack, batch, cfg)
    n = len(stack.params)
    assert result.verdict.root_cause == "healthy"
    assert result.check("probe_path").status == "pass"
    assert result.check("coverage").evidence["Y backward"] == f"{n}/{n} (non-zero {n // 2})"
    assert result.verdict.expected_zeros and "lora_B is zero" in result.verdict.expected_zeros[0]


def test_any_module_and_loss_dict_frozen_tensor_in_list():
    """Not only QLoRA stacks: a plain module, a loss dict, a list holding a frozen tensor, a fresh optimizer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(6, 4)

    def loss_fn():
        s = torch.log_softmax(net(x), -1)[:, 0]
        return {"S": s, "LY": (s * torch.linspace(-1, 1, 6)).sum()}

    fresh = diagnose(net, loss_fn=loss_fn, optimizer=torch.optim.AdamW(net.parameters()))
    assert fresh.verdict.root_cause == "healthy"  # no moments before step 1 is expected, not a fault
    assert fresh.check("optimizer_state").status == "warn"
    assert "has not taken a step yet" in fresh.check("optimizer_state").evidence["note"]
    assert fresh.check("probe_path").status == "pass"

    net[0].weight.requires_grad_(False)
    result = diagnose(net, list(net.parameters()), loss_fn)
    assert result.verdict.root_cause == "param_identity_mismatch"
    assert result.check("strict_autograd_grad").evidence["error"] == \
        "One of the differentiated Tensors does not require grad"
    assert result.check("strict_autograd_grad").evidence["unused_names"] == ["0.weight"]
    assert diff(result, "params=model_trainable").after["backward_nonnull"] == 3

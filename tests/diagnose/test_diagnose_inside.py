"""diagnose sees inside the user's loss: real faults on the tiny 4-bit stack through the public API only.

Each fault lives in the user's own code (a loss callable, their model's modes, their optimizer), never in
gradprobe's objects; each test checks the symptom it claims with its own plain torch calls, asserts the
root cause ranked first, its evidence by name, and that the stack is as it was afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

import gradprobe as gp
from gradprobe.objective import pack, sequence_logprobs
from gradprobe.report.diagnose import payload
from tests.cli.test_diagnose_cli import SCHEMA, validate

SMALL = ["batch.num_prompts=4", "batch.group_size=4", "batch.max_new_tokens=8", "probe.microbatch_size=8"]
GROUPS = (0, 1)


def build(*overrides: str):
    cfg = gp.load_config(overrides=[*SMALL, *overrides])
    stack = gp.load_stack(cfg)
    return stack, gp.build_batch(stack, cfg)


@pytest.fixture(scope="module")
def nr():
    """The QLoRA stack with non-reentrant checkpointing (healthy as built)."""
    return build("checkpointing=non_reentrant")


def tokens(stack, batch, groups=GROUPS):
    pairs = [(batch.groups[p].prompt, r) for p in groups for r in batch.groups[p].responses]
    return pack(pairs, stack.tokenizer.pad_token_id, stack.device)


def lengths(batch, groups=GROUPS) -> list[list[int]]:
    return [[len(r) for r in batch.groups[p].responses] for p in groups]


def rewards(batch, groups=GROUPS) -> list[list[float]]:
    return [list(batch.groups[p].rewards) for p in groups]


def s_of(stack, tb, model=None, autocast=None, temperature=1.0):
    return sequence_logprobs(model or stack.model, tb, temperature,
                             autocast if autocast is not None else stack.autocast())


def grads_of(stack, loss) -> list[torch.Tensor | None]:
    """Plain torch: backward() and read param.grad (the independent check)."""
    stack.model.zero_grad(set_to_none=True)
    loss.backward()
    out = [None if p.grad is None else p.grad.detach().clone() for p in stack.params]
    stack.model.zero_grad(set_to_none=True)
    return out


def layer_names(stack, part: str = "") -> list[str]:
    from peft.tuners.lora import LoraLayer

    from gradprobe.diagnose.model_state import short_name

    return [short_name(n) for n, m in stack.model.named_modules() if isinstance(m, LoraLayer) and part in n]


def diff(result, factor):
    return next(r for r in result.differential if r.factor == factor)


def ids(result) -> list[str]:
    """The causes, ranked; and the JSON a script would get validates against the shipped schema."""
    assert validate(payload(result, None, result.exit_code()), SCHEMA, SCHEMA) == []
    return [c.id for c in result.verdict.causes]


# ---------------------------------------------------------------- adapters inside the forward

def test_adapter_disabled_only_inside_the_loss(off):
    stack, batch = off
    tb = tokens(stack, batch)

    def loss_fn():
        with stack.model.disable_adapter():  # the fault: the training forward runs without the adapter
            return s_of(stack, tb)

    assert not loss_fn().requires_grad  # plain torch: no trainable weight takes part in the forward
    result = gp.diagnose(stack.model, stack.params, loss_fn)
    assert ids(result) == ["adapter_disabled"]
    ev = result.verdict.causes[0].evidence
    assert ev["ran_disabled"] == layer_names(stack) and ev["disabled_only_in_loss"] is True
    assert "only while the loss ran" in result.verdict.summary
    assert result.check("adapters").status == "pass"  # read after the loss, the adapters look fine
    assert result.check("adapter_forward").status == "fail"
    assert result.check("adapter_forward").evidence["took_part"] == f"0/{len(layer_names(stack))}"
    assert result.exit_code() == 1


@pytest.mark.slow
def test_reference_forward_without_adapter_next_to_the_policy_forward_is_healthy(nr):
    """TRL's pattern: a no-grad reference forward with the adapter disabled, then the policy forward."""
    stack, batch = nr
    tb = tokens(stack, batch)

    def loss_fn():
        with torch.no_grad(), stack.model.disable_adapter():
            ref = s_of(stack, tb)
        s = s_of(stack, tb)
        return {"S": s, "LY": (s - 0.1 * (s - ref)).sum()}

    result = gp.diagnose(stack.model, stack.params, loss_fn)
    assert result.verdict.root_cause == "healthy", result.verdict.summary
    assert result.check("adapter_forward").status == "pass"


@pytest.mark.slow
def test_disabled_adapter_under_reentrant_recomputation_is_named_though_gradients_arrive():
    """Reentrant checkpointing recomputes with the adapter enabled again: gradients arrive, but they are wrong."""
    stack, batch = build("checkpointing=reentrant")
    tb = tokens(stack, batch)

    def faulty():
        with stack.model.disable_adapter():
            return s_of(stack, tb)

    bad = grads_of(stack, faulty().sum())
    good = grads_of(stack, s_of(stack, tb).sum())
    assert all(g is not None for g in bad)  # plain torch: every LoRA tensor gets a gradient ...
    num = sum(float((b - g).pow(2).sum()) for b, g in zip(bad, good)) ** 0.5
    assert num > 1e-3 * sum(float(g.pow(2).sum()) for g in good) ** 0.5  # ... of another function
    result = gp.diagnose(stack.model, stack.params, faulty)
    assert result.verdict.root_cause == "adapter_disabled"
    assert "yet backward() fills them" in result.verdict.summary
    assert result.verdict.causes[0].evidence["ran_disabled"] == layer_names(stack)


def test_adapter_disabled_in_the_forward_ranks_above_the_recompute_mismatch_it_causes(nr):
    """Issue 26: the disabled adapter is the upstream cause; the CheckpointError is listed under it."""
    stack, batch = nr
    tb = tokens(stack, batch)

    def loss_fn():
        with stack.model.disable_adapter():
            return s_of(stack, tb)

    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # plain torch: backward raises
        loss_fn().sum().backward()
    stack.model.zero_grad(set_to_none=True)
    result = gp.diagnose(stack.model, stack.params, loss_fn)
    assert ids(result) == ["adapter_disabled", "checkpoint_recompute_mismatch"]
    assert result.verdict.causes[0].evidence["ran_disabled"] == layer_names(stack)
    assert "recomputation in backward" in result.verdict.causes[0].summary
    first = result.verdict.causes[1]
    assert first.after == "adapter_disabled" and "(a consequence of adapter_disabled)" in result.verdict.summary
    assert first.evidence["phase"] == "backward" and first.evidence["exception"] == "CheckpointError"
    assert first.evidence["adapter_layers_off_at_forward"] == layer_names(stack)
    runs = result.check("loss_runs")
    assert runs.status == "fail" and runs.evidence["class"] == "checkpoint_recompute_mismatch"
    assert "backward_error" in diff(result, "checkpointing=off").resolved  # without checkpointing it runs
    assert first.confirmed_by == ["checkpointing=off"]
    # the checks that need no gradient still ran
    assert result.check("param_identity").status == "pass" and result.check("quantization").status == "pass"


def test_lora_layers_bypassed_inside_the_loss(off):
    stack, batch = off
    tb = tokens(stack, batch)
    model = stack.model

    @contextlib.contextmanager
    def v_proj_without_lora():
        swapped = []
        for name, mod in model.named_modules():
            if name.endswith("self_attn") and hasattr(mod.v_proj, "base_layer"):
                swapped.append((mod, mod.v_proj))
                mod.v_proj = mod.v_proj.base_layer  # the fault: the forward goes around the LoRA layer
        try:
            yield
        finally:
            for mod, layer in swapped:
                mod.v_proj = layer

    def loss_fn():
        with v_proj_without_lora():
            return s_of(stack, tb)

    got = grads_of(stack, loss_fn().sum())
    missing = [n for n, g in zip(stack.names, got) if g is None]
    assert missing and all(".v_proj." in n for n in missing)  # plain torch: exactly the v_proj adapters
    result = gp.diagnose(model, stack.params, loss_fn)
    assert ids(result) == ["adapter_bypassed"]
    ev = result.verdict.causes[0].evidence
    assert ev["never_ran"] == layer_names(stack, "v_proj") and ev["other_adapter_active"] == []
    assert "never ran during the loss" in result.verdict.summary
    assert len(ev["never_ran"]) == 2 and [n for n in layer_names(stack) if n not in ev["never_ran"]]


def test_loss_runs_a_copy_of_the_model(off):
    stack, batch = off
    tb = tokens(stack, batch)
    stale = copy.deepcopy(stack.model)  # the fault: the loss closes over another model object

    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb, model=stale))
    assert result.verdict.root_cause == "adapter_bypassed"
    ev = result.verdict.causes[0].evidence
    assert ev["never_ran"] == layer_names(stack) and ev["model_forward_calls"] == 0
    assert "runs another module" in result.verdict.summary


def test_other_adapter_active_during_the_forward(off):
    from peft import LoraConfig

    stack, batch = off
    tb = tokens(stack, batch)
    model = stack.model
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.set_adapter("default")
    for p in stack.params:
        p.requires_grad_(True)

    def loss_fn():
        model.set_adapter("other")  # the fault: the loss switches to another adapter and back
        try:
            return s_of(stack, tb)
        finally:
            model.set_adapter("default")

    try:
        assert all(g is None for g in grads_of(stack, loss_fn().sum()))
        result = gp.diagnose(model, stack.params, loss_fn)
    finally:
        model.delete_adapter("other")
        model.set_adapter("default")
        for p in stack.params:
            p.requires_grad_(True)
    assert result.verdict.root_cause == "adapter_bypassed"
    ev = result.verdict.causes[0].evidence
    assert ev["other_adapter_active"] == layer_names(stack)  # set_adapter switches every layer
    assert set(ev["never_ran"]) == set() and "another adapter active (other)" in result.verdict.summary


# ---------------------------------------------------------------- mode and precision

@contextlib.contextmanager
def lora_dropout(model, p: float):
    """What LoraConfig(lora_dropout=p) builds: an nn.Dropout in each LoRA layer's dropout slot."""
    saved = []
    for mod in model.modules():
        slots = getattr(mod, "lora_dropout", None)
        if isinstance(slots, torch.nn.ModuleDict) and "default" in slots:
            saved.append((slots, slots["default"]))
            slots["default"] = torch.nn.Dropout(p)
    try:
        yield
    finally:
        for slots, layer in saved:
            slots["default"] = layer


@contextlib.contextmanager
def eval_mode(model):
    model.eval()
    try:
        yield
    finally:
        model.train()


def test_eval_mode_with_dropout_changes_the_gradient(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    with lora_dropout(stack.model, 0.3), eval_mode(stack.model):
        a, b = (grads_of(stack, s_of(stack, tb).sum()) for _ in range(2))
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # eval: deterministic
        with torch.random.fork_rng():
            stack.model.train()
            t = grads_of(stack, s_of(stack, tb).sum())
            stack.model.eval()
        assert any(not torch.allclose(x, y) for x, y in zip(a, t))  # train mode: dropout changes it
        result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb))
        assert not stack.model.training  # put back as found
    assert ids(result) == ["eval_mode"]
    ev = result.verdict.causes[0].evidence
    assert ev["training_at_forward"] is False and ev["grad_rel_change"] > 0.05
    assert any("lora_dropout" in d for d in ev["dropout"])
    assert result.verdict.causes[0].confirmed_by == ["train_mode"]
    assert result.check("train_mode").status == "fail"


def test_eval_mode_without_dropout_is_healthy_and_says_why(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    with eval_mode(stack.model):
        result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb))
    assert result.verdict.root_cause == "healthy"
    assert "eval mode; no dropout with p > 0" in result.verdict.summary
    assert result.check("train_mode").status == "warn" and result.exit_code() == 0


@pytest.mark.slow
def test_gradient_underflow_in_fp16(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    fp16 = torch.autocast("cpu", dtype=torch.float16)

    def loss_fn():  # the fault: fp16 forward and a loss divided by a huge count, no loss scaling
        return s_of(stack, tb, autocast=fp16).sum() * 1e-9

    zero = grads_of(stack, loss_fn())
    assert all(g is not None and not g.any() for g in zero)  # plain torch: exactly zero everywhere
    scaled = grads_of(stack, loss_fn() * 65536)
    assert all(g.any() for g in scaled)  # and back when the loss is scaled
    result = gp.diagnose(stack.model, stack.params, loss_fn)
    assert ids(result) == ["gradient_underflow"]
    ev = result.verdict.causes[0].evidence
    assert ev["zero_tensors"] == len(stack.params) and ev["nonzero_after_scaling"] == len(stack.params)
    assert "float16" in ev["adapter_input_dtypes"] and ev["autocast_at_forward"] == "float16"
    assert result.verdict.causes[0].confirmed_by == ["loss_scale=65536"]


# ---------------------------------------------------------------- losses that raise

def test_inputs_created_under_inference_mode(nr):
    stack, batch = nr
    with torch.inference_mode():
        tb = tokens(stack, batch)  # the fault: the loss's inputs come from the generation block
    with pytest.raises(RuntimeError, match="Inference tensors"):
        s_of(stack, tb)
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb))
    assert ids(result) == ["inference_tensors"]
    assert result.verdict.causes[0].evidence["phase"] == "loss"
    assert result.check("loss_runs").status == "fail"
    assert result.check("probe_path").evidence == {"not_measured": "the loss function raised (see loss_runs)"}
    assert result.check("param_identity").status == "pass" and result.check("adapters").status == "pass"


def test_float_token_ids_are_a_dtype_mismatch(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    bad = dataclasses.replace(tb, input_ids=tb.input_ids.float())  # the fault: ids built as floats
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, bad))
    assert ids(result) == ["dtype_mismatch"]  # the adapter layers never ran, but that is not a second cause
    assert "indices" in result.verdict.causes[0].evidence["message"]


def test_advantages_never_materialised_are_a_device_mismatch(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    adv = torch.zeros(8, device="meta")  # the fault: a tensor left on the meta device

    result = gp.diagnose(stack.model, stack.params, lambda: (s_of(stack, tb) * adv).sum())
    assert result.verdict.root_cause == "device_mismatch"
    assert "device" in result.verdict.causes[0].evidence["message"]


def test_other_exceptions_of_the_loss(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    stats: dict = {}

    def loss_fn():
        s = s_of(stack, tb)
        return (s * stats["advantages"]).sum()  # the fault: a KeyError in the user's code

    result = gp.diagnose(stack.model, stack.params, loss_fn)
    assert result.verdict.root_cause == "loss_exception"
    assert result.verdict.causes[0].evidence["exception"] == "KeyError"


# ---------------------------------------------------------------- what the loss measured; ranking

@pytest.mark.slow
def test_identical_rewards_from_the_api_mean_no_learning_signal(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    flat = [[0.5] * 4, [0.5] * 4]

    def loss_fn():  # the user's GRPO loss: group-centred advantages, all zero here
        s = s_of(stack, tb)
        adv = torch.tensor([r - sum(g) / len(g) for g in flat for r in g])
        return {"S": s, "LY": (s * adv).sum()}

    assert all(not g.any() for g in grads_of(stack, loss_fn()["LY"]))
    result = gp.diagnose(stack.model, stack.params, loss_fn, rewards=flat, lengths=lengths(batch))
    assert result.verdict.root_cause == "no_learning_signal" and result.exit_code() == 0
    without = gp.diagnose(stack.model, stack.params, loss_fn, run_differential=False)  # not told: unexplained
    assert without.verdict.root_cause == "unexplained_missing_gradients"


@pytest.mark.slow
def test_empty_responses_from_the_api(nr):
    stack, batch = nr
    pairs = [(batch.groups[p].prompt, []) for p in GROUPS for _ in batch.groups[p].responses]
    tb = pack(pairs, stack.tokenizer.pad_token_id, stack.device)  # the fault: generation produced nothing
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), rewards=rewards(batch),
                         lengths=[[0] * 4, [0] * 4])
    assert result.verdict.root_cause == "empty_generation"
    assert result.check("generation").evidence["empty_rows"] == "8/8"


def test_optimizer_missing_params_ranks_before_the_identity_it_implies(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    half = stack.params[: len(stack.params) // 2]
    opt = torch.optim.AdamW(half, lr=1e-4)  # the fault: the optimizer is built over part of the list
    saved = [p.detach().clone() for p in half]
    try:
        for p in stack.params:
            p.grad = torch.randn_like(p)
        opt.step()
        stack.model.zero_grad(set_to_none=True)
        result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), optimizer=opt)
    finally:
        with torch.no_grad():  # undo the step on the shared stack
            for p, data in zip(half, saved):
                p.copy_(data)
    assert ids(result) == ["missing_optimizer_state", "param_identity_mismatch"]
    assert result.verdict.causes[0].evidence["missing"] == len(stack.params) - len(half)


# ---------------------------------------------------------------- old log-probs

@pytest.mark.slow
def test_old_logprobs_sampled_at_another_temperature(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    with torch.no_grad():
        same = s_of(stack, tb)
        hot = s_of(stack, tb, temperature=0.7)  # the fault: sampled at 0.7, recomputed at 1.0
    ok = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=same.tolist(),
                     lengths=lengths(batch), rewards=rewards(batch))
    assert ok.verdict.root_cause == "healthy" and ok.check("old_logprobs").evidence["result"] == "match"
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=hot.tolist(),
                         lengths=lengths(batch), rewards=rewards(batch))
    assert ids(result) == ["logprob_mismatch"]
    ev = result.verdict.causes[0].evidence
    assert ev["kind"] == "temperature" and abs(ev["old_fits_temperature"] - 0.7) < 0.03
    assert abs(ev["loss_fits_temperature"] - 1.0) < 0.03
    gap = float((hot - same).abs().mean())
    assert ev["mean_gap"] == pytest.approx(gap, abs=1e-3)  # the size of the gap, computed independently


@pytest.mark.slow
def test_old_logprobs_of_a_truncated_response(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    lens = [n for g in lengths(batch) for n in g]
    with torch.no_grad():
        out = stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                          use_cache=False)
        lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, tb.input_ids[:, 1:, None])[..., 0]
    per_token = [lp[i, lp.shape[1] - n:].tolist()[:-1] for i, n in enumerate(lens)]  # the fault: last token lost
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=per_token,
                         lengths=lengths(batch), rewards=rewards(batch))
    assert result.verdict.root_cause == "logprob_mismatch"
    ev = result.verdict.causes[0].evidence
    assert ev["kind"] == "truncation" and ev["rows_with_other_token_count"] == len(lens)


def test_bad_api_input_is_one_clear_error(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    with pytest.raises(gp.GradprobeError, match="one list per group"):
        gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), rewards=[[1.0, 0.0]], lengths=[[1], [2]])
    with pytest.raises(gp.GradprobeError, match="old_logprobs has 3 sequences"):
        gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=[0.0, 1.0, 2.0])


@pytest.mark.slow
def test_old_logprobs_against_a_loss_that_ignores_the_padding(nr):
    stack, batch = nr
    tb = tokens(stack, batch)
    with torch.no_grad():
        sampled = s_of(stack, tb)  # what the sampler saw: left padding masked out
    keep = tb.max_response + 1

    def loss_fn():  # the fault: the recomputation passes no attention mask, so padded rows attend to the pads
        with stack.autocast():
            z = stack.model(input_ids=tb.input_ids, logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
        picked = z.gather(-1, tb.input_ids[:, -keep + 1:, None])[..., 0] - torch.logsumexp(z, -1)
        return torch.where(tb.gen_mask[:, -keep + 1:], picked, torch.zeros(())).sum(-1)

    padded = (tb.attention_mask == 0).any(-1)
    with torch.no_grad():
        gap = (loss_fn() - sampled).abs()
    assert padded.any() and (~padded).any()
    assert float(gap[~padded].max()) == 0.0 and float(gap[padded].min()) > 0.0  # plain torch: padded rows only
    result = gp.diagnose(stack.model, stack.params, loss_fn, old_logprobs=sampled.tolist(), lengths=lengths(batch),
                         rewards=rewards(batch))
    assert ids(result) == ["logprob_mismatch"]
    ev = result.verdict.causes[0].evidence
    assert ev["kind"] == "padding" and ev["padded_rows"] == int(padded.sum())
    assert ev["mean_gap"] == pytest.approx(float(gap.mean()), abs=1e-3)

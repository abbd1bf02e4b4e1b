"""The failure modes users report (issue 26), each rebuilt on the tiny 4-bit stack from its public report.

Every test builds the fault in user code as the report describes, proves with plain torch that it is real,
calls `gradprobe.diagnose` the way a user would, and runs a healthy look-alike that must stay healthy.
"""

from __future__ import annotations

import contextlib

import torch

import gradprobe as gp
from tests.diagnose.test_diagnose_inside import grads_of, ids, layer_names, lengths, rewards, s_of, tokens


@contextlib.contextmanager
def second_adapter(model, name: str, **kw):
    """Add a second LoRA adapter for one test; the model is put back with only `default` active and trainable."""
    from peft import LoraConfig

    model.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", **kw))
    try:
        yield
    finally:
        model.set_adapter("default")
        model.delete_adapter(name)
        model.set_adapter("default")
        for n, p in model.named_parameters():
            if ".default." in n:
                p.requires_grad_(True)


def token_logprobs(stack, tb) -> torch.Tensor:
    """Plain torch: log p(token t+1 | up to t) at every column of a forward over all positions [n, T-1]."""
    with stack.autocast():
        z = stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                        use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(z, -1).gather(-1, tb.input_ids[:, 1:, None])[..., 0]


# ---------------------------------------------------------------- a list from an adapter no longer active

def test_list_of_an_adapter_switched_away_is_named_before_its_consequences(off):
    """peft #3580: two adapters; set_adapter("other") after the list and optimizer were built from `default`."""
    stack, batch = off
    tb = tokens(stack, batch)
    model = stack.model
    with second_adapter(model, "other", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]):
        model.set_adapter("other")  # the fault: the training loop switches adapters; the list keeps `default`
        got = grads_of(stack, s_of(stack, tb).sum())
        other = [p for n, p in model.named_parameters() if ".other." in n]
        assert all(g is None for g in got) and all(p.requires_grad for p in other)  # plain torch: the list is idle
        result = gp.diagnose(model, stack.params, lambda: s_of(stack, tb))
        model.set_adapter("default")  # the look-alike: two adapters, the one the list holds active
        healthy = gp.diagnose(model, stack.params, lambda: s_of(stack, tb))
    assert ids(result) == ["params_from_inactive_adapter", "adapter_bypassed", "param_identity_mismatch"]
    assert [c.after for c in result.verdict.causes] == [None] + ["params_from_inactive_adapter"] * 2
    ev = result.verdict.causes[0].evidence
    assert ev["list_adapters"] == ["default"] and ev["active_adapters"] == ["other"]
    assert len(ev["ran_with_other"]) == len(layer_names(stack))
    assert "set_adapter" in result.verdict.fix
    assert healthy.verdict.root_cause == "healthy", healthy.verdict.summary


# ---------------------------------------------------------------- the loss's token mask is empty

def _masked_loss(stack, tb, keep: int):
    """A user's SFT-style loss: the rows truncated to `keep` columns inside the loss, a token mean over the
    response mask that survives, guarded against 0/0 as FederatedScope and OLMo-core do (max(count, 1))."""
    ids, mask = tb.input_ids[:, :keep], tb.gen_mask[:, 1:keep]

    def loss_fn():
        with stack.autocast():
            z = stack.model(input_ids=ids, attention_mask=tb.attention_mask[:, :keep],
                            position_ids=tb.position_ids[:, :keep], use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return -(lp * mask).sum() / mask.sum().clamp(min=1)

    return loss_fn, mask


def test_truncation_inside_the_loss_that_removes_every_response_token(off):
    """FederatedScope #625, OLMo-core #452: max_length cuts the rows before the response starts."""
    stack, batch = off
    tb = tokens(stack, batch)
    width = tb.input_ids.shape[1]
    loss_fn, mask = _masked_loss(stack, tb, width - tb.max_response)  # the fault: every response token cut
    assert int(mask.sum()) == 0 and int(tb.gen_mask.sum()) > 0  # plain torch: the batch has responses, the mask none
    assert all(g is not None and not g.any() for g in grads_of(stack, loss_fn()))  # gradients exactly zero
    result = gp.diagnose(stack.model, stack.params, loss_fn, lengths=lengths(batch), rewards=rewards(batch))
    assert ids(result) == ["empty_loss_mask"]
    ev = result.verdict.causes[0].evidence
    assert ev["positions_in_loss"] == 0 and ev["response_tokens"] == int(tb.gen_mask.sum())
    assert result.check("loss_mask").status == "fail"
    good, _ = _masked_loss(stack, tb, width)  # the look-alike: truncation that leaves the responses in
    healthy = gp.diagnose(stack.model, stack.params, good, lengths=lengths(batch), rewards=rewards(batch))
    assert healthy.verdict.root_cause == "healthy", healthy.verdict.summary
    assert healthy.check("loss_mask").evidence["reached"] > 0


def test_every_label_masked_is_named_not_the_nan_it_causes(off):
    """TRL #1191, #1920: the completion template is never found, so every label is -100 and the mean is 0/0."""
    stack, batch = off
    tb = tokens(stack, batch)

    def loss_with(labels):
        def loss_fn():
            with stack.autocast():
                return stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                                   position_ids=tb.position_ids, labels=labels, use_cache=False).loss
        return loss_fn

    none = torch.full_like(tb.input_ids, -100)  # the fault: the collator masked everything
    with torch.no_grad():
        assert torch.isnan(loss_with(none)())  # plain torch: the loss is NaN
    result = gp.diagnose(stack.model, stack.params, loss_with(none), lengths=lengths(batch))
    assert ids(result)[0] == "empty_loss_mask"
    assert result.verdict.causes[0].evidence["labels_given"] is True
    assert result.verdict.causes[0].evidence["label_tokens"] == 0
    assert "every label is the ignore index -100" in result.verdict.summary
    assert [c.after for c in result.verdict.causes[1:]] == ["empty_loss_mask"] * (len(result.verdict.causes) - 1)
    assert "nonfinite_gradients" in ids(result)  # the NaN, listed under the mask that causes it
    found = torch.where(tb.gen_mask, tb.input_ids, torch.full_like(tb.input_ids, -100))  # the template found
    healthy = gp.diagnose(stack.model, stack.params, loss_with(found), lengths=lengths(batch))
    assert healthy.verdict.root_cause == "healthy", healthy.verdict.summary


def test_own_token_mean_over_an_empty_mask_is_nan(off):
    """The 0/0 of a hand-written token mean (TRL #1920's symptom without transformers' loss): NaN, not zero."""
    stack, batch = off
    tb = tokens(stack, batch)
    mask = torch.zeros_like(tb.gen_mask[:, 1:])  # the fault: the response mask marks nothing

    def loss_fn():
        lp = token_logprobs(stack, tb)
        return -(lp * mask).sum() / mask.sum()

    got = grads_of(stack, loss_fn())
    assert torch.isnan(loss_fn()) and all(torch.isnan(g).all() for g in got)  # plain torch: NaN everywhere
    result = gp.diagnose(stack.model, stack.params, loss_fn, lengths=lengths(batch), rewards=rewards(batch))
    assert ids(result) == ["empty_loss_mask", "nonfinite_gradients"]
    ev = result.verdict.causes[0].evidence
    assert ev["nan_positions"] > 0 and ev["positions_in_loss"] == 0 and ev["loss_finite"] is False
    assert result.verdict.causes[1].after == "empty_loss_mask"


# ---------------------------------------------------------------- a dead adapter

@contextlib.contextmanager
def cleared(stack, which: tuple[str, ...]):
    saved = [(p, p.detach().clone()) for n, p in zip(stack.names, stack.params) if any(w in n for w in which)]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.copy_(data)


def test_dead_adapter_both_lora_matrices_zero(off):
    """SkyRL #852 (a cleared slot reused), or LoRA added before init_weights: A = B = 0."""
    stack, batch = off
    tb = tokens(stack, batch)
    with cleared(stack, (".lora_A.", ".lora_B.")):
        opt = torch.optim.SGD(stack.params, lr=1.0)
        for _ in range(2):  # plain torch: zero gradients, and after real steps the adapter is still all zero
            got = grads_of(stack, s_of(stack, tb).sum())
            assert all(g is not None and not g.any() for g in got)
            for p, g in zip(stack.params, got):
                p.grad = g
            opt.step()
        assert all(not p.any() for p in stack.params)
        stack.model.zero_grad(set_to_none=True)
        result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb))
    assert ids(result) == ["dead_adapter"]
    ev = result.verdict.causes[0].evidence
    assert ev["zero_tensors"] == len(stack.params) and ev["dead_layers"] == len(layer_names(stack))
    assert result.check("adapters").status == "fail" and not result.verdict.expected_zeros  # dead, not fresh
    with cleared(stack, (".lora_B.",)):  # the look-alike: a fresh adapter, lora_B zero and lora_A random
        fresh = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb))
    assert fresh.verdict.root_cause == "healthy" and fresh.verdict.expected_zeros, fresh.verdict.summary


# ---------------------------------------------------------------- one loss term cut from the graph

def _entropy(stack, tb, grad: bool) -> torch.Tensor:
    keep = tb.max_response + 1
    with contextlib.nullcontext() if grad else torch.no_grad(), stack.autocast():
        z = stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                        logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    mask = tb.gen_mask[:, -keep + 1:]
    return (ent * mask).sum() / mask.sum()


def test_entropy_bonus_computed_under_no_grad(off):
    """TRL PR #5595/#5596: the entropy bonus moves the loss value, never the gradient."""
    stack, batch = off
    tb = tokens(stack, batch)
    adv = torch.linspace(-1.0, 1.0, tb.input_ids.shape[0])

    def loss_with(coef: float, grad: bool):
        def loss_fn():
            s = s_of(stack, tb)
            pg, bonus = -(s * adv).sum(), -coef * _entropy(stack, tb, grad)
            return {"S": s, "loss": pg + bonus, "terms": {"policy": pg, "entropy": bonus}}
        return loss_fn

    with torch.no_grad():  # plain torch: the coefficient changes the value ...
        assert float(loss_with(0.0, False)()["loss"]) != float(loss_with(0.5, False)()["loss"])
    a, b = (grads_of(stack, loss_with(c, False)()["loss"]) for c in (0.0, 0.5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # ... and not the gradient
    result = gp.diagnose(stack.model, stack.params, loss_with(0.5, False))
    assert ids(result) == ["loss_term_detached"]
    ev = result.verdict.causes[0].evidence
    assert ev["cut_terms"] == ["entropy"] and ev["terms_in_gradient"] == ["policy"]
    assert result.check("loss_terms").status == "fail"
    healthy = gp.diagnose(stack.model, stack.params, loss_with(0.5, True))  # the look-alike: with grad
    assert healthy.verdict.root_cause == "healthy", healthy.verdict.summary
    assert healthy.check("loss_terms").status == "pass" and "cut" not in healthy.check("loss_terms").evidence
    untold = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), run_differential=False)
    assert "not given" in untold.check("loss_terms").evidence["terms"]  # says what it could not check

    def flat(grad: bool):  # a dict of terms alone (the loss is their sum), as a trainer's loss parts come
        def loss_fn():
            s = s_of(stack, tb)
            return {"policy": -(s * adv).sum(), "entropy": -0.5 * _entropy(stack, tb, grad)}
        return loss_fn

    assert ids(gp.diagnose(stack.model, stack.params, flat(False))) == ["loss_term_detached"]
    assert gp.diagnose(stack.model, stack.params, flat(True)).verdict.root_cause == "healthy"

    def logged():  # the look-alike: a no-grad metric logged next to the loss is not a term of it
        s = s_of(stack, tb)
        return {"loss": -(s * adv).sum(), "entropy_metric": _entropy(stack, tb, False)}

    def at_reference():  # the look-alike: a KL term with a graph whose gradient is zero at the reference point
        s = s_of(stack, tb)
        kl = (s - s.detach()).pow(2).sum()
        return {"loss": -(s * adv).sum() + kl, "terms": {"policy": -(s * adv).sum(), "kl": kl}}

    ref = gp.diagnose(stack.model, stack.params, at_reference)
    assert ref.verdict.root_cause == "healthy" and "no graph" not in str(ref.check("loss_terms").evidence)
    quiet = gp.diagnose(stack.model, stack.params, logged)
    assert quiet.verdict.root_cause == "healthy" and "not given" in quiet.check("loss_terms").evidence["terms"]


# ---------------------------------------------------------------- updates lost to precision

def test_dora_magnitude_in_bf16_never_moves(off):
    """TRL #7268: DoRA's magnitude vector downcast with the adapter; AdamW's steps round away in bf16."""
    stack, batch = off
    tb = tokens(stack, batch)
    model = stack.model
    with second_adapter(model, "dora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True):
        model.set_adapter("dora")
        mags = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
        for p in mags:
            p.data = p.data.to(torch.bfloat16)  # the fault: the magnitude is held in bf16
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn():
            return s_of(stack, tb)

        def run(lr: float):
            opt = torch.optim.AdamW(params, lr=lr)
            start = [p.detach().clone() for p in params]
            for _ in range(2):  # plain torch: real AdamW steps on real gradients
                opt.zero_grad(set_to_none=True)
                loss_fn().sum().backward()
                assert all(p.grad is not None and p.grad.any() for p in mags)
                opt.step()
            opt.zero_grad(set_to_none=True)
            moved = {id(p): not torch.equal(p.detach(), s) for p, s in zip(params, start)}
            out = gp.diagnose(model, params, loss_fn, optimizer=opt)
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            return out, moved

        result, moved = run(1e-5)
        assert not any(moved[id(p)] for p in mags) and all(v for k, v in moved.items() if k not in map(id, mags))
        fine, moved_fast = run(1e-2)  # the look-alike: the same bf16 tensor with steps it can hold
        assert all(moved_fast[id(p)] for p in mags)
    assert ids(result) == ["update_lost_to_precision"]
    ev = result.verdict.causes[0].evidence
    assert len(ev["tensors"]) == len(mags) and all("lora_magnitude_vector" in n for n in ev["tensors"])
    assert ev["dtype"] == "bfloat16" and result.check("update_precision").status == "fail"
    assert fine.verdict.root_cause == "healthy", fine.verdict.summary
    assert fine.check("update_precision").status == "pass"


def test_fp16_with_a_grad_scaler_on_float32_weights_is_healthy(off):
    """The look-alike of the precision faults: fp16 compute, a GradScaler-scaled loss, fp32 LoRA, AdamW."""
    stack, batch = off
    tb = tokens(stack, batch)
    fp16 = torch.autocast("cpu", dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    opt = torch.optim.AdamW(stack.params, lr=1e-5)
    result = gp.diagnose(stack.model, stack.params, lambda: scaler.scale(s_of(stack, tb, autocast=fp16).sum() * 1e-6),
                         optimizer=opt)
    assert result.verdict.root_cause == "healthy", result.verdict.summary
    assert result.check("update_precision").evidence["half_precision_trainable"] == 0


# ---------------------------------------------------------------- sampler log-probs beyond temperature

def _top_p_logprobs(z: torch.Tensor, ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """What a vLLM-style sampler returns: log-probs of the top-p filtered, renormalised distribution
    (transformers' own TopPLogitsWarper does the filtering)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    flat = z.reshape(-1, z.shape[-1])
    kept = TopPLogitsWarper(top_p)(None, flat.clone()).reshape(z.shape)
    return torch.log_softmax(kept, -1).gather(-1, ids[..., None])[..., 0]


def test_top_p_renormalised_sampler_logprobs(off):
    """TRL #6789: the sampler's log-probs are renormalised over the top-p kept mass; the trainer's are not."""
    stack, _ = off
    cfg = gp.load_config(overrides=["batch.num_prompts=4", "batch.group_size=4", "batch.max_new_tokens=8",
                                    "batch.top_p=0.8"])
    batch = gp.build_batch(stack, cfg)  # sampled with top_p=0.8: every token lies in the kept set
    tb = tokens(stack, batch)
    keep = tb.max_response + 1
    with torch.no_grad(), stack.autocast():
        z = stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                        logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    targets, mask = tb.input_ids[:, -keep + 1:], tb.gen_mask[:, -keep + 1:]
    full = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
    nucleus = _top_p_logprobs(z, targets, 0.8)
    assert bool(torch.isfinite(nucleus[mask]).all())
    gap = (nucleus - full)[mask]
    assert float(gap.min()) >= 0 and float(gap.mean()) > 0.01  # plain torch: old = new - log(kept mass) per token
    old = [nucleus[i][mask[i]].tolist() for i in range(mask.shape[0])]
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=old,
                         lengths=lengths(batch), rewards=rewards(batch))
    assert ids(result) == ["logprob_mismatch"]
    ev = result.verdict.causes[0].evidence
    assert ev["kind"] == "top_p" and ev["old_fits_top_p"][0] <= 0.8 <= ev["old_fits_top_p"][1] + 0.005
    assert ev["fit_residual"] < 1e-2

    def renormalised():  # the look-alike: the trainer renormalises over the same kept mass
        with stack.autocast():
            zz = stack.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids,
                             logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
        lp = _top_p_logprobs(zz, targets, 0.8)
        return torch.where(mask, lp, torch.zeros(())).sum(-1)

    healthy = gp.diagnose(stack.model, stack.params, renormalised, old_logprobs=old, lengths=lengths(batch),
                          rewards=rewards(batch))
    assert healthy.verdict.root_cause == "healthy", healthy.verdict.summary
    assert healthy.check("old_logprobs").evidence["result"] == "match"

    # top-k: the smallest k that keeps every sampled token, renormalised by transformers' TopKLogitsWarper
    from transformers.generation.logits_process import TopKLogitsWarper

    rank = (z > z.gather(-1, targets[..., None])).sum(-1)[mask]
    k = int(rank.max()) + 1
    assert k < z.shape[-1]
    kept = TopKLogitsWarper(k)(None, z.reshape(-1, z.shape[-1]).clone()).reshape(z.shape)
    top_k = torch.log_softmax(kept, -1).gather(-1, targets[..., None])[..., 0]
    assert float((top_k - full)[mask].min()) >= 0 and float((top_k - full)[mask].mean()) > 0  # plain torch
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb),
                         old_logprobs=[top_k[i][mask[i]].tolist() for i in range(mask.shape[0])],
                         lengths=lengths(batch), rewards=rewards(batch))
    ev = result.verdict.causes[0].evidence
    assert ids(result) == ["logprob_mismatch"] and ev["kind"] == "top_k", ev
    assert ev["old_fits_top_k"] == [k, k]


def test_sampler_logprobs_of_a_response_range_shifted_by_one(off):
    """ms-swift PR #8427: the old log-probs start one token early (the last prompt token's) and lose the last."""
    stack, batch = off
    tb = tokens(stack, batch)
    lens = [n for g in lengths(batch) for n in g]
    with torch.no_grad():
        lp = token_logprobs(stack, tb)
    width = lp.shape[1]
    right = [lp[i, width - n:].tolist() for i, n in enumerate(lens)]
    shifted = [lp[i, width - n - 1:width - 1].tolist() for i, n in enumerate(lens)]  # the fault: one token early
    assert [len(r) for r in shifted] == lens  # plain torch: the same counts ...
    gaps = [abs(sum(a) - sum(b)) for a, b, n in zip(shifted, right, lens) if n]
    assert min(gaps) > 0 and sum(gaps) / len(gaps) > 0.05  # ... and other values
    result = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=shifted,
                         lengths=lengths(batch), rewards=rewards(batch))
    assert ids(result) == ["logprob_mismatch"]
    ev = result.verdict.causes[0].evidence
    assert ev["kind"] == "shifted" and ev["old_fits_shift"] == -1, ev
    healthy = gp.diagnose(stack.model, stack.params, lambda: s_of(stack, tb), old_logprobs=right,
                          lengths=lengths(batch), rewards=rewards(batch))
    assert healthy.verdict.root_cause == "healthy" and healthy.check("old_logprobs").evidence["result"] == "match"

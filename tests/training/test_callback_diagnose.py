"""GradprobeCallback(diagnose=...) inside real training runs: TRL's GRPOTrainer on the tiny model (nf4 base,
bf16 LoRA, its own non-reentrant checkpointing) and a transformers Trainer on the micro model.

A healthy run is diagnosed healthy and trains exactly as without the callback; each fault is injected the
way a training script has it (a trainer subclass, an adapter loaded as PEFT loads it by default, the
Trainer's own checkpointing arguments, an optimizer built by hand) and named at step 1, before the first
optimizer step, with its evidence.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import gradprobe as gp
from gradprobe import schemas
from gradprobe.diagnose.core import DiagnoseResult
from gradprobe.errors import GradprobeError
from tests.support.schema import validate
from tests.support.trainer_run import micro_trainer
from tests.support.trl_run import base_model, lora_config, train_grpo


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def grpo_class(cb, holder: dict, base=None):
    """A GRPOTrainer (sub)class that attaches the callback as it is built and keeps the instance in `holder`
    (train_grpo builds and trains in one call, and a raised fault would lose it)."""
    from trl import GRPOTrainer

    class Probed(base or GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            holder["trainer"] = self
            if cb is not None:
                cb.attach(self)

    return Probed


def report_cost(what: str, cb) -> None:
    rec = cb.diagnoses[0]
    ratio = f"{rec['cost_ratio']:.1f}x" if rec.get("cost_ratio") is not None else "n/a"
    print(f"\n[gradprobe diagnose cost] {what}: {rec['seconds']:.2f} s of checks against "
          f"{rec.get('step_seconds', float('nan')):.2f} s for the training step ({ratio})")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_model(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def healthy_grpo(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy")
    bare = train_grpo(out / "bare", base_dir=base, quant="nf4")
    cb, holder = gp.GradprobeCallback(forecast=False, on_fault="raise", diagnose_json=out / "d.json"), {}
    probed = train_grpo(out / "probed", base_dir=base, quant="nf4", trainer_class=grpo_class(cb, holder))
    return bare, probed, cb, out / "d.json"


@pytest.mark.slow
def test_healthy_grpo_run_is_healthy_and_unchanged(healthy_grpo, capsys):
    bare, probed, cb, path = healthy_grpo
    assert isinstance(cb.diagnosis, DiagnoseResult)
    assert cb.diagnosis.verdict.root_cause == "healthy" and cb.diagnosis.exit_code() == 0
    # what it checked is the run TRL really makes: 4-bit base, bf16 LoRA, non-reentrant checkpointing
    quant, ckpt = cb.diagnosis.check("quantization").evidence, cb.diagnosis.check("checkpointing").evidence
    assert quant["linear4bit"] > 0 and quant["quant_types"] == "nf4"
    assert ckpt["mode"] == "non_reentrant" and ckpt["active"] is True
    assert cb.diagnosis.check("lora_dtype").evidence["dtypes"] == "bfloat16"
    assert cb.diagnosis.n_params == sum(1 for p in probed.model.parameters() if p.requires_grad) > 0
    assert [d["step"] for d in cb.diagnoses] == [1]
    logged = [h for h in probed.state.log_history if "gradprobe/diagnose/root_cause" in h]
    assert len(logged) == 1 and logged[0]["gradprobe/diagnose/root_cause"] == "healthy"
    assert logged[0]["gradprobe/diagnose/failed"] == 0 and logged[0]["step"] == 1
    # the trainer's own losses, its metrics (TRL averages what compute_loss appends) and weights are unchanged
    assert losses(bare) and losses(bare) == losses(probed)
    own = [{k: v for k, v in h.items() if not k.startswith("gradprobe/") and k not in ("step_time",)}
           for h in probed.state.log_history if "loss" in h]
    assert own == [{k: v for k, v in h.items() if k != "step_time"} for h in bare.state.log_history if "loss" in h]
    a, b = trainable(bare.model), trainable(probed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    schema = schemas.load("diagnose")
    assert validate(json.loads(path.read_text()), schema, schema) == []
    with capsys.disabled():
        report_cost("GRPOTrainer, tiny nf4 QLoRA", cb)


@pytest.mark.slow
def test_grpo_with_an_entropy_controller_checked_every_step_is_unchanged(base, tmp_path):
    """TRL's adaptive entropy bonus updates its coefficient inside compute_loss at each step boundary: checked at
    every step, the run still logs the same coefficients, losses and metrics and ends with the same weights."""
    config = dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=10.0, entropy_coef_delta=0.01)
    bare = train_grpo(tmp_path / "bare", base_dir=base, quant="nf4", **config)
    cb, holder = gp.GradprobeCallback(forecast=False, diagnose="every_n_steps", every_n_steps=1), {}
    probed = train_grpo(tmp_path / "probed", base_dir=base, quant="nf4", trainer_class=grpo_class(cb, holder),
                        **config)
    assert [d["step"] for d in cb.diagnoses] == [1, 2, 3] and all(d["fault"] == 0 for d in cb.diagnoses)

    def own(trainer):
        return [{k: v for k, v in h.items() if not k.startswith("gradprobe/") and k != "step_time"}
                for h in trainer.state.log_history if "loss" in h]

    coefs = [h["entropy_coef"] for h in own(bare)]
    assert coefs == [pytest.approx(0.01 * (k + 2)) for k in range(3)]  # it did move: +delta per step
    assert own(bare) == own(probed) and probed.entropy_coef == bare.entropy_coef
    a, b = trainable(bare.model), trainable(probed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def detaching_trainer():
    """A GRPOTrainer subclass that detaches the policy's log-probs (a custom logging or caching hook)."""
    from trl import GRPOTrainer

    class Detaching(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            return logps.detach(), entropies, aux

    return Detaching


@pytest.mark.slow
def test_detached_logprobs_named_before_the_backward_fails(base, tmp_path):
    cb, holder = gp.GradprobeCallback(forecast=False), {}
    with pytest.raises(RuntimeError, match="does not require grad"):  # the trainer's own backward, after warning
        train_grpo(tmp_path / "run", base_dir=base, quant="nf4", trainer_class=grpo_class(cb, holder,
                                                                                           detaching_trainer()))
    d = cb.diagnosis
    assert d.verdict.root_cause == "graph_detached"
    assert d.check("s_alive").status == "fail"
    assert d.check("s_alive").evidence["grad_fn"] is None
    # on_fault="raise": the one-line cause instead of torch's error, before TRL's first step
    cb, holder = gp.GradprobeCallback(forecast=False, on_fault="raise"), {}
    with pytest.raises(GradprobeError, match=r"step 1: graph_detached .*fix: "):
        train_grpo(tmp_path / "raise", base_dir=base, quant="nf4", trainer_class=grpo_class(cb, holder,
                                                                                             detaching_trainer()))
    assert holder["trainer"].state.global_step == 0


@pytest.mark.slow
def test_entropy_bonus_under_no_grad_named(base, tmp_path):
    """TRL PR #5595: the entropy bonus computed from entropies taken under no_grad changes the loss value and
    not its gradient. A subclass that does so is named; the same run with TRL's own entropies is healthy."""
    from trl import GRPOTrainer

    class NoGradEntropy(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with torch.no_grad():
                entropies = entropies.clone() if entropies is not None else None
            return logps, entropies, aux

    for cls, cause in ((NoGradEntropy, "loss_term_detached"), (GRPOTrainer, "healthy")):
        cb, holder = gp.GradprobeCallback(forecast=False), {}
        train_grpo(tmp_path / cause, base_dir=base, quant="nf4", entropy_coef=0.01, max_steps=1,
                   trainer_class=grpo_class(cb, holder, cls))
        d = cb.diagnosis
        assert d.verdict.root_cause == cause, d.verdict.summary
        assert d.check("loss_terms").status == ("fail" if cause != "healthy" else "pass")
        assert "entropy_bonus" in str(d.check("loss_terms").evidence)


@pytest.mark.slow
def test_frozen_adapter_named_at_step_one(base, tmp_path):
    """TRL #6700: the adapter loaded as PeftModel.from_pretrained loads it (is_trainable=False): GRPO runs,
    reports a grad_norm of 0 and learns nothing."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), lora_config(init_lora_weights=False)) \
        .save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "adapter"))
    cb, holder = gp.GradprobeCallback(forecast=False), {}
    trainer = train_grpo(tmp_path / "run", base_dir=base, model=model, trainer_class=grpo_class(cb, holder))
    assert all(h["grad_norm"] == 0 for h in trainer.state.log_history if "loss" in h)  # silent without it
    d = cb.diagnosis
    assert d.verdict.root_cause == "adapter_not_trainable"
    assert d.check("adapters").status == "fail" and d.n_params > 0
    logged = next(h for h in trainer.state.log_history if "gradprobe/diagnose/root_cause" in h)
    assert logged["gradprobe/diagnose/root_cause"] == "adapter_not_trainable" and logged["step"] == 1


@pytest.mark.slow
def test_reentrant_checkpointing_without_input_grads_raises_before_the_step(tmp_path):
    """Reentrant checkpointing switched on in the script (as Unsloth and TRL under ZeRO-3 force it) on a PEFT
    model whose inputs do not require grad (TRL #2671): on_fault='raise' stops the run at step 1 with the
    one-line cause, before any weight has moved."""
    trainer, _ = micro_trainer(tmp_path / "run", steps=2)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer.model.disable_input_require_grads()  # what a script that never asked for input grads has
    before = trainable(trainer.model)
    cb = gp.GradprobeCallback(forecast=False, on_fault="raise").attach(trainer)
    with pytest.raises(GradprobeError, match="checkpoint_inputs_no_grad") as err:
        trainer.train()
    assert "\n" not in str(err.value) and "fix:" in str(err.value)
    assert trainer.state.global_step == 0
    after = trainable(trainer.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    d = cb.diagnosis
    assert d.check("input_grads").status == "fail"
    assert d.verdict.root_cause == "checkpoint_inputs_no_grad"


@pytest.mark.slow
def test_reentrant_checkpointing_with_input_grads_is_no_fault_for_the_trainer(tmp_path):
    """The Trainer's own checkpointing arguments with use_reentrant=True: it makes the inputs require grad,
    backward() (what the trainer steps with) fills every tensor, only torch.autograd.grad is blind. diagnose
    names that, and on_fault='raise' does not stop a run that trains."""
    trainer, _ = micro_trainer(tmp_path / "run", steps=1, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs={"use_reentrant": True})
    cb = gp.GradprobeCallback(forecast=False, on_fault="raise").attach(trainer)
    trainer.train()
    assert cb.diagnosis.verdict.root_cause == "reentrant_checkpointing_hides_params"
    assert cb.diagnosis.exit_code() == 1 and cb.diagnoses[0]["fault"] == 0
    assert trainer.state.global_step == 1


@pytest.mark.slow
def test_optimizer_missing_tensors_named(tmp_path):
    """An optimizer built by hand over the lora_A weights only: the lora_B tensors are trainable, get their
    gradient, and are never stepped."""
    trainer, _ = micro_trainer(tmp_path / "run", steps=1)
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.AdamW([p for n, p in named if "lora_A" in n], lr=1e-4)
    cb = gp.GradprobeCallback(forecast=False).attach(trainer)
    trainer.train()
    d = cb.diagnosis
    assert d.check("param_identity").status == "fail"
    assert d.verdict.root_cause == "param_identity_mismatch" and cb.diagnoses[0]["fault"] == 1
    evidence = str(d.check("param_identity").evidence)
    assert "lora_B" in evidence and str(sum("lora_B" in n for n, _ in named)) in evidence


@pytest.mark.slow
def test_plain_trainer_every_n_steps_and_its_cost(tmp_path, capsys):
    bare, _ = micro_trainer(tmp_path / "bare", steps=4)
    bare.train()
    trainer, _ = micro_trainer(tmp_path / "run", steps=4)
    cb = gp.GradprobeCallback(forecast=False, diagnose="every_n_steps", every_n_steps=2).attach(trainer)
    t0 = time.perf_counter()
    trainer.train()
    assert time.perf_counter() - t0 > 0
    assert [d["step"] for d in cb.diagnoses] == [2, 4]
    assert all(d["root_cause"] == "healthy" and d["exit_code"] == 0 for d in cb.diagnoses)
    assert losses(bare) == losses(trainer)
    a, b = trainable(bare.model), trainable(trainer.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with capsys.disabled():
        report_cost("plain Trainer, micro QLoRA", cb)


@pytest.mark.slow
def test_only_the_main_process_diagnoses(tmp_path):
    """On another rank (the trainer's is_world_process_zero() is False there) nothing is checked or logged."""
    trainer, _ = micro_trainer(tmp_path / "run", steps=1)
    trainer.is_world_process_zero = lambda: False
    cb = gp.GradprobeCallback(forecast=False, on_fault="raise").attach(trainer)
    trainer.train()
    assert cb.diagnosis is None and cb.diagnoses == [] and trainer.state.global_step == 1
    assert not any("gradprobe/diagnose/root_cause" in h for h in trainer.state.log_history)


@pytest.mark.slow
def test_ddp_run_diagnosed_on_the_main_process_only(tmp_path):
    """2 real gloo ranks of a Trainer with DistributedDataParallel: rank 0 checks its first step while rank 1
    goes on to its own step (the check has no collective, the model is unwrapped from DDP): no rank hangs,
    rank 1 checks nothing, and both end with the same weights."""
    from tests.support import ddp_trainer
    from tests.support.dist_worker import spawn_ranks

    codes, _ = spawn_ranks(ddp_trainer.worker, 2, str(tmp_path), timeout=240)
    errors = sorted(tmp_path.glob("rank*.error"))
    assert codes == [0, 0], errors[0].read_text() if errors else "no error file"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert [d["step"] for d in r0["diagnoses"]] == [1] and r0["root_cause"] == "healthy"
    assert r1["diagnoses"] == [] and r1["root_cause"] is None
    assert r0["losses"] and r0["weights"] == r1["weights"]


def test_bad_diagnose_settings_fail_at_construction():
    for kwargs, words in [(dict(diagnose="always"), "diagnose"), (dict(diagnose=True), "diagnose"),
                          (dict(on_fault="stop"), "on_fault"), (dict(diagnose=False, forecast=False), "both are off")]:
        with pytest.raises(GradprobeError, match=words):
            gp.GradprobeCallback(["a", "b"], **kwargs)
    with pytest.raises(GradprobeError, match="eval_prompts is required"):
        gp.GradprobeCallback()
    assert gp.GradprobeCallback(forecast=False).eval_prompts == []


@pytest.mark.slow
def test_train_begin_refuses_an_unwritable_json_and_an_unattached_diagnosis(tmp_path):
    trainer, _ = micro_trainer(tmp_path / "run", steps=1)
    gp.GradprobeCallback(forecast=False, diagnose_json=tmp_path / "missing" / "d.json").attach(trainer)
    with pytest.raises(GradprobeError, match="cannot write"):
        trainer.train()
    trainer, _ = micro_trainer(tmp_path / "unattached", steps=1)
    trainer.add_callback(gp.GradprobeCallback(forecast=False, trainer=trainer))
    with pytest.raises(GradprobeError, match="attach"):
        trainer.train()

"""A real training run, probed: the transformers Trainer trains the tiny 4-bit LoRA stack on CPU and
writes checkpoints; gradprobe must read back the optimizer's exact preconditioner and the learning rate
the next step really uses, run delta-h1 on it, and refuse an optimizer state of another adapter."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from gradprobe.api import build_batch, delta_h1, preconditioner
from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.errors import GradprobeError
from gradprobe.optim.state import no_decay_names, trainer_order
from gradprobe.rollouts import read_rollouts, write_rollouts
from gradprobe.stack import load_stack, quiet_libraries
from gradprobe.trainer_checkpoint import load_checkpoint
from tests.support.export import save_preset

SAVE_AT, MAX_STEPS = 3, 4  # the checkpoint is taken at step 3 and training goes on, so step 4's lr is observed
MAX_GRAD_NORM = 0.5  # below the gradient norms of this run, so that the Trainer really clips
SMALL = ["batch.num_prompts=4", "batch.group_size=3", "batch.max_new_tokens=6"]
SMALL_ARGS = [a for s in SMALL for a in ("--set", s)]


def _train(base_dir, out_dir, lora_kwargs, max_steps, save_steps, record=None):
    """What a user's script does: 4-bit base, PEFT LoRA, transformers Trainer with AdamW and linear warmup/decay."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=quant, device_map={"": "cpu"},
                                                dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(3, 49, (12,), generator=gen).tolist()
        data.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})

    class Record(TrainerCallback):
        """Reads the live optimizer: its state at the save, and the lr the step after the save uses."""

        def on_save(self, args, state, control, optimizer=None, model=None, **kw):
            if record is None or state.global_step != SAVE_AT:
                return
            names = {id(p): n for n, p in model.named_parameters()}
            record["expected"], record["params"] = {}, {}
            for group in optimizer.param_groups:
                beta2, eps = group["betas"][1], group["eps"]
                for p in group["params"]:
                    st = optimizer.state[p]
                    v_hat = st["exp_avg_sq"].double() / (1 - beta2 ** float(st["step"]))
                    record["expected"][names[id(p)]] = 1.0 / (v_hat.sqrt() + eps)
                    record["params"][names[id(p)]] = p.detach().clone()

        def on_step_begin(self, args, state, control, model=None, **kw):
            """The step after the save: keep each gradient as backward leaves it, before the Trainer clips it."""
            if record is None or state.global_step != SAVE_AT:
                return
            record["grads"], self.hooks = {}, []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self.hooks.append(p.register_post_accumulate_grad_hook(
                        lambda q, name=name: record["grads"].__setitem__(name, q.grad.detach().clone())))

        def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
            if record is not None and state.global_step == SAVE_AT:  # the step after the save (0-based count)
                record["next_lr"] = [g["lr"] for g in optimizer.param_groups]
                record["after"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                for h in self.hooks:
                    h.remove()

    args = TrainingArguments(output_dir=str(out_dir), use_cpu=True, report_to=[], max_steps=max_steps,
                             save_steps=save_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, optim="adamw_torch",
                             max_grad_norm=MAX_GRAD_NORM, logging_steps=1, disable_tqdm=True, seed=0,
                             save_only_model=False)
    with quiet_libraries():
        Trainer(model=model, args=args, train_dataset=data, callbacks=[Record()]).train()
    return out_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    base = save_preset("tiny", root / "base", seed=0)
    record: dict = {}
    # bias="lora_only" makes the q/k/v biases trainable: the Trainer puts them in its no-decay group, so the
    # optimizer's index order differs from named_parameters order and the mapping is really tested.
    _train(base, root / "a", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"],
                                  bias="lora_only"), MAX_STEPS, SAVE_AT, record)
    _train(base, root / "b", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1, 1)
    # two adapters whose tensors have the same shapes: only their configs tell them apart
    _train(base, root / "k", dict(r=4, lora_alpha=8, target_modules=["k_proj"]), 1, 1)
    _train(base, root / "v", dict(r=4, lora_alpha=8, target_modules=["v_proj"]), 1, 1)
    # a run's last checkpoint: linear decay to its end, so the scheduler's next rate is 0
    _train(base, root / "e", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 2, 2)
    return {"base": base, "a": root / "a" / f"checkpoint-{SAVE_AT}", "e": root / "e" / "checkpoint-2",
            "b": root / "b" / "checkpoint-1",
            "k": root / "k" / "checkpoint-1", "v": root / "v" / "checkpoint-1", **record}


@pytest.fixture(scope="module")
def loaded(run):
    cfg, info = load_checkpoint(run["a"], load_config(overrides=SMALL))
    return cfg, info, load_stack(cfg)


def test_checkpoint_preconditioner_and_lr_match_the_trainer(run, loaded):
    cfg, info, stack = loaded
    assert cfg.model.name_or_path == str(run["base"])  # from adapter_config.json
    assert info.global_step == SAVE_AT and info.adam_step == SAVE_AT
    # the lr the trainer used for the step after the checkpoint (linear decay: half the peak here)
    assert len(set(run["next_lr"])) == 1
    assert info.learning_rate == pytest.approx(run["next_lr"][0], rel=1e-12)
    assert info.learning_rate == pytest.approx(5e-4, rel=1e-12)
    assert "scheduler.pt" in info.learning_rate_source

    assert set(stack.names) == set(run["expected"])
    # the test means something only if the Trainer's order differs from named_parameters order
    assert trainer_order(stack.names, no_decay_names(stack.model)) != list(range(len(stack.names)))
    precond = preconditioner(stack, cfg)
    assert "trainer order" in precond.source
    for name, p, scale in zip(stack.names, stack.params, precond.scales):
        torch.testing.assert_close(scale.double(), run["expected"][name], rtol=1e-6, atol=0)
        # the checkpoint's adapter, not a fresh one (gradprobe keeps every trainable tensor in fp32)
        torch.testing.assert_close(p.detach(), run["params"][name].float(), rtol=0, atol=0)


def test_real_update_from_the_checkpoint_is_the_trainers_next_step(run, loaded):
    """gradprobe reads optimizer.pt and scheduler.pt of the checkpoint and, given the gradient of the step
    after it, reconstructs the change that step made to every parameter, clipping included."""
    from gradprobe.optim.update import real_update, step_settings

    cfg, info, stack = loaded
    no_decay = no_decay_names(stack.model)
    path = run["a"] / "optimizer.pt"
    grads = [run["grads"][n] for n in stack.names]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > MAX_GRAD_NORM  # the Trainer clips this step: clipping is tested too
    s = step_settings(path, stack.names, stack.params, no_decay=no_decay, max_grad_norm=MAX_GRAD_NORM)
    assert (s.optimizer, s.step, s.betas, s.eps, s.decoupled) == ("AdamW", SAVE_AT + 1, (0.9, 0.999), 1e-8, True)
    assert s.lr == run["next_lr"][0] and "scheduler.pt" in s.sources["lr"]
    assert s.weight_decays == [0.0 if n in no_decay else 0.01 for n in stack.names] and 0.0 in s.weight_decays
    delta = real_update(path, stack.params, grads, names=stack.names, no_decay=no_decay, max_grad_norm=MAX_GRAD_NORM)
    for name, d in zip(stack.names, delta):
        # in the dtype the Trainer held each parameter in: the 4-bit model's trainable biases are bf16
        want = run["after"][name].float() - run["params"][name].float()
        torch.testing.assert_close(d, want, rtol=1e-6, atol=1e-9)
    assert {run["params"][n].dtype for n in stack.names} == {torch.float32, torch.bfloat16}


def test_plain_adapter_with_a_separate_optimizer_state(run, loaded, tmp_path):
    plain = tmp_path / "adapter"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run["a"] / name, plain / name)
    with pytest.raises(GradprobeError, match="no optimizer.pt in .* pass --optimizer-state FILE"):
        load_checkpoint(plain, load_config())
    with pytest.raises(GradprobeError, match=r"warmup_steps trains a fresh AdamW.*--checkpoint"):  # not on top
        load_checkpoint(run["a"], load_config(overrides=[*SMALL, "probe.warmup_steps=2"]))
    cfg, info = load_checkpoint(plain, load_config(overrides=SMALL), optimizer_state=run["a"] / "optimizer.pt")
    assert cfg.lora.adapter_path == str(plain) and cfg.model.name_or_path == str(run["base"])
    assert info.learning_rate == pytest.approx(run["next_lr"][0], rel=1e-12)  # scheduler.pt beside optimizer.pt
    stack = load_stack(cfg)
    assert stack.names == loaded[2].names
    for name, scale in zip(stack.names, preconditioner(stack, cfg).scales):
        torch.testing.assert_close(scale.double(), run["expected"][name], rtol=1e-6, atol=0)


def test_delta_h1_cli_on_checkpoint(run, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["delta-h1", "--checkpoint", str(run["a"]), "--quiet", "--json", str(out),
                                   *SMALL_ARGS])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["result"]["learning_rate"] == pytest.approx(run["next_lr"][0], rel=1e-12)
    assert "optimizer.pt" in payload["result"]["precondition"]
    assert payload["checkpoint"]["global_step"] == SAVE_AT
    assert math.isfinite(payload["result"]["deltaH1"]) and payload["result"]["deltaH1"] != 0


def test_end_of_schedule_checkpoint_runs_at_the_given_learning_rate(run, tmp_path):
    """The last checkpoint's next rate is 0: refused with the override to use, which then works and is marked."""
    args = ["delta-h1", "--checkpoint", str(run["e"]), "--quiet", *SMALL_ARGS]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "is 0 (a schedule at its end" in res.stderr and "set probe.learning_rate" in \
        res.stderr, res.stderr
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [*args, "--set", "probe.learning_rate=1e-5", "--json", str(out)])
    assert res.exit_code == 0, res.stderr
    result = json.loads(out.read_text())["result"]
    assert result["learning_rate"] == 1e-5 and result["step"]["lr"] == 1e-5
    assert result["step"]["sources"]["lr"].startswith("given: probe.learning_rate"), result["step"]["sources"]
    assert math.isfinite(result["deltaH"]) and result["deltaH"] != 0


def test_diagnose_cli_on_checkpoint(run, tmp_path):
    """diagnose reads the same run: the Trainer-ordered Adam state covers every parameter (biases included)."""
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["diagnose", "--checkpoint", str(run["a"]), "--quiet", "--json", str(out),
                                   "--set", "checkpointing=non_reentrant", *SMALL_ARGS])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["verdict"]["root_cause"] == "healthy"
    assert payload["checkpoint"]["global_step"] == SAVE_AT
    coverage = next(c for c in payload["checks"] if c["name"] == "optimizer_state")
    assert coverage["status"] == "pass", coverage
    assert "optimizer.pt" in json.dumps(coverage["evidence"])
    # another adapter's state is a finding here (delta-h1 refuses it): named, with the first mismatch
    res = CliRunner().invoke(app, ["diagnose", "--checkpoint", str(run["a"]), "--optimizer-state",
                                   str(run["b"] / "optimizer.pt"), "--quiet", "--json", str(out), *SMALL_ARGS])
    assert res.exit_code == 1, res.output
    verdict = json.loads(out.read_text())["verdict"]
    assert verdict["root_cause"] == "optimizer_state_mismatch"
    assert "optimizer index 0 has shape (4, 64)" in verdict["summary"]
    assert "No single change" not in verdict["summary"]


def test_validate_cli_on_checkpoint(run):
    """validate steps along the run's own preconditioned direction, with the lr its scheduler gives next."""
    small = ["autocast=off", "quant.compute_dtype=float32", "checkpointing=off", "batch.num_prompts=2",
             "batch.group_size=2", "batch.max_new_tokens=3", "validate.method=importance", "validate.is_samples=4",
             "validate.points=2", "validate.eval_num_prompts=2", "validate.eval_group_size=2"]
    res = CliRunner().invoke(app, ["validate", "--checkpoint", str(run["a"]), "--quiet", "--json", "-",
                                   *(a for s in small for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["checkpoint"]["global_step"] == SAVE_AT
    r = payload["result"]
    assert r["method"] == "importance" and len(r["points"]) == 2
    assert "optimizer.pt" in r["precondition"] and "trainer order" in r["precondition"]
    assert payload["config"]["model"]["name_or_path"] == str(run["base"])


def test_optimizer_state_of_another_adapter_is_refused(run):
    res = CliRunner().invoke(app, ["delta-h1", "--checkpoint", str(run["a"]), "--optimizer-state",
                                   str(run["b"] / "optimizer.pt"), "--quiet", *SMALL_ARGS])
    assert res.exit_code == 2, res.output
    msg = res.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in res.output
    # the first trainable parameter is layer 0's q_proj lora_A: rank 8 here, rank 4 in the other run
    assert "optimizer index 0 has shape (4, 64)" in msg
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' has shape (8, 64)" in msg


def test_checkpoint_with_foreign_optimizer_file_is_refused(run, loaded, tmp_path):
    """A checkpoint directory whose optimizer.pt came from a run with other target modules."""
    mixed = tmp_path / "mixed"
    shutil.copytree(run["a"], mixed)
    shutil.copy(run["b"] / "optimizer.pt", mixed / "optimizer.pt")
    cfg, _ = load_checkpoint(mixed, load_config(overrides=SMALL))
    with pytest.raises(GradprobeError, match=r"optimizer index 0 has shape \(4, 64\) but parameter '.*q_proj"):
        preconditioner(loaded[2], cfg)


def test_same_shapes_from_another_adapter_are_refused(run):
    cfg, _ = load_checkpoint(run["k"], load_config(overrides=SMALL), optimizer_state=run["v"] / "optimizer.pt")
    stack = load_stack(cfg)
    with pytest.raises(GradprobeError, match=r"does not belong to the model's adapter: .*target_modules \['v_proj'\] "
                                             r"there, \['k_proj'\] here"):
        preconditioner(stack, cfg)


def test_text_rollouts_give_the_same_delta_h1_as_token_ids(loaded, tmp_path):
    """Through the checkpoint's Hugging Face tokenizer: text prompts and responses, special tokens as text."""
    cfg, _, stack = loaded
    batch = build_batch(stack, cfg)
    ids_file, text_file = tmp_path / "ids.jsonl", tmp_path / "text.jsonl"
    write_rollouts(batch, ids_file)
    write_rollouts(batch, text_file, tokenizer=stack.tokenizer)
    first = json.loads(text_file.read_text().splitlines()[0])
    assert isinstance(first["prompt"], str) and all(isinstance(r, str) for r in first["responses"])
    vocab = stack.model.get_input_embeddings().num_embeddings
    from_ids = read_rollouts(ids_file, stack.tokenizer, vocab)
    from_text = read_rollouts(text_file, stack.tokenizer, vocab)
    assert [g.prompt for g in from_text.groups] == [g.prompt for g in from_ids.groups]
    assert [g.responses for g in from_text.groups] == [g.responses for g in from_ids.groups]
    a = delta_h1(stack, from_ids, cfg)
    b = delta_h1(stack, from_text, cfg)
    assert a.deltaH1 != 0 and b.deltaH1 == pytest.approx(a.deltaH1, rel=1e-9, abs=0)
    assert b.se == pytest.approx(a.se, rel=1e-9, abs=0)


def test_damaged_and_unsafe_files_are_refused(run, tmp_path):
    cfg = load_config()
    broken = tmp_path / "broken"
    shutil.copytree(run["a"], broken)
    data = (broken / "optimizer.pt").read_bytes()
    (broken / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GradprobeError, match="cannot read optimizer state .*truncated"):
        load_checkpoint(broken, cfg)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(GradprobeError, match="no optimizer.pt .*--optimizer-state"):
        load_checkpoint(broken, cfg)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:-64])
    with pytest.raises(GradprobeError, match="cannot read adapter weights .*truncated"):
        load_checkpoint(broken, cfg, optimizer_state=run["a"] / "optimizer.pt")
    # a pickle that would construct an arbitrary object is refused by weights_only loading
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state": {}, "param_groups": [], "extra": _NotATensor()}, unsafe)
    with pytest.raises(GradprobeError, match="weights_only"):
        load_checkpoint(run["a"], cfg, optimizer_state=unsafe)


class _NotATensor:
    pass


def test_no_decay_names_match_the_trainer():
    """Our order reproduction uses the Trainer's own rule, LayerNorm modules included (GPT-2 style ln_1)."""
    from transformers import Trainer

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = torch.nn.LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)
            self.final_norm = torch.nn.Parameter(torch.ones(4))

    model = torch.nn.Sequential(Block(), Block())
    expected = {n for n, _ in model.named_parameters()} - set(Trainer.get_decay_parameter_names(None, model))
    assert no_decay_names(model) == expected
    assert {"0.ln_1.weight", "0.proj.bias", "1.final_norm"} <= expected and "0.proj.weight" not in expected


def test_delta_h1_reports_the_settings_of_the_trainers_next_step(run, loaded):
    """The real-step block of delta-h1 on the checkpoint: the lr, betas, eps, weight decay and step count are
    the ones the Trainer's next step used (its TrainingArguments and scheduler.pt), each marked read or given,
    and deltaH comes with its parts."""
    cfg, _, stack = loaded
    batch = build_batch(stack, cfg)
    r = delta_h1(stack, batch, cfg.with_values({"probe.max_grad_norm": MAX_GRAD_NORM}))
    step = r.step
    assert (step["optimizer"], step["step"], tuple(step["betas"]), step["eps"]) == ("AdamW", SAVE_AT + 1, (0.9, 0.999),
                                                                                   1e-8)
    assert step["lr"] == run["next_lr"][0] and step["weight_decay"] == 0.01
    assert step["max_grad_norm"] == MAX_GRAD_NORM and step["sources"]["max_grad_norm"].startswith("given")
    assert all(step["sources"][k].startswith("read") for k in ("lr", "betas", "eps", "weight_decay", "step"))
    assert 0 < r.parts["clip_factor"] <= 1.0 and r.parts["momentum"]["value"] != 0
    assert math.isfinite(r.deltaH) and math.isfinite(r.se_deltaH) and r.entropy_batch == "same"


def test_plain_trainer_training_args_are_read(run, loaded):
    """The plain Trainer's training_args.bin (TrainingArguments): its max_grad_norm, fp32 and no checkpointing
    are read; it has no RL loss, so the loss settings stay the config's, marked assumed; the adapter's
    weights are fp32 LoRA matrices beside bf16 biases (the 4-bit model's), which one lora.dtype cannot say."""
    cfg, info, _ = loaded
    assert info.training_args == "TrainingArguments"
    read = {k: v["value"] for k, v in info.settings.items() if v["source"].startswith("read: training_args.bin")}
    assert read == {"probe.max_grad_norm": MAX_GRAD_NORM, "autocast": "off", "checkpointing": "off"}
    assert (cfg.probe.max_grad_norm, cfg.autocast, cfg.checkpointing) == (MAX_GRAD_NORM, "off", "off")
    assert info.settings["probe.loss_type"]["source"] == "assumed: the config's; not in TrainingArguments"
    assert info.settings["lora.dtype"] == {"value": "float32", "source": "assumed: the config's; "
                                           "adapter_model.safetensors holds bfloat16, float32; lora.dtype sets one "
                                           "for all"}
    # what the user sets wins, and is marked given
    cfg2, info2 = load_checkpoint(run["a"], load_config(overrides=[*SMALL, "autocast=bf16"]), given={"autocast"})
    assert cfg2.autocast == "bf16"
    assert info2.settings["autocast"]["source"] == "given: --set; the run used off"

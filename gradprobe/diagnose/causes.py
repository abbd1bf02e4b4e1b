"""The root causes diagnose can name: one record each, in rank order (upstream causes first).

This list is the only place a root cause is defined: the verdict runs its rules in this order, the JSON
schema's enum and docs/diagnose.md list these ids (a test holds them equal). Ids never change meaning;
a new cause goes in at its rank. Rank: what stops every gradient or the loss itself first, then what
starves some parameters, then what corrupts what arrives, then what only breaks `torch.autograd.grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import rules
from .facts import Facts


@dataclass(frozen=True)
class RootCause:
    id: str
    summary: str  # what it means, in one line
    fix: str  # the fix, in one or two sentences
    rule: Callable[[Facts], rules.Cause | None] | None  # fires it (None: the catch-alls decide() adds)
    confirmable: bool  # the differential run can confirm it (a factor it changes removes the symptom)
    explains_missing: bool = False  # accounts for parameters that backward() leaves without gradient
    implies: tuple[str, ...] = ()  # causes it brings about: when both hold they are listed right under it


CAUSES: list[RootCause] = [
    RootCause("grad_disabled", "the loss was built with gradient recording off (torch.no_grad / inference_mode)",
              "Build the loss outside torch.no_grad()/torch.inference_mode(); keep those for generation only.",
              rules._grad_disabled, True, True),
    RootCause("inference_tensors", "the loss or its backward raised on tensors created under torch.inference_mode()",
              "Create the tensors the loss uses outside torch.inference_mode() (generate under torch.no_grad(), or "
              ".clone() them outside the inference block) before building the loss.",
              rules._raised("inference_tensors"), True, True),
    RootCause("checkpoint_recompute_mismatch", "activation checkpointing's recomputation saw another model state than "
              "the forward (CheckpointError)",
              "Keep the model in one state from the forward to the backward: do not disable, merge or switch "
              "adapters (or train/eval) around a forward whose backward runs later; run such forwards under "
              "torch.no_grad(), or without checkpointing.",
              rules._raised("checkpoint_recompute_mismatch"), True, True),
    RootCause("device_mismatch", "the loss or its backward raised because tensors sit on different devices",
              "Move every tensor the loss uses (input_ids, masks, advantages, old log-probs) to the model's device.",
              rules._raised("device_mismatch"), False, True),
    RootCause("dtype_mismatch", "the loss or its backward raised on a dtype mismatch",
              "Keep index tensors int64 and let autocast pick the compute dtype; do not cast the model, its inputs "
              "or the logits by hand inside the loss.",
              rules._raised("dtype_mismatch"), True, True),
    RootCause("loss_exception", "the loss function or its backward raised (another exception)",
              "Fix the exception the verdict quotes; diagnose measured what it could without the gradients.",
              rules._raised("loss_exception"), True, True),
    RootCause("ddp_reentrant_checkpointing", "DistributedDataParallel with find_unused_parameters=True over reentrant "
              "checkpointing: the recomputation's nested backward marks parameters ready a second time",
              "Enable checkpointing with use_reentrant=False (gradient_checkpointing_kwargs={'use_reentrant': False}), "
              "or keep it reentrant with DDP(find_unused_parameters=False) or static_graph=True (Trainer: "
              "ddp_find_unused_parameters=False).",
              rules._ddp_reentrant, False, True, implies=("reentrant_checkpointing_hides_params",)),
    RootCause("ddp_unused_parameters", "DistributedDataParallel with find_unused_parameters=False and trainable "
              "parameters the loss never uses: the reducer waits for their gradients forever",
              "Make the loss use every trainable parameter, or freeze the ones it does not (LoRA target_modules, "
              "requires_grad_(False)) before wrapping in DDP; or DDP(find_unused_parameters=True) (Trainer: "
              "ddp_find_unused_parameters=True).",
              rules._ddp_unused, False, True,
              implies=("unexplained_missing_gradients", "adapter_bypassed")),
    RootCause("graph_detached", "S is cut from the graph between the model's logits and the loss",
              "Compute S from the logits with torch operations end to end; use .detach()/.item() only for logging.",
              rules._graph_detached, True, True),
    RootCause("adapter_disabled", "adapter layers ran disabled or merged during the forward, so their weights take "
              "no part in it",
              "Build the loss with the adapters enabled and unmerged: no `with model.disable_adapter()` around the "
              "forward that trains them (keep it for a reference model's no-grad forward), model.unmerge_adapter().",
              rules._adapter_disabled, True, True, implies=("checkpoint_recompute_mismatch",)),
    RootCause("params_from_inactive_adapter", "the parameter list holds the weights of an adapter that is no longer "
              "active (another one was activated with set_adapter)",
              "Take the list (and build the optimizer) after the last set_adapter, from the adapter that runs: "
              "[p for n, p in model.named_parameters() if p.requires_grad]; or activate the adapter the list holds "
              "(model.set_adapter(name)).",
              rules._params_from_inactive_adapter, False, True,
              implies=("adapter_bypassed", "param_identity_mismatch")),
    RootCause("adapter_bypassed", "adapter layers never ran during the forward, or ran with another adapter active or "
              "a LoRA scaling of 0",
              "Run the loss through the model whose parameters you train (not a copy or the unwrapped base), leave its "
              "LoRA modules in place, activate the adapter you train (model.set_adapter) and keep its scaling.",
              rules._adapter_bypassed, False, True, implies=("checkpoint_recompute_mismatch",)),
    RootCause("adapter_not_trainable", "the adapter weights do not require grad (loaded without is_trainable=True)",
              "Load the adapter with PeftModel.from_pretrained(base, path, is_trainable=True) (or call "
              "requires_grad_(True) on its weights) before building the optimizer and the list.",
              rules._adapter_not_trainable, True, True),
    RootCause("dead_adapter", "lora_A and lora_B of adapter layers are both all zero, so both gradients are exactly "
              "zero on every step and the adapter can never move",
              "Initialise the adapter again (LoRA's default: lora_A random, lora_B zero), e.g. "
              "layer.reset_lora_parameters(name, init_lora_weights=True) on each LoRA layer, or add the adapter "
              "after the base model's init_weights(); never clear both A and B of a slot you reuse.",
              rules._dead_adapter, False, True),
    RootCause("param_identity_mismatch", "the parameter list is not the model's current trainable parameters",
              "Take the list from the model you run, after every wrapper: [p for n, p in model.named_parameters() if "
              "p.requires_grad]; build the optimizer from the same list.",
              rules._param_identity, True, True),
    RootCause("checkpoint_inputs_no_grad", "reentrant checkpointing without an input that requires grad",
              "Call model.enable_input_require_grads(), or enable checkpointing with use_reentrant=False.",
              rules._checkpoint_inputs, True, True),
    RootCause("empty_generation", "every response is empty, so S has no generated token to differentiate",
              "Fix generation or the rollouts file: max_new_tokens, EOS handling, prompt truncation and the mask "
              "marking the generated region.",
              rules._empty_generation, False, True, implies=("nonfinite_gradients",)),
    RootCause("empty_loss_mask", "the loss's token mask is empty: every label is masked (-100) or truncation "
              "removed every response token, so no logit takes part in the loss (exactly zero, or NaN from a 0/0 mean)",
              "Make the loss see the response tokens: the completion template must be found in the tokenized text "
              "(labels other than -100), and truncation (max_length, max_prompt_length) must leave the response in; "
              "skip or drop a batch whose mask is empty instead of dividing by its zero token count.",
              rules._empty_loss_mask, False, True, implies=("nonfinite_gradients",)),
    RootCause("nonfinite_gradients", "NaN/Inf in the weights, the loss or the gradients",
              "Reload the last finite checkpoint and find the step that produced NaN/Inf (learning rate, fp16 overflow "
              "without a GradScaler).",
              rules._nonfinite, False),
    RootCause("gradient_underflow", "gradients underflow to exactly zero in half precision; scaling the loss brings "
              "them back",
              "Scale the loss before backward (torch.amp.GradScaler for fp16, which unscales before the step), or "
              "compute in bf16, or do not shrink the loss by a large constant.",
              rules._gradient_underflow, True, True),
    RootCause("loss_term_detached", "a named term of the loss is cut from the graph (computed under no_grad, "
              "detached or a Python number): it changes the loss value but not the gradient",
              "Compute the term from the logits with grad recording on (no torch.no_grad(), .detach() or .item() "
              "inside it); keep no_grad for terms that are only logged.",
              rules._loss_term_detached, False),
    RootCause("update_lost_to_precision", "a trainable tensor is held in half precision and the optimizer's next "
              "update rounds away: its gradient is fine but the weight does not move",
              "Keep trainable tensors in float32 (LoRA A/B and DoRA's magnitude vector: cast them back after "
              "model.to(bfloat16) or prepare_model_for_kbit_training) and let autocast compute in bf16.",
              rules._update_lost, False),
    RootCause("eval_mode", "the forward ran in eval mode although dropout is configured, so the gradient is not a "
              "training step's",
              "Call model.train() before building the loss (generation may use eval mode; switch back before the "
              "training forward).",
              rules._eval_mode, True),
    RootCause("optimizer_state_mismatch", "the optimizer state belongs to another model or adapter (counts or shapes "
              "differ)",
              "Give the optimizer state saved with this adapter (the same checkpoint directory); a state from another "
              "rank or target modules cannot precondition this one.",
              rules._optimizer_state, False),
    RootCause("missing_optimizer_state", "the optimizer lacks parameters of the list or their Adam moments",
              "Build the optimizer over every trainable parameter and use its state after it has stepped them, or "
              "probe with precondition=identity; never fill the gap with zeros (P = 1/eps ≈ 1e8).",
              None, False),  # the same rule as optimizer_state_mismatch returns it
    RootCause("no_learning_signal", "every measured group has identical rewards, so Y is exactly zero",
              "Use groups whose rewards differ (a larger G or a reward with spread): a flat group contributes nothing "
              "to the update.",
              rules._no_learning_signal, False, True),
    RootCause("logprob_mismatch", "the sampling-time (old) log-probs differ from the recomputed ones: temperature, "
              "top-p/top-k renormalisation, padding, truncation or a shifted response range",
              "Recompute the log-probs exactly as they were sampled: the same temperature (divide the logits by it), "
              "the same padding side with position ids counted from the first real token, the same response range (no "
              "off-by-one at its start), and the same top-p/top-k renormalisation on both sides, or none on either.",
              rules._logprob_mismatch, False),
    RootCause("unexplained_missing_gradients", "backward() leaves parameters without gradient and no check explains it",
              "Compare the parameters listed as missing with the modules your forward runs (hooks, wrappers, frozen "
              "submodules).",
              None, True),
    RootCause("reentrant_checkpointing_hides_params", "reentrant activation checkpointing hides the parameters from "
              "torch.autograd.grad (backward() still fills them)",
              "Read gradients from backward() and param.grad (as `gradprobe delta-h1` does), or enable checkpointing "
              "with use_reentrant=False: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
              "{'use_reentrant': False}).",
              rules._autograd_gap, True),
    RootCause("autograd_grad_mismatch", "torch.autograd.grad misses parameters that backward() fills, cause not "
              "identified",
              "Read gradients from backward() and param.grad; report the model to the gradprobe issue tracker with "
              "this JSON.",
              None, True),  # the same rule as reentrant_checkpointing_hides_params returns it
    RootCause("healthy", "no gradient-flow problem found", "Nothing to fix.", None, False),
]

BY_ID: dict[str, RootCause] = {c.id: c for c in CAUSES}
RANK: dict[str, int] = {c.id: k for k, c in enumerate(CAUSES)}
EXPLAINS_MISSING: set[str] = {c.id for c in CAUSES if c.explains_missing}


def ids() -> list[str]:
    """Every id a verdict may carry, in rank order (the schema's enum)."""
    return [c.id for c in CAUSES]

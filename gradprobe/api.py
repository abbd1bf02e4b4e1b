"""The Python API: the same steps the CLI takes, for a user's own script.

    from gradprobe import load_config, load_stack, build_batch, delta_h1
    cfg = load_config(overrides=["probe.microbatch_size=4"])
    stack = load_stack(cfg)
    batch = build_batch(stack, cfg)
    result = delta_h1(stack, batch, cfg)
    print(result.deltaH1, result.se_unbiased)   # NaN under probe.schedule=literal: use result.se
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .optim.precondition import Preconditioner, build_preconditioner
from .probe import ProbeResult, run_probe
from .rewards import load_reward
from .rollouts import Batch, check_probe_batch, context_length, generate_batch, read_rollouts


def build_batch(stack, cfg: dict[str, Any]) -> Batch:
    """Teacher-force a rollouts file when one is given, else sample the built-in prompts."""
    bcfg = cfg["batch"]
    vocab = stack.model.get_input_embeddings().num_embeddings
    if bcfg["rollouts"]:
        return read_rollouts(bcfg["rollouts"], stack.tokenizer, vocab, temperature=bcfg["temperature"],
                             max_positions=context_length(stack.model))
    return generate_batch(stack, bcfg["num_prompts"], bcfg["group_size"], bcfg["temperature"], bcfg["top_p"],
                          bcfg["max_new_tokens"], seed=cfg["seed"], reward_fn=load_reward(bcfg["reward"]))


def preconditioner(stack, cfg: dict[str, Any]) -> Preconditioner:
    """P for this stack as the config says (the optimizer state mapped in the order its trainer used)."""
    return build_preconditioner(cfg, stack.names, stack.params, model=stack.model)


def learning_rate(cfg: dict[str, Any], precond: Preconditioner) -> float:
    """eta: the next step's rate, resolved with P by one rule (optim/lr.py)."""
    return precond.learning_rate


def delta_h1(stack, batch: Batch, cfg: dict[str, Any],
             progress: Callable[[int, int], None] | None = None, precond: Preconditioner | None = None,
             store: Any = None) -> ProbeResult:
    """Run the probe with the preconditioner and learning rate the config names (or `precond`, built
    earlier with preconditioner(stack, cfg) so that a mismatched optimizer state fails before sampling)."""
    check_probe_batch(batch)
    precond = precond if precond is not None else preconditioner(stack, cfg)
    lr = learning_rate(cfg, precond)
    t0 = time.perf_counter()
    result = run_probe(stack, batch, cfg["probe"], precond, lr, progress=progress, store=store)
    result.timings["probe"] = time.perf_counter() - t0
    return result

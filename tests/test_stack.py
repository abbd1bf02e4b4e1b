"""The stack from a local model directory with its own tokenizer, and from an existing adapter."""

from __future__ import annotations

import pytest
import torch

import gradprobe as gp
from gradprobe.stack import PRESETS
from gradprobe.tokenizer import CharTokenizer
from tests.conftest import make_cfg


def save_local_model(path) -> None:
    """A model directory as a user has one: the tiny preset's weights, its config and a fast tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)  # the seed the preset is built with
    Qwen2ForCausalLM(Qwen2Config(**PRESETS["tiny"])).save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(CharTokenizer().vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges=[])),
                                  bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(path)


def test_local_directory_matches_the_preset_it_was_saved_from(tmp_path, rollouts_file):
    cfg = make_cfg(f"batch.rollouts={rollouts_file}")
    preset = gp.load_stack(cfg)
    save_local_model(tmp_path)
    local = gp.load_stack(make_cfg(f"model.name_or_path={tmp_path}", f"batch.rollouts={rollouts_file}"))
    assert local.names == preset.names
    assert all(torch.equal(a, b) for a, b in zip(local.params, preset.params))
    assert local.tokenizer.padding_side == "left"
    a = gp.delta_h1(preset, gp.build_batch(preset, cfg), cfg)
    b = gp.delta_h1(local, gp.build_batch(local, cfg), cfg)
    assert b.U_cross == pytest.approx(a.U_cross, rel=1e-6)
    sampled = gp.build_batch(local, make_cfg(f"model.name_or_path={tmp_path}", "batch.num_prompts=2"))
    assert sampled.B == 2 and all(len(g.responses) == 4 for g in sampled.groups)


def test_existing_adapter_loads_trainable(tmp_path):
    cfg = make_cfg("lora.r=4", "lora.target_modules=q_proj,v_proj")
    first = gp.load_stack(cfg)
    first.model.save_pretrained(tmp_path)
    again = gp.load_stack(make_cfg(f"lora.adapter_path={tmp_path}", "lora.r=16"))
    assert len(again.params) == len(first.params) == 8
    assert all(p.requires_grad for p in again.params)
    assert all(torch.equal(a, b) for a, b in zip(first.params, again.params))
    assert again.params[0].shape[0] == 4  # the adapter's rank, not lora.r


def test_unquantised_and_fp4_stacks_run(rollouts_file):
    for mode in ("none", "fp4"):
        cfg = make_cfg(f"quant.mode={mode}", f"batch.rollouts={rollouts_file}", "checkpointing=off")
        stack = gp.load_stack(cfg)
        four_bit = sum(type(m).__name__ == "Linear4bit" for m in stack.model.modules())
        assert (four_bit > 0) == (mode != "none")
        res = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
        assert res.x_nonnull == res.n_tensors and res.deltaH1 == res.deltaH1


def test_bad_adapter_directory(tmp_path):
    with pytest.raises(gp.GradprobeError, match="no adapter_config.json"):
        gp.load_stack(make_cfg(f"lora.adapter_path={tmp_path}"))
    with pytest.raises(gp.GradprobeError, match="LoRA: .*not found|LoRA: .*target"):
        gp.load_stack(make_cfg("lora.target_modules=no_such_proj"))


@pytest.mark.slow
def test_a_cached_hub_model_loads_without_asking_the_unreachable_hub(tmp_path, monkeypatch):
    """With the hub unreachable, a model in the Hugging Face cache loads at once: not one network lookup (there
    were five retries per file, transformers' adapter_config.json probe included); one not cached is one line."""
    import socket

    import huggingface_hub.constants

    import gradprobe.stack as gp_stack
    from gradprobe.errors import GradprobeError
    from tests.support.export import save_preset

    repo = tmp_path / "models--someorg--tiny"
    save_preset("tiny", repo / "snapshots" / ("a" * 40), seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gp_stack.hub_unreachable.cache_clear()
    lookups = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a) or real(*a, **k))
    try:
        stack = gp.load_stack(make_cfg("model.name_or_path=someorg/tiny"))
        assert stack.n_params > 0 and lookups == []
        assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before  # the offline switch is put back
        with pytest.raises(GradprobeError, match="not in the Hugging Face cache, and the hub cannot be asked"):
            gp.load_stack(make_cfg("model.name_or_path=someorg/other"))
    finally:
        gp_stack.hub_unreachable.cache_clear()

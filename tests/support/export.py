"""Write a preset architecture as an ordinary Hugging Face model directory (config, weights, tokenizer).

Train on it with any trainer, and its adapter_config.json names a real directory that gradprobe (or
anything else) loads through from_pretrained: the offline stand-in for a hub model in tests and demos.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradprobe.stack import PRESETS
from gradprobe.tokenizer import BOS, EOS, PAD, CharTokenizer


def hf_char_tokenizer():
    """A byte-level BPE tokenizer without merges: one token per character, with the built-in CharTokenizer's
    ids, so any transformers version loads it through AutoTokenizer (even as the Qwen2 tokenizer class)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = CharTokenizer()
    byte_char = bytes_to_unicode()
    vocab = {tok if tok in char.specials else byte_char[ord(tok)]: i for tok, i in char.index.items()}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left")


def save_preset(preset: str, path: str | Path, seed: int = 0) -> Path:
    """The preset's random-weight model (seeded as load_stack seeds it) in fp32, plus a tokenizer when the
    preset uses the built-in vocabulary; returns the directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(path)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**PRESETS[preset]))
    model.save_pretrained(out)
    if PRESETS[preset]["vocab_size"] == len(CharTokenizer()):
        hf_char_tokenizer().save_pretrained(out)
    return out

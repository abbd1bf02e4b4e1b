"""A built-in character tokenizer so the embedded default needs no downloaded files."""

from __future__ import annotations

import re

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+-=*"
MICRO_ALPHABET = "abcdefg"  # the "micro" preset: 10 ids, so every short response can be enumerated


class CharTokenizer:
    """Maps each character of the alphabet (ALPHABET unless given) to one id; ids 0-2 are pad, bos, eos."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        self.specials = [PAD, BOS, EOS]
        self.vocab = self.specials + list(alphabet)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special tokens written as text ("<eos>") become their ids, as in Hugging Face tokenizers."""
        parts = re.split(f"({'|'.join(map(re.escape, self.specials))})", text)
        plain = "".join(parts[0::2])
        unknown = sorted({c for c in plain.lower() if c not in self.index})
        if unknown:
            raise ValueError(f"characters outside the built-in alphabet: {''.join(unknown)!r}")
        ids = [self.index[c] for i, part in enumerate(parts) for c in ([part] if i % 2 else part.lower())]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special and i < len(self.specials)))

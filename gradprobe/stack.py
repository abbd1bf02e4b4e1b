"""The QLoRA stack a probe runs on: base model, 4-bit quantisation, LoRA, autocast, checkpointing."""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import GradprobeError, is_out_of_memory
from .tokenizer import MICRO_ALPHABET, CharTokenizer

if TYPE_CHECKING:
    from .config import Config

# Architecture presets with random weights: offline runs and benchmarks at real shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=len(CharTokenizer()), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, tie_word_embeddings=True),
    # Small enough to enumerate every response exactly (gradprobe validate's ground truth); the wider
    # initialisation gives a peaked, prompt-dependent policy instead of a near-uniform one.
    "micro": dict(vocab_size=len(CharTokenizer(MICRO_ALPHABET)), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.2),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1e6),
}

# Presets whose tokenizer is the built-in one with a smaller alphabet.
PRESET_ALPHABETS: dict[str, str] = {"micro": MICRO_ALPHABET}
SMALL_PRESETS = ("tiny", "micro")  # saved in fp32 before quantisation

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Stack:
    """Everything the probe and the checks need about the model under test."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    autocast_dtype: torch.dtype | None
    checkpointing: str
    names: list[str] = field(default_factory=list)
    params: list[torch.nn.Parameter] = field(default_factory=list)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def refresh_params(self) -> None:
        """The trainable parameters in one fixed, named order (the order of named_parameters)."""
        pairs = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GradprobeError("device 'cuda' was asked for but no CUDA device is visible")
    if name == "cuda" and distributed.active():  # torchrun: this rank's GPU (LOCAL_RANK), by its index
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence load-time chatter (progress bars, optional-kernel notices) that buries our output."""
    import transformers

    names = ("transformers", "bitsandbytes", "peft", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _quant_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    mode = cfg.quant.mode
    if mode == "none":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                              bnb_4bit_compute_dtype=DTYPES[cfg.quant.compute_dtype],
                              bnb_4bit_use_double_quant=cfg.quant.double_quant)


HUB_HOST = "huggingface.co"


def looks_local(source: str) -> bool:
    """A model source written as a path ('./m', '/data/m', '~/m', 'a/b/c'), not a hub id ('org/name')."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline set, no route, no name resolution), or None.
    Asked once, with a short timeout: with no network transformers would retry for a minute or more."""
    import os
    import socket
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")).hostname or HUB_HOST
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def check_model_source(source: str | None) -> None:
    """Before anything loads: a local path that is missing or holds no model or damaged weights, or a hub id
    that is neither cached nor reachable, is one line at once (not a minute of hub retries)."""
    if source is None:
        return
    if looks_local(source) or Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if not path.exists():
            raise GradprobeError(f"model.name_or_path {source}: no such directory (a path, so the hub is not asked)")
        if not path.is_dir():
            raise GradprobeError(f"model.name_or_path {source} is a file; give the model's directory")
        if not (path / "config.json").is_file():
            raise GradprobeError(f"model.name_or_path {source}: no config.json in the directory (not a "
                                 f"transformers model directory)")
        check_weights(path)
        return
    why = hub_unreachable()
    if why is None:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise GradprobeError(f"model.name_or_path '{source}': no such local directory, not in the Hugging Face "
                             f"cache, and the hub cannot be asked: {why}")


def check_weights(path: Path, what: str = "model weights") -> None:
    """Each safetensors file's header parses and covers the file (a truncated or foreign file fails here)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as exc:  # SafetensorError and OSError: damaged, truncated or not safetensors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GradprobeError(f"cannot read {what} {f}: {first}") from None


@contextlib.contextmanager
def _offline_if_unreachable(source: str | None) -> Iterator[None]:
    """Hugging Face's offline mode while a hub model loads from the cache with the hub unreachable: every
    request (the weights, the tokenizer, transformers' look for an adapter_config.json) is answered from the
    cache at once instead of after five retries each."""
    if source is None or looks_local(source) or not hub_unreachable():
        yield
        return
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _load_pretrained(source: str, cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM

    quant = _quant_config(cfg)
    kwargs: dict[str, Any] = dict(trust_remote_code=cfg.model.trust_remote_code)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)}, dtype=torch.float32)
    else:
        kwargs.update(dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # OSError, ValueError, SafetensorError, EOFError: a damaged or foreign model
        if is_out_of_memory(exc) or not isinstance(exc, (OSError, ValueError, EOFError)) and \
                type(exc).__name__ != "SafetensorError":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradprobeError(f"cannot load model '{source}': {first}") from exc
    return model if quant is not None else model.to(device)


def _random_model(preset: str, cfg: Config, device: torch.device):
    """A preset architecture with seeded random weights, loaded through the same path as real weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**PRESETS[preset])
    torch.manual_seed(cfg.seed)
    init_device = device if device.type == "cuda" else torch.device("cpu")
    with torch.device(init_device):
        model = Qwen2ForCausalLM(config)
    if cfg.quant.mode == "none":
        return model.to(device)
    with tempfile.TemporaryDirectory(prefix="gradprobe-") as tmp:
        # this process's own directory: under torchrun transformers writes on rank 0 only unless told
        model.should_save_on_this_rank = lambda is_main_process: True
        model.to(torch.float32 if preset in SMALL_PRESETS else torch.bfloat16).save_pretrained(tmp)
        del model
        return _load_pretrained(tmp, cfg, device)


def _tokenizer(cfg: Config):
    source = cfg.model.name_or_path
    if source is None:
        preset = cfg.model.preset
        return CharTokenizer(PRESET_ALPHABETS[preset]) if preset in PRESET_ALPHABETS else CharTokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise GradprobeError(f"cannot load the tokenizer of '{source}': {str(exc).splitlines()[0]}") from exc
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _add_lora(base, cfg: Config):
    from peft import LoraConfig, PeftModel, get_peft_model

    lcfg = cfg.lora
    if lcfg.adapter_path:
        path = Path(lcfg.adapter_path)
        if not (path / "adapter_config.json").is_file():
            raise GradprobeError(f"no adapter_config.json in adapter directory {path}")
        try:
            return PeftModel.from_pretrained(base, str(path), is_trainable=True)
        except Exception as exc:  # OSError, ValueError, RuntimeError, SafetensorError: a damaged or foreign adapter
            if is_out_of_memory(exc) or not isinstance(exc, (OSError, ValueError, RuntimeError)) and \
                    type(exc).__name__ != "SafetensorError":
                raise
            raise GradprobeError(f"cannot load adapter {path}: {str(exc).strip().splitlines()[0]}") from exc
    lora = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                      target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM",
                      init_lora_weights=lcfg.init == "zero_b")
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:
        raise GradprobeError(f"LoRA: {str(exc).splitlines()[0]}") from exc


def _cast_adapter(model, dtype: str) -> None:
    """The trainable weights in the dtype the run trains them in (lora.dtype): PEFT keeps them in fp32, TRL's
    GRPOTrainer casts them to bf16 on a quantised base (all but DoRA's magnitude vectors)."""
    if dtype == "float32":
        return
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_magnitude_vector" not in name:
            p.data = p.data.to(DTYPES[dtype])


def _keep_trainable_4bit_layout(model) -> None:
    """On CPU, bitsandbytes repacks 4-bit weights for an inference-only kernel the first time a layer
    runs in eval mode without grad (as during generation); later training forwards then take that
    kernel, whose in-place bias add fails under autograd. Keep the trainable layout throughout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _enable_checkpointing(model, mode: str) -> None:
    if mode == "off":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    # Reentrant checkpointing only records a graph when some input requires grad.
    model.enable_input_require_grads()


def load_stack(cfg: Config) -> Stack:
    """Build the model under test as the config says; on CPU or CUDA."""
    device = resolve_device(cfg.device)
    source = cfg.model.name_or_path
    check_model_source(source)
    with quiet_libraries(), _offline_if_unreachable(source):
        torch.manual_seed(cfg.seed)
        base = _load_pretrained(source, cfg, device) if source else _random_model(cfg.model.preset, cfg, device)
        base.config.use_cache = False
        if cfg.quant.mode != "none":
            for p in base.parameters():  # norms and embeddings in fp32, as QLoRA recipes do
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
        _keep_trainable_4bit_layout(base)
        _enable_checkpointing(base, cfg.checkpointing)
        torch.manual_seed(cfg.seed + 1)
        model = _add_lora(base, cfg)
        _cast_adapter(model, cfg.lora.dtype)
        model.train()
    with _offline_if_unreachable(source):
        tokenizer = _tokenizer(cfg)
    autocast = None if cfg.autocast == "off" else DTYPES[cfg.autocast]
    return live_stack(model, tokenizer, autocast, device=device, checkpointing=cfg.checkpointing)


def live_stack(model: torch.nn.Module, tokenizer: Any, autocast_dtype: torch.dtype | None, *,
               device: torch.device | None = None, checkpointing: str | None = None) -> Stack:
    """A Stack over a model someone else built and trains (a Trainer's): its device and checkpointing mode
    read from the model itself when not given, its trainable parameters in named order."""
    if checkpointing is None:
        from .diagnose.model_state import checkpointing_state

        checkpointing = checkpointing_state(model)["mode"]
    if device is None:
        device = next(model.parameters()).device
    stack = Stack(model=model, tokenizer=tokenizer, device=device, autocast_dtype=autocast_dtype,
                  checkpointing=checkpointing)
    stack.refresh_params()
    if not stack.params:
        raise GradprobeError("the model has no trainable parameters (is the adapter loaded as trainable?)")
    return stack

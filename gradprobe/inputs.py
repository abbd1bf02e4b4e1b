"""Every input a command reads opened and checked, and every output's directory tried for writing, before the
model loads: a typo must cost a second, not the minute a model load takes or the hour a run takes.

What needs the model (token ids against its vocabulary, lengths against its context, the optimizer state's
tensors against the adapter) is checked where the model is; everything else is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import GradprobeError
from .files import check_outputs

if TYPE_CHECKING:
    from .config import Config

# The first bytes of a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


class _ShapeOnly:
    """Stands in for the tokenizer before the model loads: text is taken as one token per character, so the
    rollouts' structure (keys, G, numbers, lengths) is checked and their token ids later, against the model."""

    index: dict[str, int] = {}

    @staticmethod
    def encode(text: str) -> list[int]:
        return [0] * len(text)


def check_rollouts_file(path: str | Path, probe: bool = True) -> None:
    """A rollouts JSONL's format, line by line (rollouts.read_rollouts without the model); `probe`: also what
    makes a probe's numbers meaningless (all responses empty, astronomically large rewards)."""
    from .rollouts import check_probe_batch, read_rollouts

    batch = read_rollouts(path, _ShapeOnly())
    if probe:
        check_probe_batch(batch)


def check_torch_file(path: str | Path, what: str) -> None:
    """Exists, is a file, readable, and starts as a torch.save file does (its contents are read later, safely)."""
    p = Path(path)
    if p.is_dir():
        raise GradprobeError(f"{what} {p} is a directory; give the file (optimizer.pt)")
    if not p.exists():
        raise GradprobeError(f"{what} not found: {p}")
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise GradprobeError(f"cannot read {what} {p}: {exc.strerror or type(exc).__name__}") from None
    if not head.startswith(_TORCH_MAGIC):
        why = "empty" if not head else "not a torch.save file (neither a zip archive nor a pickle)"
        raise GradprobeError(f"cannot read {what} {p}: {why}")


def reward_spec_file(spec: str) -> str | None:
    """The file of a 'path/to/file.py:function' reward, else None."""
    module = spec.rsplit(":", 1)[0]
    return module if spec != "builtin" and module.endswith(".py") else None


def check_inputs(cfg: Config, outputs: dict[str, str | Path | None] | None = None,
                 extra_inputs: tuple[str | Path | None, ...] = (), probe: bool = True) -> None:
    """Before the model loads: outputs writable and none of them an input; the model source, the adapter, the
    rollouts files, the reward plugin and the optimizer state. `probe`: the command estimates deltaH (diagnose
    reports an empty batch as a failed check instead)."""
    from .stack import check_model_source, check_weights

    ins = [*extra_inputs, cfg.batch.rollouts, cfg.batch.entropy_rollouts, cfg.probe.optimizer_state,
           cfg.model.name_or_path, cfg.lora.adapter_path, reward_spec_file(cfg.batch.reward)]
    check_outputs(outputs or {}, ins)
    check_model_source(cfg.model.name_or_path)
    adapter = cfg.lora.adapter_path
    if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        where = "no such directory" if not Path(adapter).expanduser().exists() else "no adapter_config.json in it"
        raise GradprobeError(f"lora.adapter_path {adapter}: {where}")
    if adapter:
        check_weights(Path(adapter).expanduser(), "adapter weights")
    for path in (cfg.batch.rollouts, cfg.batch.entropy_rollouts):
        if path:
            check_rollouts_file(path, probe)
    if not cfg.batch.rollouts and cfg.batch.reward != "builtin":  # generated responses are scored by it
        from .rewards import load_reward

        load_reward(cfg.batch.reward)
    if cfg.probe.optimizer_state:
        check_torch_file(cfg.probe.optimizer_state, "optimizer state")

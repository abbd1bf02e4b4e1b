"""gradprobe: gradient-flow diagnosis and first-order entropy-change probes for QLoRA RL fine-tuning."""

from .api import build_batch, delta_h1
from .config import Config, load_config
from .diagnose import diagnose
from .errors import CheckFailed, GradprobeError
from .probe import ProbeResult
from .rollouts import Batch, Group, read_rollouts, write_rollouts
from .runs import run_delta_h1, run_diagnose, run_validate
from .stack import Stack, load_stack

__all__ = ["Batch", "BatchCapture", "CheckFailed", "Config", "GradprobeCallback", "GradprobeError", "Group",
           "ProbeResult", "Stack", "build_batch", "delta_h1", "diagnose", "load_config", "load_stack", "read_rollouts",
           "run_delta_h1", "run_diagnose", "run_validate", "write_rollouts"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """GradprobeCallback and BatchCapture on first use: importing transformers' Trainer machinery costs seconds the
    CLI never needs."""
    if name == "GradprobeCallback":
        from .callback import GradprobeCallback

        return GradprobeCallback
    if name == "BatchCapture":
        from .capture import BatchCapture

        return BatchCapture
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")

"""gradprobe: gradient-flow diagnosis and first-order entropy-change probes for QLoRA RL fine-tuning."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .errors import CheckFailed, GradprobeError

# Each public name and its module, imported on first use: `import gradprobe` (and so the console script, which
# installs its signal handler first) does not pay for torch and transformers before they are needed.
_LAZY = {"Config": "config", "load_config": "config", "build_batch": "api", "delta_h1": "api",
         "diagnose": "diagnose", "ProbeResult": "probe", "Batch": "rollouts", "Group": "rollouts",
         "read_rollouts": "rollouts", "write_rollouts": "rollouts", "run_delta_h1": "runs", "run_diagnose": "runs",
         "run_validate": "runs", "Stack": "stack", "load_stack": "stack", "GradprobeCallback": "callback",
         "BatchCapture": "capture"}

__all__ = ["Batch", "BatchCapture", "CheckFailed", "Config", "GradprobeCallback", "GradprobeError", "Group",
           "ProbeResult", "Stack", "build_batch", "delta_h1", "diagnose", "load_config", "load_stack", "read_rollouts",
           "run_delta_h1", "run_diagnose", "run_validate", "write_rollouts"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """`gradprobe.diagnose` is the function, as it was when imported eagerly: the import system's binding of
    the subpackage under the same name does not replace it once it is resolved."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "diagnose" and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # unresolved: __getattr__ gives the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""Old import paths kept working after a module moved (CHANGELOG.md lists each): importing one warns once and
forwards every attribute to the module's new home, so a user's script keeps running while they update it."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

# old module -> its new home
MOVED = {
    "gradprobe.checkpoint": "gradprobe.trainer_checkpoint",
    "gradprobe.logprobs": "gradprobe.objective",
    "gradprobe.ustat": "gradprobe.probe.ustat",
    "gradprobe.lora_grads": "gradprobe.probe.lora_grads",
}


def alias(old: str) -> None:
    """Make the module `old` (being imported) a forwarder to MOVED[old], with a DeprecationWarning."""
    new = MOVED[old]
    warnings.warn(f"{old} moved to {new}; import it from there ({old} will be removed in a later release)",
                  DeprecationWarning, stacklevel=3)
    target = importlib.import_module(new)
    module: ModuleType = sys.modules[old]
    module.__getattr__ = lambda name: getattr(target, name)  # type: ignore[method-assign]
    module.__dir__ = lambda: dir(target)  # type: ignore[method-assign]

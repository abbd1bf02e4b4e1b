"""Rewards for generated responses: the built-in one, or the user's own function named `module:function`.

A reward function has the signature

    def reward(prompt: str, response: str) -> float

(prompt and response as decoded text, special tokens dropped) and is called once per response. The
module is imported by name from the Python path (the current directory included), or from a file
when the spec is `path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import GradprobeError, is_out_of_memory
from .rollouts import MAX_ABS_REWARD, builtin_reward

RewardFn = Callable[[str, str], float]


def _import(module: str):
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise GradprobeError(f"reward plugin file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"gradprobe_reward_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    added = "" not in sys.path and "." not in sys.path
    if added:  # a console script does not put the working directory on the path; a user's plugin lives there
        sys.path.insert(0, "")
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove("")


def load_reward(spec: str) -> RewardFn:
    """'builtin' or 'module:function' -> a checked callable (each error is one line)."""
    if spec == "builtin":
        return builtin_reward
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise GradprobeError(f"batch.reward must be 'builtin' or 'module:function'; got {spec!r}")
    try:
        mod = _import(module)
    except GradprobeError:
        raise
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        raise GradprobeError(f"reward plugin {spec}: cannot import '{module}': {type(exc).__name__}: {exc}") from exc
    fn = getattr(mod, name, None)
    if fn is None:
        raise GradprobeError(f"reward plugin {spec}: module '{module}' has no attribute '{name}'")
    if not callable(fn):
        raise GradprobeError(f"reward plugin {spec}: '{name}' is not callable")

    def reward(prompt: str, response: str) -> float:
        try:
            value = fn(prompt, response)
        except Exception as exc:
            if is_out_of_memory(exc):  # a reward model out of memory is the run's memory, not bad input
                raise
            raise GradprobeError(f"reward plugin {spec} raised {type(exc).__name__}: {exc} "
                                 f"(on prompt {prompt!r})") from exc
        number = _number(value)
        if number is None:
            raise GradprobeError(f"reward plugin {spec} returned {value!r} ({type(value).__name__}), not a number "
                                 f"(a float, an int, or a one-element tensor or array)")
        value = number
        if not math.isfinite(value):
            raise GradprobeError(f"reward plugin {spec} returned {value} (not finite)")
        if abs(value) > MAX_ABS_REWARD:
            raise GradprobeError(f"reward plugin {spec} returned {value:g}, beyond +-{MAX_ABS_REWARD:g}: every "
                                 f"estimate would overflow or be rounding noise; rescale the rewards")
        return value

    return reward


def _number(value: object) -> float | None:
    """A reward as a float: int, float, or a one-value numpy/torch scalar; text and bools are not rewards
    (float("1.0") would hide a plugin that returns the wrong thing)."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        return None
    if hasattr(value, "item"):  # numpy and torch scalars; more than one value raises
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)

"""What a bug report needs about the machine: versions of the stack, the bitsandbytes backend, the devices.

Collection never raises: a missing or broken package is reported as such, because `gradprobe env`
is what a user runs when something is already wrong.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import platform
import sys
import warnings
from typing import Any

PACKAGES = ("gradprobe", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "safetensors",
            "tokenizers", "typer", "rich")


def available_host_memory() -> int | None:
    """Bytes the kernel could hand out now without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _bitsandbytes() -> dict[str, Any]:
    """The backend bitsandbytes chose and whether its native library loaded (imported quietly)."""
    info: dict[str, Any] = {"version": _version("bitsandbytes")}
    if info["version"] is None:
        return info
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            importlib.import_module("bitsandbytes")
            cext = importlib.import_module("bitsandbytes.cextension")
    except Exception as exc:
        info["import_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return info
    info["backend"] = getattr(cext, "BNB_BACKEND", None)
    lib = getattr(cext, "lib", None)
    info["native_library"] = type(lib).__name__ if lib is not None else None
    info["native_library_loaded"] = lib is not None and "Mock" not in type(lib).__name__
    return info


def _driver_cuda() -> str | None:
    """The newest CUDA the installed driver supports, asked of the driver itself (torch has no public call)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"  # e.g. 12040 -> 12.4


def _torch() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "hip_build": torch.version.hip,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "threads": torch.get_num_threads(),
        "devices": [],
    }
    if cuda:
        info["driver_cuda"] = _driver_cuda()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "bf16": p.major >= 8})
    return info


def collect() -> dict[str, Any]:
    """Everything `gradprobe env` prints, as one JSON-ready dict."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "environment": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "BNB_CUDA_VERSION", "HF_HUB_OFFLINE",
                                                   "TRANSFORMERS_OFFLINE") if k in os.environ},
    }
    try:
        env["torch"] = _torch()
    except Exception as exc:
        env["torch"] = {"import_error": f"{type(exc).__name__}: {exc}"}
    env["bitsandbytes"] = _bitsandbytes()
    return env

"""`gradprobe env`: versions and devices, paste-ready for a bug report."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DebugOpt, check_paths, consoles, guarded, write_json

EPILOG = """Examples:

  gradprobe env

  gradprobe env --json env.json
"""


def _lines(env: dict) -> list[str]:
    pk = env["packages"]
    t, b = env["torch"], env["bitsandbytes"]
    lines = [f"python        {env['python']} ({env['executable']})",
             f"platform      {env['platform']}, {env['cpu_count']} CPUs"]
    lines += [f"{name:<13} {pk[name] or 'not installed'}" for name in pk]
    if "import_error" in t:
        lines.append(f"torch import  FAILED: {t['import_error']}")
    else:
        build = f"CUDA {t['cuda_build']}" if t["cuda_build"] else f"ROCm {t['hip_build']}" if t["hip_build"] else "CPU"
        driver = f" (driver supports CUDA {t['driver_cuda']}, cuDNN {t['cudnn']})" if t["cuda_available"] else ""
        lines.append(f"torch build   {build}; CUDA available: {t['cuda_available']}{driver}; {t['threads']} threads")
        for d in t["devices"]:
            lines.append(f"device {d['index']}      {d['name']}, compute {d['capability']}, {d['memory_gib']} GiB, "
                         f"bf16 {'yes' if d['bf16'] else 'no'}")
        if not t["devices"]:
            lines.append("devices       cpu only")
    if b.get("version"):
        if "import_error" in b:
            lines.append(f"bnb backend   import FAILED: {b['import_error']}")
        else:
            loaded = "loaded" if b["native_library_loaded"] else "NOT loaded"
            lines.append(f"bnb backend   {b['backend']}, native library {loaded} ({b['native_library']})")
    for k, v in env["environment"].items():
        lines.append(f"{k}={v}")
    return lines


def command(
    json_: Annotated[str | None, typer.Option("--json", help="Write the report as JSON to PATH, or '-' for stdout.",
                                              show_default=False)] = None,
    debug: DebugOpt = False,
) -> None:
    """Print Python, torch, transformers, peft, bitsandbytes (and its backend), CUDA and the devices seen."""
    out, err = consoles(False, json_ == "-")

    def body() -> int:
        from ..environment import collect

        check_paths({"--json": json_})
        env = collect()
        if json_ != "-":
            out.print("\n".join(_lines(env)), markup=False, highlight=False, soft_wrap=True)
        write_json({"schema": "gradprobe.env/1", "command": "env", **env}, json_)
        return 0

    guarded(debug, err, body)

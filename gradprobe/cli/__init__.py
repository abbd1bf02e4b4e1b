"""The `gradprobe` command line: thin Typer wrappers over the library (the application: cli/application.py).

This module stays light: the console script installs its signal handler here before torch, transformers
and Typer are imported, so that Ctrl-C in the first seconds is one line and exit 130, not a traceback
(or an import error of a half-imported library).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _before_the_work(signum: int, _frame: Any) -> None:
    """Nothing has been computed or written yet: say so and leave at once with 128 + the signal's number."""
    name = signal.Signals(signum).name
    os.write(2, f"interrupted by {name} before the work began; nothing written\n".encode())
    os._exit(128 + signum)


def main() -> None:
    """The console script: usage errors too become one line on stderr and exit code 2."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _before_the_work)
    from .application import app

    if len(sys.argv) == 1:  # no arguments: the help screen
        app()
    try:
        code = app(standalone_mode=False, prog_name="gradprobe")
    except Exception as exc:
        if not hasattr(exc, "format_message") or not isinstance(getattr(exc, "exit_code", None), int):
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and exc.exit_code == 2 else ""
        sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
        code = exc.exit_code
    except BaseException as exc:
        if type(exc).__name__ != "Abort":  # Ctrl-C at a prompt
            raise
        sys.stderr.write("interrupted\n")
        code = 4
    sys.exit(code if isinstance(code, int) else 0)


def __getattr__(name: str) -> Any:
    """`from gradprobe.cli import app` imports the application on first use."""
    if name == "app":
        from .application import app

        return app
    raise AttributeError(f"module 'gradprobe.cli' has no attribute {name!r}")

"""The `gradprobe` command line: thin Typer wrappers over the library."""

from __future__ import annotations

import typer

from . import delta_h1, diagnose, env, plot, validate

app = typer.Typer(name="gradprobe", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Gradient-flow diagnosis and entropy-change probes for QLoRA RL fine-tuning.")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"gradprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Exit codes: 0 done/healthy, 1 a check failed, 2 bad input or usage, 3 internal error, 4 interrupted
    (partial result written), 5 out of memory."""


app.command("delta-h1", epilog=delta_h1.EPILOG)(delta_h1.command)
app.command("diagnose", epilog=diagnose.EPILOG)(diagnose.command)
app.command("env", epilog=env.EPILOG)(env.command)
app.command("plot", epilog=plot.EPILOG)(plot.command)
app.command("validate", epilog=validate.EPILOG)(validate.command)


def main() -> None:
    """The console script: usage errors too become one line on stderr and exit code 2."""
    import sys

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

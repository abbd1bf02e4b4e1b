"""The Typer application: one line per command (gradprobe/cli/NAME.py)."""

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
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                       help="Print the version and exit.")) -> None:
    """Exit codes: 0 done/healthy, 1 a check failed, 2 bad input or usage, 3 internal error, 4 interrupted
    (partial result written), 5 out of memory, 130 interrupted before the work began (nothing written)."""


app.command("delta-h1", epilog=delta_h1.EPILOG)(delta_h1.command)
app.command("diagnose", epilog=diagnose.EPILOG)(diagnose.command)
app.command("env", epilog=env.EPILOG)(env.command)
app.command("plot", epilog=plot.EPILOG)(plot.command)
app.command("validate", epilog=validate.EPILOG)(validate.command)

"""The Typer application: one line per command (gradprobe/cli/NAME.py)."""

from __future__ import annotations

import typer
from typer.core import TyperCommand, TyperGroup

from . import delta_h1, diagnose, env, plot, validate


class _PlainHelp:
    """--help without a type label: Typer labels every flag (`<bool>`), which reads as a value to give."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(_PlainHelp, TyperCommand):
    pass


class Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(name="gradprobe", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  cls=Group, help="Gradient-flow diagnosis and entropy-change probes for QLoRA RL fine-tuning.")


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


app.command("delta-h1", epilog=delta_h1.EPILOG, cls=Command)(delta_h1.command)
app.command("diagnose", epilog=diagnose.EPILOG, cls=Command)(diagnose.command)
app.command("env", epilog=env.EPILOG, cls=Command)(env.command)
app.command("plot", epilog=plot.EPILOG, cls=Command)(plot.command)
app.command("validate", epilog=validate.EPILOG, cls=Command)(validate.command)

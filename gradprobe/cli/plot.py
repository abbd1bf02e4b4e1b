"""`gradprobe plot`: a delta-h1 result's per-prompt contributions, or forecasts against realised changes over
training steps, in the terminal or as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, QuietOpt, check_paths, consoles, guarded

EPILOG = """Examples:

  gradprobe delta-h1 --json result.json && gradprobe plot result.json

  gradprobe plot result.json --top 10 --quantity deltaH1

  gradprobe plot run.jsonl --png run.png
"""


def command(
    file: Annotated[Path, typer.Argument(help="A `gradprobe delta-h1 --json` result, or a JSONL of forecasts (one "
                                              "object per line: step, deltaH, se_deltaH, realised, realised_se).",
                                         show_default=False)],
    png: Annotated[Path | None, typer.Option("--png", help="Also write the plot as a PNG (needs matplotlib: pip "
                                                           "install 'gradprobe\\[plot]').", show_default=False)] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Units shown (largest contributions first).")] = 20,
    quantity: Annotated[str, typer.Option("--quantity", help="The units' share of: auto (deltaH where the file "
                                                             "has it, else deltaH1), deltaH or deltaH1.")] = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plot per-prompt contributions to deltaH (a delta-h1 JSON) or predicted +- 2 SE against the realised entropy
    change over training steps (a JSONL of forecasts)."""
    out, err = consoles(quiet, False)

    def body() -> int:
        from ..plot_data import read_plot_file
        from ..report.plot import render_plot, save_png

        check_paths({"--png": png}, None, (file,))
        if png is not None:
            from ..report.common import pyplot

            pyplot("--png")  # missing matplotlib is exit 2 before anything is read or drawn
        data = read_plot_file(file, quantity)
        render_plot(out, data, top)
        if png is not None:
            save_png(data, png, top)
            out.print(f"wrote {png}", markup=False, highlight=False)
        return 0

    guarded(debug, err, body)

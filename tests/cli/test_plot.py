"""`gradprobe plot`: a real delta-h1 JSON from the tiny stack and a JSONL written here with known values, drawn in
the terminal (the rows checked character by character) and as PNG; bad files are one line and exit 2."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.cli import app
from gradprobe.cli.common import write_json
from gradprobe.report.common import fmt
from gradprobe.report.delta_h1 import delta_h1_payload
from tests.conftest import FP32, make_cfg

runner = CliRunner()


@pytest.fixture(scope="module")
def results(fp32_stacks, rollouts_file, tmp_path_factory) -> dict[str, str]:
    """delta-h1 JSON files as the CLI writes them (NaN -> null): packed (deltaH per unit) and literal (none)."""
    stack = fp32_stacks["non_reentrant"]
    d = tmp_path_factory.mktemp("plot")
    files = {}
    for schedule in ("packed", "literal"):
        cfg = make_cfg(*FP32, "checkpointing=non_reentrant", f"batch.rollouts={rollouts_file}",
                       f"probe.schedule={schedule}")
        r = gp.delta_h1(stack, gp.build_batch(stack, cfg), cfg)
        files[schedule] = str(d / f"{schedule}.json")
        write_json({**delta_h1_payload(r, cfg), "complete": True}, files[schedule])
    return files


def unit_lines(output: str) -> list[list[str]]:
    """The unit rows of the terminal plot: [unit, value, bar, text]."""
    rows = []
    for line in output.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and "│" in line:
            bar = line[19:60]
            rows.append([parts[0], parts[1], bar, line[62:]])
    return rows


def test_contributions_of_a_real_result(results):
    payload = json.loads(open(results["packed"]).read())
    units = payload["units"]
    res = runner.invoke(app, ["plot", results["packed"]])
    assert res.exit_code == 0, res.output
    total = sum(u["deltaH"] for u in units)
    assert f"per-prompt contributions to deltaH: top 6 of 6 units; all units sum to {fmt(total)}" in res.stdout
    assert total == pytest.approx(payload["result"]["deltaH"], rel=1e-9)
    want = sorted(units, key=lambda u: -abs(u["deltaH"]))
    rows = unit_lines(res.stdout)
    assert [r[:2] for r in rows] == [[str(u["unit"]), fmt(u["deltaH"], 3)] for u in want]
    assert [r[3] for r in rows] == [u["text"] for u in want]
    biggest = abs(want[0]["deltaH"])
    for r, u in zip(rows, want):  # the bar: |share|/largest of 20 cells, left of the centre when negative
        n = round(abs(u["deltaH"]) / biggest * 20)
        assert r[2][20] == "│" and r[2].count("█") == n
        assert (r[2][:20].count("█") == n) == (u["deltaH"] < 0 or n == 0)
    top2 = runner.invoke(app, ["plot", results["packed"], "--top", "2", "--quantity", "deltaH1"])
    assert top2.exit_code == 0, top2.output
    want1 = sorted(units, key=lambda u: -abs(u["deltaH1"]))[:2]
    assert [r[:2] for r in unit_lines(top2.stdout)] == [[str(u["unit"]), fmt(u["deltaH1"], 3)] for u in want1]


def test_literal_result_falls_back_to_deltaH1(results):
    res = runner.invoke(app, ["plot", results["literal"]])
    assert res.exit_code == 0, res.output
    assert "per-prompt contributions to deltaH1: top 6 of 6 units" in res.stdout
    bad = runner.invoke(app, ["plot", results["literal"], "--quantity", "deltaH"])
    assert bad.exit_code == 2 and "no unit has a value for deltaH" in bad.stderr


def test_entropy_batch_units_are_plotted_for_deltaH(tmp_path):
    """Written here with known values: deltaH's shares are the entropy batch's units when it has them."""
    unit = {"prompts": [0], "text": "say hi:", "deltaH1": 1e-6}
    payload = {"schema": "gradprobe.delta-h1/1", "command": "delta-h1", "complete": True,
               "units": [{**unit, "unit": i, "deltaH": None} for i in range(3)],
               "entropy_units": [{**unit, "unit": i, "text": f"prompt {i}", "deltaH": v, "deltaH1": None}
                                 for i, v in enumerate([2e-4, -5e-4, 1e-4, 0.0])]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload))
    res = runner.invoke(app, ["plot", str(path)])
    assert res.exit_code == 0, res.output
    assert "top 4 of 4 units, units of the independent entropy batch; all units sum to -2.0000e-04" in res.stdout
    rows = unit_lines(res.stdout)
    assert [r[0] for r in rows] == ["1", "0", "2", "3"] and rows[0][2] == "█" * 20 + "│" + " " * 20
    assert rows[1][2] == " " * 20 + "│" + "█" * 8 + " " * 12 and rows[3][2] == " " * 20 + "│" + " " * 20


STEPS = [  # step, predicted, se, realised, realised_se
    (0, -1.0, 0.25, None, None),
    (10, -1.2, 0.2, -0.6, 0.1),
    (20, 0.4, 0.3, 0.5, None),
    (30, None, None, 1.0, 0.2),
    (40, -1.5, 0.25, -1.4, 0.05),
]


def write_steps(path, steps=STEPS) -> None:
    keys = ("step", "deltaH", "se_deltaH", "realised", "realised_se")
    path.write_text("\n".join(json.dumps({**dict(zip(keys, s)), "loss": 0.5}) for s in reversed(steps)) + "\n")


def test_forecasts_over_steps(tmp_path):
    """lo = -2 (step 0: -1 - 2*0.25... step 40: -1.5 - 0.5 = -2.0), hi = 1.0 (step 20: 0.4 + 0.6): 41 columns,
    col(x) = round((x + 2)/3 * 40); rows in step order whatever the file's order."""
    path = tmp_path / "run.jsonl"
    write_steps(path)
    res = runner.invoke(app, ["plot", str(path)])
    assert res.exit_code == 0, res.output

    def col(x):
        return round((x + 2.0) / 3.0 * 40)

    rows = [line for line in res.stdout.splitlines() if line[:7].strip().isdigit()]
    assert [int(r[:7]) for r in rows] == [0, 10, 20, 30, 40]
    for row, (_, pred, se, real, real_se) in zip(rows, STEPS):
        cells = row[9:50]
        assert cells[col(0.0)] in "│●✕◆"
        if pred is not None:
            assert cells[col(pred)] in "●◆" and cells[col(pred - 2 * se)] in "─●✕◆"
            assert f"{fmt(pred, 3)} ± {fmt(2 * se, 2)}" in row
        else:
            assert "●" not in cells and row.split()[-4:] == ["n/a", fmt(real, 3), "±", fmt(2 * real_se, 2)]
        if real is not None:
            assert cells[col(real)] in "✕◆"
    assert rows[0].rstrip().endswith("n/a")
    paired = [(p, r) for _, p, _, r, _ in STEPS if p is not None and r is not None]
    within = sum(abs(r - p) <= 2 * math.hypot(s or 0, rs or 0) for _, p, s, r, rs in STEPS
                 if p is not None and r is not None)
    corr = statistics.correlation([p for p, _ in paired], [r for _, r in paired])
    assert (f"3 of 5 steps have both: {within} realised within 2 combined SE of the forecast; correlation "
            f"{corr:.2f}") in " ".join(res.stdout.split())
    assert within == 2  # step 10 is off by 0.6 > 2 * hypot(0.2, 0.1)


def test_png_of_both_kinds(results, tmp_path):
    pytest.importorskip("matplotlib")
    steps = tmp_path / "run.jsonl"
    write_steps(steps)
    for src, png in ((results["packed"], tmp_path / "u.png"), (str(steps), tmp_path / "s.png")):
        res = runner.invoke(app, ["plot", src, "--png", str(png), "--quiet"])
        assert res.exit_code == 0, res.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_png_without_matplotlib_names_the_extra(results, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = runner.invoke(app, ["plot", results["packed"], "--png", str(tmp_path / "u.png")])
    assert res.exit_code == 2 and "pip install 'gradprobe[plot]'" in res.stderr
    assert not (tmp_path / "u.png").exists() and "Traceback" not in res.output


@pytest.mark.parametrize("name, content, says", [
    ("missing", None, "no such file"),
    ("binary.png", b"\x89PNG\r\n\x1a\n\x00\xff", "cannot read it as text"),
    ("empty.jsonl", b"\n\n", "empty: no forecasts"),
    ("other.json", b'{"schema": "gradprobe.diagnose/1", "command": "diagnose"}', "neither a delta-h1 JSON"),
    ("partial.json", b'{"schema": "gradprobe.partial/1", "command": "delta-h1", "complete": false}', "--resume"),
    ("old.json", b'{"schema": "gradprobe.delta-h1/1", "command": "delta-h1", "result": {}}', "older gradprobe"),
    ("noval.jsonl", b'{"step": 1, "deltaH": 1.0, "se_deltaH": 0.1, "realised": null}\n',
     ":1: missing key 'realised_se'"),
    ("badline.jsonl", b'{"step": 1, "deltaH": 1, "se_deltaH": 1, "realised": 1, "realised_se": 1}\nnope\n',
     ":2: not valid JSON"),
    ("step.jsonl", b'{"step": "1", "deltaH": 1, "se_deltaH": 1, "realised": 1, "realised_se": 1}\n',
     "'step' must be an integer"),
    ("text.jsonl", b'{"step": 1, "deltaH": "big", "se_deltaH": 1, "realised": 1, "realised_se": 1}\n',
     "'deltaH' must be a number or null"),
    ("unit.json", b'{"command": "delta-h1", "units": [{"unit": 0, "text": "a", "deltaH": "x", "deltaH1": 1}]}',
     "units[0] is not a unit object"),
])
def test_bad_files_are_one_line_and_exit_2(tmp_path, name, content, says):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    res = runner.invoke(app, ["plot", str(path)])
    assert res.exit_code == 2, res.output
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output

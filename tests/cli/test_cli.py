"""The command line as a user meets it: the default run, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe import schemas
from gradprobe.cli import app
from gradprobe.cli.common import PROGRESS_LINE
from gradprobe.report.common import fmt
from tests.conftest import make_cfg
from tests.support.schema import validate

runner = CliRunner()
SCHEMA = schemas.load("delta-h1")


@pytest.mark.slow
def test_default_delta_h1_runs_and_reports_finite_numbers(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "gradprobe", "delta-h1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "deltaH1" in proc.stdout and "Traceback" not in proc.stderr
    payload = json.loads(out.read_text())
    assert payload["schema"] == "gradprobe.delta-h1/1" and payload["command"] == "delta-h1"
    r = payload["result"]
    for key in ("deltaH1", "U_cross", "se", "se_jackknife", "se_unbiased", "U_cross_var_unbiased",
                "bars_dot", "diag_sum", "B", "G", "learning_rate",
                "n_params", "x_sum_norm", "y_sum_norm", "x_nonnull", "y_nonnull", "row_means"):
        assert key in r, key
    assert math.isfinite(r["deltaH1"]) and r["deltaH1"] != 0
    assert r["se_unbiased"] > 0 and f"± {fmt(r['se_unbiased'], 2)} (pairwise SE" in proc.stdout
    assert math.isfinite(r["x_sum_norm"]) and r["x_sum_norm"] > 0
    assert math.isfinite(r["y_sum_norm"]) and r["y_sum_norm"] > 0
    assert r["x_nonnull"] == r["y_nonnull"] == r["n_tensors"]
    assert len(r["row_means"]) == r["B"] == 8
    assert validate(payload, SCHEMA, SCHEMA) == []
    units = payload["units"]  # per-prompt attribution: the shares sum to the estimates
    assert sum(u["deltaH"] for u in units) == pytest.approx(r["deltaH"], rel=1e-9)
    assert sum(u["deltaH1"] for u in units) == pytest.approx(r["deltaH1"], rel=1e-5)
    top = max(units, key=lambda u: abs(u["deltaH"]))
    assert "largest per-prompt contributions to deltaH (of 8 units)" in proc.stdout
    assert any([c.strip() for c in line.split("│")[1:3]] == [str(top["unit"]), fmt(top["deltaH"], 3)]
               and top["text"] in line for line in proc.stdout.splitlines())


def test_json_to_stdout_is_pure_json(rollouts_file):
    res = runner.invoke(app, ["delta-h1", "--rollouts", rollouts_file, "--json", "-", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["result"]["B"] == 6


def test_literal_schedule_has_no_pairwise_se(rollouts_file, tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["delta-h1", "--rollouts", rollouts_file, "--set", "probe.schedule=literal",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["result"]
    assert r["se_unbiased"] is None and r["U_cross_var_unbiased"] is None and r["se"] > 0
    payload = json.loads(out.read_text())
    assert validate(payload, SCHEMA, SCHEMA) == []
    assert r["deltaH"] is None and all(u["deltaH"] is None for u in payload["units"])
    # literal's row means come from its diagonal loop's own forwards, U_cross from the X and Y passes: under bf16
    # they round apart (fp32: 1e-6, tests/probe/test_attribution.py); the shares are the row means'
    shares = sum(u["deltaH1"] for u in payload["units"])
    assert shares == pytest.approx(-r["learning_rate"] * sum(r["row_means"]) / r["B"], rel=1e-9)
    assert shares == pytest.approx(r["deltaH1"], rel=0.05)
    assert "largest per-prompt contributions to deltaH1 (of 6 units)" in res.stdout
    assert f"± {fmt(r['se'], 2)} (row-mean" in res.stdout and "no pairwise SE" in res.stdout


def test_save_rollouts_reproduces_the_batch(tmp_path):
    saved = tmp_path / "b.jsonl"
    a = runner.invoke(app, ["delta-h1", "--save-rollouts", str(saved), "--json", "-"])
    b = runner.invoke(app, ["delta-h1", "--rollouts", str(saved), "--json", "-"])
    assert a.exit_code == b.exit_code == 0
    ra, rb = json.loads(a.stdout)["result"], json.loads(b.stdout)["result"]
    assert rb["U_cross"] == pytest.approx(ra["U_cross"], rel=1e-6)


def one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_missing_model_path():
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "model.name_or_path=/no/such/model"]),
                   "no such directory", "/no/such/model")


def test_unknown_config_key():
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "probe.microbach_size=2"]),
                   "unknown config key 'probe.microbach_size'", "probe.microbatch_size")


def test_malformed_rollouts_line_is_named(tmp_path):
    good = json.dumps({"prompt": [1, 5], "responses": [[6, 2], [7]], "rewards": [1.0, 0.0]})
    path = write(tmp_path / "r.jsonl", [good, '{"prompt": [1, 5], "responses": [[6]', good])
    one_line_error(runner.invoke(app, ["delta-h1", "--rollouts", path]), f"{path}:2", "not valid JSON")
    path = write(tmp_path / "s.jsonl", [good, json.dumps({"prompt": [1], "responses": [[3], [4]], "rewards": [1]})])
    one_line_error(runner.invoke(app, ["delta-h1", "--rollouts", path]), f"{path}:2", "rewards")


def test_fewer_than_two_units_in_exact_mode(tmp_path):
    good = json.dumps({"prompt": [1, 5], "responses": [[6, 2], [7]], "rewards": [1.0, 0.0]})
    one_line_error(runner.invoke(app, ["delta-h1", "--rollouts", write(tmp_path / "r.jsonl", [good])]),
                   "at least 2 units")
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "batch.num_prompts=1"]), "at least 2 units")


def test_group_size_below_two(tmp_path):
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "batch.group_size=1"]), "G) must be >= 2")
    line = json.dumps({"prompt": [1, 5], "responses": [[6, 2]], "rewards": [1.0]})
    one_line_error(runner.invoke(app, ["delta-h1", "--rollouts", write(tmp_path / "r.jsonl", [line, line])]),
                   ":1:", "G >= 2")


def test_optimizer_state_that_does_not_match(tmp_path):
    stack = gp.load_stack(make_cfg())
    wrong = [torch.nn.Parameter(torch.zeros(p.shape[0] + (i == 3), *p.shape[1:])) for i, p in enumerate(stack.params)]
    opt = torch.optim.AdamW(wrong, lr=1e-4)
    for p in wrong:
        p.grad = torch.ones_like(p)
    opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "probe.precondition=adam",
                                       "--set", f"probe.optimizer_state={path}"]),
                   "index 3", stack.names[3])
    short = torch.optim.AdamW(wrong[:5], lr=1e-4)
    torch.save(short.state_dict(), path)
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "probe.precondition=adam",
                                       "--set", f"probe.optimizer_state={path}"]), "covers 5 parameters")
    one_line_error(runner.invoke(app, ["delta-h1", "--set", "probe.precondition=adam"]), "needs probe.optimizer_state")


@pytest.mark.parametrize("argv, says", [
    (["validate", "--no-such-option"], "No such option: --no-such-option (see `gradprobe validate --help`)"),
    (["diagnose", "--fail-on", "bogus"], "Invalid value for '--fail-on'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
@pytest.mark.slow
def test_usage_errors_from_the_console_script_are_one_line(argv, says):
    """What a shell script sees: the installed entry point, not the in-process runner."""
    res = subprocess.run([sys.executable, "-m", "gradprobe", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and says in res.stderr, res.stderr
    assert res.stdout == ""


@pytest.mark.slow
def test_run_delta_h1_is_the_stepwise_api_in_one_call():
    """The CLI's library entry chains the documented steps; its tracker ends at the probe with every unit."""
    from gradprobe import api, build_batch, delta_h1, load_config, load_stack, run_delta_h1
    from gradprobe.runs import Tracker

    cfg = load_config(overrides=["batch.num_prompts=4", "batch.max_new_tokens=6"])
    tracker = Tracker()
    one = run_delta_h1(cfg, tracker=tracker)
    assert tracker.stage == "probe" and tracker.units == 4 and tracker.units_done == 4
    assert {"stack", "warm-up", "batch", "probe"} <= set(one.timings)

    stack = load_stack(cfg)
    opt = api.warm_up(stack, cfg, api.warmup_steps(cfg))
    precond = api.live_preconditioner(stack, opt, cfg, "the warm-up")
    steps = delta_h1(stack, build_batch(stack, cfg), cfg, precond=precond, optimizer=opt)
    assert (one.deltaH, one.se_deltaH, one.deltaH1, one.se) == (steps.deltaH, steps.se_deltaH, steps.deltaH1,
                                                                steps.se)

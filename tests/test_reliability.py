"""Faults survived and numbers that mean what they say: interruption and resume, atomic writes, out of
memory, determinism, B = 2 and 3, the first run's exit status and unbroken piped output."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradprobe.cli import app
from gradprobe.cli.common import PROGRESS_LINE
from gradprobe.errors import GradprobeError
from gradprobe.files import write_atomic
from gradprobe.resume import UnitStore

runner = CliRunner()
HOST = {"timings", "seconds", "peak_memory_bytes", "peak_memory_kind", "notes"}  # host facts (notes quote free memory)
WORK = {"forwards", "backwards", "tokens"}  # the work this process did (a resumed run does less)


def strip(value, drop=HOST):
    if isinstance(value, dict):
        return {k: strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [strip(v, drop) for v in value]
    return value


def run_json(args: list[str], path: Path, code: int = 0) -> dict:
    res = runner.invoke(app, [*args, "--json", str(path), "--quiet"])
    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_same_seed_same_json(tmp_path):
    args = ["delta-h1", "--set", "batch.num_prompts=4", "--set", "batch.max_new_tokens=8", "--seed", "7"]
    a = run_json(args, tmp_path / "a.json")
    b = run_json(args, tmp_path / "b.json")
    assert a["complete"] is True
    assert strip(a) == strip(b)
    assert a["result"]["timings"] and a["result"]["deltaH1"] != 0  # the comparison covered a real result
    c = run_json([*args[:-1], "8"], tmp_path / "c.json")
    assert strip(c)["result"]["deltaH1"] != strip(a)["result"]["deltaH1"]  # the seed is not ignored


@pytest.mark.slow
def test_sigterm_after_k_units_then_resume_equals_the_uninterrupted_run(tmp_path, rollouts_file, monkeypatch):
    """In-process: the k-th unit's save sends SIGTERM to this process; the CLI writes a partial result and
    exits 4; --resume then recomputes only the rest and ends with the uninterrupted run's numbers."""
    args = ["delta-h1", "--rollouts", rollouts_file]
    full = run_json(args, tmp_path / "full.json")
    k, saves = 2, []
    original = UnitStore.save

    def save_then_signal(self, u, *rest):
        original(self, u, *rest)
        saves.append(u)
        if len(saves) == k:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(UnitStore, "save", save_then_signal)
    state = tmp_path / "state"
    res = runner.invoke(app, [*args, "--state", str(state), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert res.exit_code == 4, (res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and f"{k}/6 units done" in lines[0], lines
    partial = json.loads((tmp_path / "r.json").read_text())
    assert partial["complete"] is False and partial["interrupted_by"] == "SIGTERM"
    assert partial["progress"] == {"stage": "probe", "units_done": k, "units": 6}
    assert partial["resume"]["state_dir"] == str(state)
    assert sorted(p.name for p in state.glob("unit-*.pt")) == ["unit-00000.pt", "unit-00001.pt"]
    assert json.loads((state / "partial.json").read_text())["progress"]["units_done"] == k

    monkeypatch.setattr(UnitStore, "save", original)
    resumed = run_json(["delta-h1", "--resume", str(tmp_path / "r.json")], tmp_path / "r.json")
    assert resumed["complete"] is True
    assert strip(resumed["result"], HOST | WORK) == strip(full["result"], HOST | WORK)
    assert resumed["result"]["forwards"] < full["result"]["forwards"]  # the saved units were not recomputed
    assert math.isfinite(resumed["result"]["se_unbiased"])


@pytest.mark.slow
def test_sigterm_to_a_real_process_writes_a_partial_result_and_exit_4(tmp_path):
    """A separate process, as a batch scheduler would preempt it; then resumed from its state directory."""
    state, out = tmp_path / "state", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "gradprobe", "delta-h1", "--set", "batch.num_prompts=12", "--state", str(state),
           "--json", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(state.glob("unit-*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["progress"]["units"] == 12
    assert 1 <= partial["progress"]["units_done"] < 12
    resumed = subprocess.run([sys.executable, "-m", "gradprobe", "delta-h1", "--resume", str(state), "--json",
                              str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    full = subprocess.run([sys.executable, "-m", "gradprobe", "delta-h1", "--set", "batch.num_prompts=12", "--json",
                           "-", "--quiet"], capture_output=True, text=True, timeout=600)
    assert strip(json.loads(out.read_text())["result"], HOST | WORK) == \
        strip(json.loads(full.stdout)["result"], HOST | WORK)


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("previous\n")

    def half_then_fail(f):
        f.write(b"{\"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(GradprobeError, match="No space left on device"):
        write_atomic(target, half_then_fail, "JSON")
    assert target.read_text() == "previous\n" and os.listdir(tmp_path) == ["r.json"]
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["r.json"]


def test_a_run_that_fails_after_the_model_load_leaves_the_previous_result(tmp_path):
    prev = tmp_path / "r.json"
    prev.write_text('{"previous": true}\n')
    empty = tmp_path / "e.jsonl"
    empty.write_text("".join(json.dumps({"prompt": [1, 5], "responses": [[], []], "rewards": [1, 0]}) + "\n"
                             for _ in range(3)))
    res = runner.invoke(app, ["delta-h1", "--rollouts", str(empty), "--json", str(prev)])
    assert res.exit_code == 2 and "every response" in res.stderr
    assert prev.read_text() == '{"previous": true}\n'


def test_out_of_memory_names_the_next_microbatch_size(tmp_path):
    """A CUDA out-of-memory error (raised by the user's reward code, the real torch class): exit 5, one line."""
    plugin = tmp_path / "oom_reward.py"
    plugin.write_text("import torch\n\ndef score(prompt, response):\n"
                      "    raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n")
    res = runner.invoke(app, ["delta-h1", "--set", f"batch.reward={plugin}:score", "--set",
                              "probe.microbatch_size=6", "--set", "batch.num_prompts=2"])
    assert res.exit_code == 5, (res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
    assert len(lines) == 1 and "out of memory" in lines[0] and "probe.microbatch_size=3" in lines[0], lines
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("b", [2, 3])
def test_no_headline_se_below_four_units(tmp_path, rollouts_file, b):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(Path(rollouts_file).read_text().splitlines(keepends=True)[:b]))
    res = runner.invoke(app, ["delta-h1", "--rollouts", str(path), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.stderr
    r = json.loads((tmp_path / "r.json").read_text())["result"]
    assert r["B"] == b and r["se_unbiased"] is None and math.isfinite(r["deltaH1"])
    row = next(ln for ln in res.stdout.splitlines() if "deltaH1 (plain" in ln)
    assert "±" not in row.split("(")[1]  # no SE next to the number itself
    if b == 2:  # both row means are the one pair's mean: their spread is rounding, not an SE
        assert r["se"] is None and r["se_jackknife"] is None
        assert "no standard error: B = 2 units" in row
    else:  # the row-mean SEs are shown as what they are, not beside "no standard error"
        assert r["se"] > 0 and "no headline SE at B = 3" in row and "for reference only" in row
        assert "no standard error" not in row


@pytest.mark.slow
def test_first_command_exits_zero_and_piped_fix_stays_whole():
    """The README's first command, piped as in a script: exit 0 once the diagnosis is complete, and the fix's
    code is on one line, not cut at 80 columns; without --exit-zero a failed check is still exit 1."""
    proc = subprocess.run([sys.executable, "-m", "gradprobe", "diagnose", "--exit-zero"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": ""})
    assert proc.returncode == 0, proc.stderr
    fix = "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
    assert any(fix in line for line in proc.stdout.splitlines()), proc.stdout
    assert "reentrant_checkpointing_hides_params" in proc.stdout and "--exit-zero: exit code 0 instead of 1" in \
        proc.stdout


def test_diagnose_keeps_exit_1_for_scripts(tmp_path):
    res = runner.invoke(app, ["diagnose", "--quiet", "--json", str(tmp_path / "d.json")])
    assert res.exit_code == 1
    assert json.loads((tmp_path / "d.json").read_text())["exit_code"] == 1

"""`gradprobe diagnose` as a user and a script meet it: exit codes, the table and verdict, JSON against its schema."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from gradprobe import schemas
from gradprobe.cli import app
from gradprobe.diagnose.battery import ALL
from gradprobe.diagnose.causes import ids
from tests.support.schema import validate

runner = CliRunner()
SMALL = ["--set", "batch.num_prompts=4", "--set", "batch.max_new_tokens=8"]


SCHEMA = schemas.load("diagnose")


def test_validator_rejects_what_the_schema_forbids():
    good = {"name": "coverage", "title": "t", "status": "pass", "evidence": {"a": 1, "b": ["x"]}, "fix": ""}
    check = {"$ref": "#/$defs/check"}
    assert validate(good, check, SCHEMA) == []
    assert validate({**good, "status": "ok"}, check, SCHEMA)
    assert validate({**good, "evidence": {"a": {"nested": 1}}}, check, SCHEMA)
    assert validate({k: v for k, v in good.items() if k != "fix"}, check, SCHEMA)
    assert validate({**good, "extra": 1}, check, SCHEMA)


def test_schema_lists_every_check_and_root_cause():
    defs = SCHEMA["$defs"]
    names = [fn.__name__ for fn in ALL]
    assert defs["check"]["properties"]["name"]["enum"] == names
    assert defs["verdict"]["properties"]["root_cause"]["enum"] == ids()
    assert defs["cause"]["properties"]["id"]["enum"] == [i for i in ids() if i != "healthy"]


def test_docs_list_every_root_cause_in_rank_order():
    """docs/diagnose.md's table of root causes is the registry's list, in its order."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "diagnose.md").read_text()
    table = text[text.index("## Root causes"):text.index("## Every root cause")]
    assert re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M) == ids()
    repro = text[text.index("## Every root cause"):text.index("## From Python")]
    assert re.findall(r"^\| `([a-z_]+)` \|", repro, flags=re.M) == [i for i in ids() if i != "healthy"]


# ---------------------------------------------------------------- the command

def test_default_run_names_reentrant_checkpointing_and_exits_1(tmp_path):
    out = tmp_path / "d.json"
    res = runner.invoke(app, ["diagnose", *SMALL, "--json", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "verdict: reentrant_checkpointing_hides_params" in text
    assert "is healthy" in text and "exit code 1 (failed: strict autograd.grad)" in text
    payload = json.loads(out.read_text())
    assert validate(payload, SCHEMA, SCHEMA) == []
    assert payload["schema"] == "gradprobe.diagnose/1" and payload["command"] == "diagnose"
    assert payload["exit_code"] == 1
    assert payload["verdict"]["root_cause"] == "reentrant_checkpointing_hides_params"
    assert payload["verdict"]["probe_path_healthy"] is True
    assert [c["name"] for c in payload["checks"] if c["status"] == "fail"] == ["strict_autograd_grad"]
    assert payload["config"]["checkpointing"] == "reentrant"


def test_healthy_config_exits_0_and_json_to_stdout_is_pure():
    res = runner.invoke(app, ["diagnose", *SMALL, "--set", "checkpointing=non_reentrant", "--json", "-"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)  # the table is suppressed when JSON goes to stdout
    assert validate(payload, SCHEMA, SCHEMA) == []
    assert payload["verdict"]["root_cause"] == "healthy" and payload["exit_code"] == 0


def test_fail_on_warn(tmp_path):
    """One empty response in a group is a WARN: exit 0 by default, 1 with --fail-on warn."""
    rows = [{"prompt": p, "responses": ["hi there", "", "hey", "ho ho"], "rewards": [1.0, 0.0, 0.5, 0.25]}
            for p in ("say hi:", "name a color:", "spell cat:")]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "d.json"
    res = runner.invoke(app, ["diagnose", "--rollouts", str(path), "--set", "checkpointing=non_reentrant",
                              "--fail-on", "warn", "--json", str(out), "--quiet"])
    assert res.exit_code == 1, res.output
    payload = json.loads(out.read_text())
    statuses = {c["name"]: c["status"] for c in payload["checks"]}
    assert statuses["generation"] == "warn" and "fail" not in statuses.values()  # so plain exit would be 0
    assert payload["verdict"]["root_cause"] == "healthy"


@pytest.mark.parametrize("args, message", [
    (["--set", "checkpointing=sometimes"], "checkpointing"),
    (["--set", "probe.precondition=adam"], "probe.optimizer_state"),
    (["--rollouts", "/nonexistent/r.jsonl"], "rollouts file not found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    res = runner.invoke(app, ["diagnose", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bad_fail_on_is_a_usage_error():
    res = runner.invoke(app, ["diagnose", "--fail-on", "sometimes"])
    assert res.exit_code == 2

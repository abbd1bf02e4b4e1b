"""The bad-input matrix: every case exits 2 with one line on stderr, no traceback, and leaves every input and
every earlier output file as it was (contents and modification times)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.cli import app
from gradprobe.cli.common import PROGRESS_LINE
from gradprobe.diagnose.check import FAIL
from tests.conftest import make_cfg

runner = CliRunner()
GOOD = {"prompt": [1, 5], "responses": [[6, 2], [7]], "rewards": [1.0, 0.0]}


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> dict:
    """Optimizer state files for the embedded default's 28 LoRA tensors: a real AdamW after one step on
    copies of the parameters, then damaged one way each; and the name of the tensor damaged."""
    stack = gp.load_stack(make_cfg())
    copies = [torch.nn.Parameter(p.detach().float().clone()) for p in stack.params]
    opt = torch.optim.AdamW(copies, lr=1e-4)
    for p in copies:
        p.grad = torch.randn_like(p)
    opt.step()
    base = opt.state_dict()
    d = tmp_path_factory.mktemp("states")

    def damaged(name: str, edit: Callable[[dict], None]) -> str:
        sd = {"state": {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                        for k, v in base["state"].items()}, "param_groups": copy.deepcopy(base["param_groups"])}
        edit(sd)
        torch.save(sd, d / name)
        return str(d / name)

    def set_v(i: int, value: float, where: int = 0) -> Callable[[dict], None]:
        def edit(sd: dict) -> None:
            sd["state"][i]["exp_avg_sq"].view(-1)[where] = value
        return edit

    ok = damaged("ok.pt", lambda sd: None)
    data = open(ok, "rb").read()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "text.pt").write_text("not a torch file\n")
    (d / "plain.pkl").write_bytes(pickle.dumps({"state": {}, "param_groups": []}, protocol=4))
    return {"names": stack.names, "nan": damaged("nan.pt", set_v(3, float("nan"))),
            "neg": damaged("neg.pt", set_v(5, -1e-3, 7)), "inf": damaged("inf.pt", set_v(0, float("inf"))),
            "lr_nan": damaged("lr.pt", lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan"))),
            "lr_zero": damaged("lr0.pt", lambda sd: sd["param_groups"][0].__setitem__("lr", 0.0)),
            "step_nan": damaged("step.pt", lambda sd: sd["state"][2].__setitem__("step", torch.tensor(float("nan")))),
            "truncated": str(d / "truncated.pt"), "text": str(d / "text.pt"), "plain": str(d / "plain.pkl")}


def rollouts(path: Path, *objs) -> str:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return str(path)


def adam(path: str) -> list[str]:
    return ["--set", "probe.precondition=adam", "--set", f"probe.optimizer_state={path}"]


# Each case: (id, argv builder (tmp dir, states) -> argv, words the one stderr line must hold).
# In the tmp dir: in.jsonl (a good rollouts file), prev.json (an earlier result), cfg.yaml (a config).
CASES: list[tuple[str, Callable[[Path, dict], list[str]], tuple[str, ...]]] = [
    # configuration
    ("group_size_0", lambda d, s: ["delta-h1", "--set", "batch.group_size=0"], (">= 2", "got 0")),
    ("group_size_1", lambda d, s: ["delta-h1", "--set", "batch.group_size=1"], (">= 2",)),
    ("lr_nan", lambda d, s: ["delta-h1", "--set", "probe.learning_rate=nan"], ("finite", "learning_rate")),
    ("lr_inf", lambda d, s: ["delta-h1", "--set", "probe.learning_rate=inf"], ("finite",)),
    ("lr_negative", lambda d, s: ["delta-h1", "--set", "probe.learning_rate=-1e-5"], ("> 0",)),
    ("temperature_inf", lambda d, s: ["delta-h1", "--set", "batch.temperature=.inf"], ("finite",)),
    ("temperature_0", lambda d, s: ["delta-h1", "--set", "batch.temperature=0"], ("> 0",)),
    ("top_p_1.5", lambda d, s: ["delta-h1", "--set", "batch.top_p=1.5"], ("top_p",)),
    ("dropout_1", lambda d, s: ["delta-h1", "--set", "lora.dropout=1"], ("dropout",)),
    ("microbatch_0", lambda d, s: ["delta-h1", "--set", "probe.microbatch_size=0"], (">= 1",)),
    ("schedule_bogus", lambda d, s: ["delta-h1", "--set", "probe.schedule=bogus"], ("must be one of",)),
    ("unknown_key", lambda d, s: ["delta-h1", "--set", "probe.microbach_size=2"], ("did you mean",)),
    ("override_no_equals", lambda d, s: ["delta-h1", "--set", "probe.schedule"], ("key=value",)),
    ("seed_text", lambda d, s: ["delta-h1", "--set", "seed=abc"], ("wants int",)),
    ("one_prompt", lambda d, s: ["delta-h1", "--set", "batch.num_prompts=1"], ("at least 2 units",)),
    ("reward_spec", lambda d, s: ["delta-h1", "--set", "batch.reward=nocolon"], ("module:function",)),
    ("config_missing", lambda d, s: ["delta-h1", "--config", str(d / "nope.yaml")], ("config file not found",)),
    ("config_bad_yaml", lambda d, s: ["delta-h1", "--config", rollouts(d / "bad.yaml", "a: [1,")],
     ("not valid YAML",)),
    ("config_list", lambda d, s: ["delta-h1", "--config", rollouts(d / "list.yaml", "- 1")], ("mapping",)),
    ("max_new_tokens_past_context", lambda d, s: ["delta-h1", "--set", "batch.max_new_tokens=600"],
     ("context (512 positions)", "max_new_tokens")),
    # output paths: refused before the work, inputs and earlier outputs untouched
    ("json_is_rollouts", lambda d, s: ["delta-h1", "--rollouts", str(d / "in.jsonl"), "--json", str(d / "in.jsonl")],
     ("--json", "is the input")),
    ("json_symlink_to_rollouts", lambda d, s: ["delta-h1", "--rollouts", str(d / "in.jsonl"),
                                                "--json", str(d / "link.json")], ("is the input",)),
    ("json_is_config", lambda d, s: ["delta-h1", "--config", str(d / "cfg.yaml"), "--json", str(d / "cfg.yaml")],
     ("is the input",)),
    ("json_is_optimizer_state", lambda d, s: [*["delta-h1", "--json", s["nan"]], *adam(s["nan"])],
     ("is the input",)),
    ("json_missing_dir", lambda d, s: ["delta-h1", "--json", str(d / "no" / "r.json")], ("does not exist",)),
    ("json_parent_is_file", lambda d, s: ["delta-h1", "--json", str(d / "prev.json" / "r.json")],
     ("does not exist",)),
    ("json_is_dir", lambda d, s: ["delta-h1", "--json", str(d)], ("is a directory",)),
    ("save_rollouts_missing_dir", lambda d, s: ["delta-h1", "--save-rollouts", str(d / "no" / "b.jsonl")],
     ("--save-rollouts", "does not exist")),
    ("save_rollouts_is_input", lambda d, s: ["delta-h1", "--rollouts", str(d / "in.jsonl"),
                                              "--save-rollouts", str(d / "in.jsonl")], ("is the input",)),
    ("json_is_save_rollouts", lambda d, s: ["delta-h1", "--json", str(d / "x.out"), "--save-rollouts",
                                             str(d / "x.out")], ("is also the",)),
    ("diagnose_json_is_rollouts", lambda d, s: ["diagnose", "--rollouts", str(d / "in.jsonl"), "--json",
                                                 str(d / "in.jsonl")], ("is the input",)),
    ("validate_plot_missing_dir", lambda d, s: ["validate", "--plot", str(d / "no" / "p.png")],
     ("--plot", "does not exist")),
    ("validate_plot_is_json", lambda d, s: ["validate", "--plot", str(d / "p.out"), "--json", str(d / "p.out")],
     ("is also the",)),
    ("env_json_missing_dir", lambda d, s: ["env", "--json", str(d / "no" / "env.json")], ("does not exist",)),
    ("plot_png_missing_dir", lambda d, s: ["plot", str(d / "prev.json"), "--png", str(d / "no" / "p.png")],
     ("--png", "does not exist")),
    ("plot_png_is_input", lambda d, s: ["plot", str(d / "prev.json"), "--png", str(d / "prev.json")],
     ("--png", "is the input")),
    ("state_is_file", lambda d, s: ["delta-h1", "--state", str(d / "prev.json")], ("--state", "is a file")),
    ("state_not_empty", lambda d, s: ["delta-h1", "--state", str(d / "full")], ("not empty", "--resume")),
    ("state_with_literal", lambda d, s: ["delta-h1", "--state", str(d / "st"), "--set", "probe.schedule=literal"],
     ("literal",)),
    ("resume_missing", lambda d, s: ["delta-h1", "--resume", str(d / "nothing")], ("not a state directory",)),
    ("resume_complete_result", lambda d, s: ["delta-h1", "--resume", str(d / "prev.json")],
     ("not a partial result",)),
    ("resume_partial_without_state", lambda d, s: ["delta-h1", "--resume", str(d / "partial.json")],
     ("kept no unit state",)),
    ("resume_with_set", lambda d, s: ["delta-h1", "--resume", str(d / "full"), "--set", "seed=3"], ("drop --set",)),
    # rollouts files: the error names the file and the line
    ("rollouts_missing", lambda d, s: ["delta-h1", "--rollouts", str(d / "none.jsonl")], ("not found",)),
    ("rollouts_empty", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "e.jsonl", "")], ("no rollouts",)),
    ("rollouts_not_json", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "r.jsonl", GOOD, "{oops")],
     ("r.jsonl:2", "not valid JSON")),
    ("rollouts_missing_key", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "r.jsonl", GOOD, {"prompt": [1]})],
     (":2", "missing key")),
    ("rollouts_one_response", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {"prompt": [1], "responses": [[3]], "rewards": [1.0]})], (":2", "G >= 2")),
    ("rollouts_reward_nan", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, '{"prompt": [1], "responses": [[3], [4]], "rewards": [NaN, 1]}')],
     (":2", "non-finite")),
    ("rollouts_token_outside_vocab", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {"prompt": [1], "responses": [[3], [99999]], "rewards": [0, 1]})], (":2", "vocabulary")),
    ("rollouts_negative_token", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", {"prompt": [1], "responses": [[-3], [4]], "rewards": [0, 1]}, GOOD)], (":1", "non-negative")),
    ("rollouts_lengths_zero", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {**GOOD, "lengths": [0, 1]})], (":2", "positive integers")),
    ("rollouts_past_context", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {"prompt": [1, 5], "responses": [[6] * 20000, [7]], "rewards": [1, 0]})],
     ("r.jsonl:2", "20000 tokens", "context (512 positions)")),
    ("rollouts_all_empty", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", *[{"prompt": [1, 5], "responses": [[], []], "rewards": [1, 0]}] * 4)],
     ("every response", "empty")),
    # optimizer state: the damaged tensor named, no torch advice to run the file's code
    ("moment_nan", lambda d, s: ["delta-h1", *adam(s["nan"])], ("non-finite", "index 3")),
    ("moment_negative", lambda d, s: ["delta-h1", *adam(s["neg"])], ("negative", "index 5")),
    ("moment_inf", lambda d, s: ["delta-h1", *adam(s["inf"])], ("non-finite", "index 0")),
    ("optimizer_lr_nan", lambda d, s: ["delta-h1", *adam(s["lr_nan"])], ("learning rate nan, not a finite number",)),
    ("optimizer_lr_zero", lambda d, s: ["delta-h1", *adam(s["lr_zero"])], ("is 0 (a schedule at its end",)),
    ("adam_step_nan", lambda d, s: ["delta-h1", *adam(s["step_nan"])], ("step nan",)),
    ("optimizer_state_truncated", lambda d, s: ["delta-h1", *adam(s["truncated"])], ("truncated",)),
    ("optimizer_state_text", lambda d, s: ["delta-h1", *adam(s["text"])], ("not a torch.save file",)),
    ("optimizer_state_plain_pickle", lambda d, s: ["delta-h1", *adam(s["plain"])], ("a plain pickle",)),
    ("diagnose_optimizer_state_missing", lambda d, s: ["diagnose", "--optimizer-state", str(d / "no.pt")],
     ("not found",)),
]

NAMED = {"moment_nan": 3, "moment_negative": 5, "moment_inf": 0}


def snapshot(root: Path, extra: list[str]) -> dict[str, tuple[str, int]]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] + [Path(e) for e in extra]
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture
def world(tmp_path, rollouts_file) -> Path:
    shutil.copy(rollouts_file, tmp_path / "in.jsonl")
    (tmp_path / "prev.json").write_text('{"schema": "gradprobe.delta-h1/1", "complete": true, "result": {}}\n')
    (tmp_path / "partial.json").write_text('{"complete": false, "resume": null}\n')
    (tmp_path / "cfg.yaml").write_text("batch:\n  num_prompts: 4\n")
    (tmp_path / "link.json").symlink_to(tmp_path / "in.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "meta.json").write_text(json.dumps({"config": make_cfg().to_dict()}))
    return tmp_path


def test_the_matrix_is_large():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, states):
    name, argv, words = case
    args = argv(world, states)
    inputs = [v for k, v in states.items() if k != "names"]
    before = snapshot(world, inputs)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "weights_only=False" not in lines[0]
    if name in NAMED:
        assert states["names"][NAMED[name]] in lines[0], lines[0]
    after = snapshot(world, inputs)
    assert {k: v for k, v in after.items() if k in before} == before, "an input or earlier output changed"
    assert set(after) == set(before), "a file was written"


def test_debug_keeps_the_exit_code_and_adds_the_traceback():
    res = runner.invoke(app, ["delta-h1", "--set", "batch.group_size=0", "--debug"])
    assert res.exit_code == 2
    assert "Traceback" in res.stderr and "error: batch.group_size (G) must be >= 2" in res.stderr


def test_a_moment_nan_fails_diagnose_coverage_check(states):
    cfg = make_cfg()
    stack = gp.load_stack(cfg)
    batch = gp.build_batch(stack, cfg)
    state = torch.load(states["nan"], weights_only=True)
    report = gp.diagnose(stack=stack, batch=batch, cfg=cfg, optimizer_state=state, run_differential=False)
    check = report.check("optimizer_state")
    assert check.status == FAIL and "non-finite" in check.evidence["error"], check
    assert stack.names[3] in check.evidence["error"] and "index 3" in check.evidence["error"]


def test_state_dir_refusal_leaves_no_directory(tmp_path):
    """--state in a directory that does not exist is created only once the inputs are valid."""
    res = runner.invoke(app, ["delta-h1", "--state", str(tmp_path / "s"), "--set", "batch.group_size=0"])
    assert res.exit_code == 2 and not (tmp_path / "s").exists()
    assert os.listdir(tmp_path) == []

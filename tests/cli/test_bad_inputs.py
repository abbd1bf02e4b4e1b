"""The bad-input matrix: every case exits 2 with one line on stderr, no traceback, and leaves every input and
every earlier output file as it was (contents and modification times)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gradprobe as gp
import gradprobe.stack as gp_stack
from gradprobe.cli import app
from gradprobe.cli.common import PROGRESS_LINE
from gradprobe.diagnose.check import FAIL
from tests.conftest import make_cfg
from tests.support.export import save_preset

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
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(bytes(range(7, 200)))
    (d / "a_dir.pt").mkdir()
    models = d / "models"
    good = save_preset("tiny", models / "good", seed=0)
    for name, edit in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: bytes(997) + b[:64])):
        shutil.copytree(good, models / name)
        weights = models / name / "model.safetensors"
        weights.write_bytes(edit(weights.read_bytes()))
    (models / "no_config").mkdir()
    (models / "no_config" / "model.safetensors").write_bytes(b"")
    (models / "weights.bin").write_bytes(b"not a directory")
    (models / "adapter_without_config").mkdir()
    stack.model.save_pretrained(models / "adapter_truncated")
    weights = models / "adapter_truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return {"names": stack.names, "models": str(models), "empty": str(d / "empty.pt"), "random": str(d / "random.pt"),
            "a_dir": str(d / "a_dir.pt"), "nan": damaged("nan.pt", set_v(3, float("nan"))),
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


def model(path: str) -> list[str]:
    return ["delta-h1", "--set", f"model.name_or_path={path}"]


def plugin(path: Path, body: str) -> str:
    """A reward plugin file `path` with the function `score(prompt, response)` returning `body`'s value."""
    path.write_text(f"def score(prompt, response):\n    return {body}\n")
    return f"batch.reward={path}:score"


def text(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def sparse(path: Path, size: int) -> str:
    """A file of `size` bytes that takes no disk space (a hole)."""
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


UNWRITABLE = "/proc/gradprobe-test"  # an existing directory nobody, root included, can create a file in


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
    # issue 28, 2: a model path that does not exist is one line at once, never a hub id
    ("model_dot_path_missing", lambda d, s: model("./no_such_model_dir"), ("./no_such_model_dir", "no such directory")),
    ("model_abs_path_missing", lambda d, s: model(str(d / "nowhere")), ("no such directory", "the hub is not asked")),
    ("model_home_path_missing", lambda d, s: model("~/no_such_gradprobe_model"), ("no such directory",)),
    ("model_nested_path_missing", lambda d, s: model("runs/a/model"), ("runs/a/model", "no such directory")),
    ("model_path_is_file", lambda d, s: model(s["models"] + "/weights.bin"), ("is a file",)),
    ("model_dir_without_config", lambda d, s: model(s["models"] + "/no_config"), ("no config.json",)),
    ("model_weights_truncated", lambda d, s: model(s["models"] + "/truncated"),
     ("cannot read model weights", "truncated/model.safetensors")),
    ("model_weights_garbage", lambda d, s: model(s["models"] + "/garbage"),
     ("cannot read model weights", "garbage/model.safetensors")),
    ("model_hub_id_offline", lambda d, s: model("no-such-org/no-such-model"),
     ("no-such-org/no-such-model", "not in the Hugging Face cache", "HF_HUB_OFFLINE")),
    ("adapter_path_missing", lambda d, s: ["delta-h1", "--set", f"lora.adapter_path={d / 'no_adapter'}"],
     ("lora.adapter_path", "no such directory")),
    ("adapter_without_config", lambda d, s: ["delta-h1", "--set",
                                             f"lora.adapter_path={s['models']}/adapter_without_config"],
     ("no adapter_config.json",)),
    ("adapter_weights_truncated", lambda d, s: ["delta-h1", "--set",
                                                f"lora.adapter_path={s['models']}/adapter_truncated"],
     ("cannot read adapter weights", "adapter_model.safetensors")),
    # issue 28, 3: outputs in an existing directory that cannot be written, before any work
    ("json_unwritable_dir", lambda d, s: ["delta-h1", "--json", f"{UNWRITABLE}.json"],
     ("--json", "cannot write in the directory /proc")),
    ("save_rollouts_unwritable_dir", lambda d, s: ["delta-h1", "--save-rollouts", f"{UNWRITABLE}.jsonl"],
     ("--save-rollouts", "cannot write in the directory")),
    ("validate_plot_unwritable_dir", lambda d, s: ["validate", "--plot", f"{UNWRITABLE}.png"],
     ("--plot", "cannot write in the directory")),
    ("validate_json_unwritable_dir", lambda d, s: ["validate", "--json", f"{UNWRITABLE}.json"],
     ("--json", "cannot write")),
    ("diagnose_json_unwritable_dir", lambda d, s: ["diagnose", "--json", f"{UNWRITABLE}.json"],
     ("--json", "cannot write")),
    ("env_json_unwritable_dir", lambda d, s: ["env", "--json", f"{UNWRITABLE}.json"], ("--json", "cannot write")),
    ("plot_png_unwritable_dir", lambda d, s: ["plot", str(d / "prev.json"), "--png", f"{UNWRITABLE}.png"],
     ("--png", "cannot write")),
    # issue 28, 3: inputs read before the model loads
    ("rollouts_bad_json_line_3", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "r.jsonl", GOOD, GOOD, "[1,")],
     ("r.jsonl:3", "not valid JSON")),
    ("rollouts_line_is_list", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "r.jsonl", "[1, 2]")],
     ("r.jsonl:1", "JSON object")),
    ("rollouts_rewards_short", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {**GOOD, "rewards": [1.0]})], (":2", "list of 2 numbers")),
    ("rollouts_rewards_text", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {**GOOD, "rewards": ["1.0", "0"]})], (":2", "list of 2 numbers")),
    ("rollouts_empty_prompt", lambda d, s: ["delta-h1", "--rollouts", rollouts(d / "r.jsonl", {**GOOD, "prompt": []})],
     (":1", "prompt is empty")),
    ("rollouts_response_not_a_list", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", {**GOOD, "responses": [[6], 7]})], (":1", "response 1")),
    ("diagnose_rollouts_not_json", lambda d, s: ["diagnose", "--rollouts", rollouts(d / "r.jsonl", "{oops")],
     ("r.jsonl:1", "not valid JSON")),
    ("validate_rollouts_missing", lambda d, s: ["validate", "--rollouts", str(d / "none.jsonl")], ("not found",)),
    ("entropy_rollouts_missing", lambda d, s: ["delta-h1", "--entropy-rollouts", str(d / "none.jsonl"),
                                               "--rollouts", str(d / "in.jsonl")], ("none.jsonl", "not found")),
    ("entropy_rollouts_malformed", lambda d, s: ["delta-h1", "--rollouts", str(d / "in.jsonl"), "--entropy-rollouts",
                                                 rollouts(d / "e.jsonl", {"prompt": [1]})],
     ("e.jsonl:1", "missing key")),
    ("reward_plugin_file_missing", lambda d, s: ["delta-h1", "--set", f"batch.reward={d / 'nope.py'}:score"],
     ("reward plugin file not found",)),
    ("reward_plugin_import_fails", lambda d, s: ["delta-h1", "--set",
                                                 plugin(d / "r.py", "0.0\nimport no_such_mod_xyz")],
     ("cannot import", "no_such_mod_xyz")),
    ("reward_plugin_syntax_error", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "(")],
     ("cannot import", "SyntaxError")),
    ("reward_plugin_no_function", lambda d, s: ["delta-h1", "--set",
                                                plugin(d / "r.py", "1.0").replace(":score", ":nope")],
     ("has no attribute 'nope'",)),
    ("reward_module_missing", lambda d, s: ["delta-h1", "--set", "batch.reward=no_such_reward_module_xyz:score"],
     ("cannot import", "no_such_reward_module_xyz")),
    ("optimizer_state_is_dir", lambda d, s: ["delta-h1", *adam(s["a_dir"])], ("is a directory",)),
    ("optimizer_state_empty", lambda d, s: ["delta-h1", *adam(s["empty"])], ("optimizer state", "empty")),
    ("optimizer_state_random_bytes", lambda d, s: ["delta-h1", *adam(s["random"])],
     ("not a torch.save file", "random.pt")),
    ("optimizer_state_missing", lambda d, s: ["delta-h1", *adam(str(d / "gone.pt"))], ("not found", "gone.pt")),
    # issue 28, 4: every file format error is exit 2 naming the file
    ("rollouts_binary", lambda d, s: ["delta-h1", "--rollouts", text(d / "r.jsonl", b"\x00\x01\xff\xfe\x80gz")],
     ("r.jsonl", "not UTF-8 text")),
    ("rollouts_gzip", lambda d, s: ["delta-h1", "--rollouts",
                                    text(d / "r.jsonl.gz", bytes.fromhex("1f8b0800") + b"\xff")],
     ("r.jsonl.gz", "not UTF-8 text")),
    ("rollouts_is_directory", lambda d, s: ["delta-h1", "--rollouts", str(d / "full")], ("is a directory",)),
    ("config_binary", lambda d, s: ["delta-h1", "--config", text(d / "c.yaml", b"\xff\xfe\x00")],
     ("c.yaml", "not UTF-8")),
    ("config_is_directory", lambda d, s: ["delta-h1", "--config", str(d / "full")], ("is a directory",)),
    # issue 28, 5: numbers without meaning are refused
    ("rollouts_reward_1e308", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {**GOOD, "rewards": [1e308, -1e308]})], ("reward 1e+308", "rescale")),
    ("rollouts_reward_1e20", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", {**GOOD, "rewards": [1e20, 0]}, GOOD)], ("prompt 0", "beyond +-1e+15")),
    ("rollouts_advantage_huge", lambda d, s: ["delta-h1", "--rollouts", rollouts(
        d / "r.jsonl", GOOD, {**GOOD, "advantages": [1e300, -1e300]})], ("advantage 1e+300",)),
    ("reward_plugin_returns_text", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "'1.0'")],
     ("returned '1.0' (str), not a number",)),
    ("reward_plugin_returns_bool", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "True")],
     ("returned True (bool)",)),
    ("reward_plugin_returns_none", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "None")],
     ("returned None",)),
    ("reward_plugin_returns_list", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "[1.0, 2.0]")],
     ("not a number",)),
    ("reward_plugin_returns_1e300", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "1e300")],
     ("returned 1e+300", "rescale")),
    ("reward_plugin_returns_nan", lambda d, s: ["delta-h1", "--set", plugin(d / "r.py", "float('nan')")],
     ("not finite",)),
    ("plot_file_past_the_size_limit", lambda d, s: ["plot", sparse(d / "run.jsonl", 65 * 2**20)],
     ("65 MiB", "past plot's limit of 64 MiB", "awk")),
    ("config_duplicate_key", lambda d, s: ["delta-h1", "--config", text(d / "c.yaml", "seed: 1\nseed: 2\n")],
     ("c.yaml: line 2", "key 'seed' is given twice", "first on line 1")),
    ("config_duplicate_nested_key", lambda d, s: ["delta-h1", "--config", text(
        d / "c.yaml", "batch:\n  num_prompts: 4\n  group_size: 3\n  num_prompts: 6\n")],
     ("line 4", "'num_prompts' is given twice")),
]

# Cases whose check needs the loaded model (token ids against its vocabulary, lengths against its context,
# the optimizer state's tensors against the adapter) or calls the user's reward on generated responses; every
# other case is refused before the model loader is called.
NEEDS_THE_MODEL = {"max_new_tokens_past_context", "rollouts_token_outside_vocab",
                   "rollouts_past_context", "moment_nan", "moment_negative", "moment_inf", "optimizer_lr_nan",
                   "optimizer_lr_zero", "adam_step_nan", "optimizer_state_truncated", "optimizer_state_plain_pickle",
                   "reward_plugin_returns_text", "reward_plugin_returns_bool",
                   "reward_plugin_returns_none", "reward_plugin_returns_list", "reward_plugin_returns_1e300",
                   "reward_plugin_returns_nan"}

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
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
    assert NEEDS_THE_MODEL <= {c[0] for c in CASES}


@pytest.fixture
def loader_calls(monkeypatch) -> list:
    """gradprobe's model loader, recorded: the checks before it must refuse without it ever being called."""
    calls: list = []
    original = gp_stack.load_stack

    def recorded(cfg):
        calls.append(cfg)
        return original(cfg)

    monkeypatch.setattr(gp_stack, "load_stack", recorded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same answer with or without a network
    gp_stack.hub_unreachable.cache_clear()
    yield calls
    gp_stack.hub_unreachable.cache_clear()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, states, loader_calls):
    name, argv, words = case
    args = argv(world, states)
    inputs = [v for k, v in states.items() if isinstance(v, str) and Path(v).is_file()]
    inputs += [str(p) for p in Path(states["models"]).rglob("*") if p.is_file()]
    before = snapshot(world, inputs)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    if name in NEEDS_THE_MODEL:  # the set is exact: each of these really needed the model
        assert loader_calls, f"{name}: refused before the model loaded; drop it from NEEDS_THE_MODEL"
    else:
        assert loader_calls == [], f"{name}: refused only after the model loader ran"
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


def test_the_learning_rate_a_refusal_recommends_is_used(states, tmp_path):
    """Issue 28, 1: an optimizer state whose lr is 0 is refused with "set probe.learning_rate"; doing so works,
    for the plain step and for the real one, and the rate is marked given."""
    res = runner.invoke(app, ["delta-h1", *adam(states["lr_zero"]), "--quiet"])
    assert res.exit_code == 2 and "set probe.learning_rate" in res.stderr, res.stderr
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["delta-h1", *adam(states["lr_zero"]), "--set", "probe.learning_rate=1e-5", "--quiet",
                              "--json", str(out)])
    assert res.exit_code == 0, res.stderr
    result = json.loads(out.read_text())["result"]
    assert result["learning_rate"] == 1e-5 and result["step"]["lr"] == 1e-5
    assert result["step"]["sources"]["lr"].startswith("given: probe.learning_rate"), result["step"]["sources"]
    assert "is 0" in result["step"]["sources"]["lr"]  # and what the run's own rate was
    assert result["deltaH1"] != 0 and result["deltaH"] != 0


def test_zero_advantages_say_why_deltaH1_is_0(tmp_path):
    """Issue 28, 5: equal rewards in every group give deltaH1 = 0 exactly; the headline says so, never -0 +- 0."""
    path = rollouts(tmp_path / "r.jsonl", *[{"prompt": [1, 5 + k], "responses": [[6, 2], [7], [8, 9]],
                                             "rewards": [0.5 * k] * 3} for k in range(4)])
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["delta-h1", "--rollouts", path, "--json", str(out)])
    assert res.exit_code == 0, res.stderr
    row = next(ln for ln in res.stdout.splitlines() if "deltaH1 (plain step)" in ln)
    assert "0 by construction (zero advantages" in row and "-0" not in row and "±" not in row, row
    from gradprobe import schemas
    from tests.support.schema import validate

    payload = json.loads(out.read_text())
    schema = schemas.load("delta-h1")
    assert validate(payload, schema, schema) == []
    result = payload["result"]
    assert result["deltaH1"] == 0 and result["notes"][0].startswith("every group's rewards are equal")


def test_progress_lines_off_a_terminal(monkeypatch):
    """Issue 28, 7: not on a terminal (CliRunner's stderr is not one), each stage gets a plain line as it begins,
    and the units their count; --quiet prints none."""
    res = runner.invoke(app, ["delta-h1", "--set", "batch.num_prompts=4"])
    assert res.exit_code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and all(PROGRESS_LINE.match(ln) for ln in lines), lines
    stages = [ln.split("] ", 1)[1] for ln in lines]
    assert stages == ["model load", "warm-up", "batch", "probe", "probe: 4/4 units"], stages
    times = [float(ln.split("[", 1)[1].split(" s]")[0]) for ln in lines]
    assert times == sorted(times)
    quiet = runner.invoke(app, ["delta-h1", "--set", "batch.num_prompts=4", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr.strip() == "", quiet.stderr


def test_progress_lines_are_at_most_one_every_few_seconds(monkeypatch):
    """Within a stage a unit line waits PROGRESS_EVERY_S after the last line; the last unit always prints."""
    from rich.console import Console

    from gradprobe.cli import common

    now = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    err = Console(record=True, width=200, no_color=True, file=open(os.devnull, "w"))
    lines = common.PlainProgress(err, "delta-h1", "units")
    lines.stage("probe")
    for done in range(1, 21):  # one unit every 0.7 s
        now[0] += 0.7
        lines.update(done, 20)
    shown = [ln for ln in err.export_text().splitlines() if ln]
    assert shown[0] == "gradprobe delta-h1 [   0.0 s] probe"
    assert [ln.split("] ")[1] for ln in shown[1:]] == ["probe: 8/20 units", "probe: 16/20 units", "probe: 20/20 units"]
    assert all(common.PROGRESS_LINE.match(ln) for ln in shown)


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigint_in_the_first_second_is_one_line_and_exit_130(delay, tmp_path):
    """Issue 28, 6: Ctrl-C while the command starts (torch and transformers still importing): no traceback, no
    import error of a half-imported library, one line, exit 130, nothing written."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "gradprobe", "delta-h1", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["interrupted by SIGINT before the work began; nothing written"], err
    assert not out.exists()


def test_a_library_error_raised_by_the_signal_is_still_an_interruption(monkeypatch):
    """Issue 28, 6: transformers turns a KeyboardInterrupt inside a lazy import into "Could not import module";
    the cause is the signal: exit 4 (the model load had begun), not an internal error (3)."""
    from gradprobe.errors import Interrupted

    def interrupted_import(cfg):
        try:
            raise Interrupted("SIGINT")
        except Interrupted as exc:
            raise RuntimeError("Could not import module 'Qwen2ForCausalLM'") from exc

    monkeypatch.setattr(gp_stack, "load_stack", interrupted_import)
    res = runner.invoke(app, ["delta-h1", "--quiet"])
    assert res.exit_code == 4, (res.exit_code, res.stderr)
    assert res.stderr.strip() == "interrupted by SIGINT during model load; no --json given, nothing written"


def test_callback_arguments_of_the_wrong_kind_are_one_error(tmp_path):
    """Issue 28, 8: GradprobeCallback(group_size="8") and a prompt its tokenizer cannot encode are GradprobeError
    naming the argument, not a TypeError or ValueError from inside."""
    from gradprobe.errors import GradprobeError
    from tests.support.trainer_run import micro_trainer

    for kwargs, words in [(dict(group_size="8"), "group_size must be an integer"),
                          (dict(microbatch_size=2.0), "microbatch_size must be an integer"),
                          (dict(temperature="1"), "temperature must be a number")]:
        with pytest.raises(GradprobeError, match=words):
            gp.GradprobeCallback(["abc", "fed"], **kwargs)
    trainer, tok = micro_trainer(tmp_path / "run", steps=1)
    gp.GradprobeCallback(["abc", "hello world!"], tokenizer=tok).attach(trainer)
    with pytest.raises(GradprobeError, match=r"eval_prompts\[1\] 'hello world!' cannot be tokenized"):
        trainer.train()


def test_help_shows_no_bool_metavar():
    for command in ("delta-h1", "diagnose", "validate", "plot", "env", None):
        res = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": "120"})
        assert res.exit_code == 0 and "--help" in res.stdout, res.output
        assert "<bool>" not in res.stdout, res.stdout

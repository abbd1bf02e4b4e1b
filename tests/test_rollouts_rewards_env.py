"""Rollout files (text or ids, normalisation lengths), reward plugins, and `gradprobe env`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradprobe.api import build_batch, delta_h1
from gradprobe.cli import app
from gradprobe.config import load_config
from gradprobe.errors import GradprobeError
from gradprobe.rewards import load_reward
from gradprobe.rollouts import _decode, builtin_reward, read_rollouts, write_rollouts
from gradprobe.tokenizer import CharTokenizer

SMALL = ["batch.num_prompts=4", "batch.group_size=3", "batch.max_new_tokens=6"]
PLUGIN = "def score(prompt, response):\n    return float(len(response)) + 0.5 * prompt.count(' ')\n"


@pytest.fixture(scope="module")
def stack(fp32_stacks):
    """The suite's shared tiny nf4 stack (conftest); batch and probe settings come from each test's config."""
    return fp32_stacks["reentrant"]


def test_reward_plugin_scores_generated_responses(stack, tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text(PLUGIN)
    cfg = load_config(overrides=[*SMALL, f"batch.reward={plugin}:score"])
    batch = build_batch(stack, cfg)
    for g in batch.groups:
        prompt = _decode(stack.tokenizer, g.prompt)
        assert g.rewards == [len(_decode(stack.tokenizer, r)) + 0.5 * prompt.count(" ") for r in g.responses]


def test_reward_plugin_by_module_name_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team_rewards.py").write_text(PLUGIN + "NOT_CALLABLE = 3\ndef bad(prompt, response):\n"
                                              "    return 'high'\ndef boom(prompt, response):\n    raise KeyError(7)\n")
    assert load_reward("team_rewards:score")("a b", "xyz") == 3.5
    assert load_reward("builtin") is builtin_reward
    with pytest.raises(GradprobeError, match="cannot import 'no_such_module_x': ModuleNotFoundError"):
        load_reward("no_such_module_x:score")
    with pytest.raises(GradprobeError, match="module 'team_rewards' has no attribute 'missing'"):
        load_reward("team_rewards:missing")
    with pytest.raises(GradprobeError, match="is not callable"):
        load_reward("team_rewards:NOT_CALLABLE")
    with pytest.raises(GradprobeError, match=r"returned 'high' \(str\), not a number"):
        load_reward("team_rewards:bad")("p", "r")
    with pytest.raises(GradprobeError, match="raised KeyError"):
        load_reward("team_rewards:boom")("p", "r")
    with pytest.raises(GradprobeError, match="plugin file not found"):
        load_reward(str(tmp_path / "nowhere.py") + ":score")
    with pytest.raises(GradprobeError, match="batch.reward must be 'builtin' or 'module:function'"):
        load_config(overrides=["batch.reward=just_a_name"])


def test_text_rollouts_round_trip_with_the_builtin_tokenizer(stack, tmp_path):
    """Special tokens (BOS in the prompt, EOS or PAD sampled in a response) are written and read back as text."""
    batch = build_batch(stack, load_config(overrides=SMALL))
    write_rollouts(batch, tmp_path / "ids.jsonl")
    write_rollouts(batch, tmp_path / "text.jsonl", tokenizer=CharTokenizer())
    first = json.loads((tmp_path / "text.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<bos>") and isinstance(first["responses"][0], str)
    a = read_rollouts(tmp_path / "ids.jsonl", CharTokenizer())
    b = read_rollouts(tmp_path / "text.jsonl", CharTokenizer())
    assert [(g.prompt, g.responses, g.rewards) for g in a.groups] == [(g.prompt, g.responses, g.rewards)
                                                                     for g in b.groups]


@pytest.mark.parametrize("normalization", ["dr_grpo", "per_token"])
def test_lengths_set_the_loss_normalisation(stack, tmp_path, normalization):
    """Y is linear in 1/L: lengths twice the token counts halve deltaH1 exactly, whatever the normalisation."""
    cfg = load_config(overrides=[*SMALL, f"probe.normalization={normalization}"])
    batch = build_batch(stack, cfg)
    path = tmp_path / "r.jsonl"
    lines = []
    for g in batch.groups:
        lines.append(json.dumps({"prompt": g.prompt, "responses": g.responses, "rewards": g.rewards,
                                 "lengths": [2 * max(len(r), 1) for r in g.responses]}))
    path.write_text("\n".join(lines) + "\n")
    doubled = read_rollouts(path, stack.tokenizer)
    assert doubled.groups[0].lengths == [2 * max(len(r), 1) for r in batch.groups[0].responses]
    base = delta_h1(stack, batch, cfg)
    half = delta_h1(stack, doubled, cfg)
    assert base.deltaH1 != 0
    assert half.deltaH1 == pytest.approx(base.deltaH1 / 2, rel=1e-5)


def test_bad_lengths_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": [1, 5], "responses": [[4], [5, 6]], "rewards": [0, 1]}) + "\n"
                    + json.dumps({"prompt": [1, 5], "responses": [[4], [5, 6]], "rewards": [0, 1], "lengths": [3]})
                    + "\n")
    with pytest.raises(GradprobeError, match=r"r.jsonl:2: 'lengths' must be a list of 2 positive integers"):
        read_rollouts(path, CharTokenizer())


def test_env_reports_versions_and_backend():
    res = CliRunner().invoke(app, ["env", "--json", "-"])
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)
    assert env["schema"] == "gradprobe.env/1"
    assert env["torch"]["version"] == torch.__version__
    assert torch.__version__.startswith(env["packages"]["torch"].split("+")[0])  # local tags like +cpu may differ
    assert env["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(env["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert env["bitsandbytes"]["backend"] == ("CUDA" if torch.cuda.is_available() else "CPU")
    text = CliRunner().invoke(app, ["env"])
    assert text.exit_code == 0
    assert f"torch         {torch.__version__}" in text.stdout and "bnb backend" in text.stdout


def test_bitsandbytes_32bit_adam_state_gives_torch_adams_preconditioner():
    """QLoRA recipes often train with optim=paged_adamw_32bit: bitsandbytes saves exp_avg_sq as state2."""
    import bitsandbytes as bnb

    from gradprobe.optim.precondition import from_adam_state

    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (16,)]
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ref = torch.optim.AdamW(a, lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    opt = bnb.optim.AdamW32bit(b, lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    names = ["w", "bias"]
    want = from_adam_state(ref.state_dict(), names, a).scales
    got = from_adam_state(opt.state_dict(), names, b).scales
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


def test_bitsandbytes_8bit_adam_state_is_dequantised():
    """paged_adamw_8bit (the QLoRA paper's optimizer) keeps its moments in 8 bits: P comes from the same
    dequantised values the optimizer's kernel reads, and stays within quantisation error of 32-bit Adam."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from gradprobe.optim.precondition import from_adam_state

    gen = torch.Generator().manual_seed(0)
    shape = (70, 130)  # 9100 values: blocks of 256, the last one partial
    a = torch.nn.Parameter(torch.randn(shape, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-3)
    opt = bnb.optim.AdamW8bit([b], lr=1e-3)
    for _ in range(5):
        g = torch.randn(shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    sd = opt.state_dict()
    got = from_adam_state(sd, ["w"], [b]).scales[0]
    q = sd["state"][0]["__bnb_optimizer_quant_state__"]
    v = bnbf.dequantize_blockwise(q["state2"], absmax=q["absmax2"], code=q["qmap2"], blocksize=256).reshape(shape)
    step = float(sd["state"][0]["step"])
    torch.testing.assert_close(got, 1 / ((v.double() / (1 - 0.999 ** step)).sqrt() + 1e-8).float(), rtol=1e-6, atol=0)
    want = from_adam_state(ref.state_dict(), ["w"], [a]).scales[0]
    rel = ((got - want).abs() / want).flatten()
    assert rel.median() < 0.02 and rel.max() < 0.2


def test_token_logprobs_round_trip_and_their_errors_name_the_line(tmp_path):
    """old_logprobs and ref_logprobs: one list per response, one log-prob per generated token."""
    from gradprobe.rollouts import Batch, Group

    tok = CharTokenizer()
    group = Group([1, 5], [[4], [5, 6]], [0.0, 1.0], [-1.0, 1.0], old_logprobs=[[-0.5], [-1.0, -2.25]],
                  ref_logprobs=[[-0.75], [-1.5, -0.125]])
    path = tmp_path / "r.jsonl"
    write_rollouts(Batch([group, group]), path)
    back = read_rollouts(path, tok)
    assert [(g.old_logprobs, g.ref_logprobs) for g in back.groups] == [(group.old_logprobs, group.ref_logprobs)] * 2
    line = {"prompt": [1, 5], "responses": [[4], [5, 6]], "rewards": [0, 1]}
    for bad, match in (({"old_logprobs": [[-0.5], [-1.0]]}, "response 1 has 1 log-probs for its 2 tokens"),
                       ({"old_logprobs": [-0.5, -3.0]}, "must be a list of 2 lists"),
                       ({"ref_logprobs": [[0.5], [-1.0, -1.0]]}, "not a finite log-probability"),
                       ({"old_logprobs": [["a"], [-1.0, -1.0]]}, "'old_logprobs'")):
        path.write_text(json.dumps(line) + "\n" + json.dumps({**line, **bad}) + "\n")
        with pytest.raises(GradprobeError, match=r"r.jsonl:2: .*" + match):
            read_rollouts(path, tok)
    # the step and pass a captured file is: on every line, one value
    write_rollouts(Batch([group, group], meta={"step": 7, "pass": 2}), path)
    assert {k: read_rollouts(path, tok).meta[k] for k in ("step", "pass")} == {"step": 7, "pass": 2}
    path.write_text(json.dumps({**line, "pass": 1}) + "\n" + json.dumps({**line, "pass": 2}) + "\n")
    with pytest.raises(GradprobeError, match="different pass numbers"):
        read_rollouts(path, tok)
    # on some lines only: the pass cannot be modelled for the others, refused
    from gradprobe.objective import has_token_logprobs

    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "old_logprobs": [[-0.5], [-1.0, -1.0]]}) + "\n")
    with pytest.raises(GradprobeError, match="'old_logprobs' is on 1 of 2 lines"):
        has_token_logprobs(read_rollouts(path, tok), "old_logprobs")

"""Property: over generated rollouts files and --set overrides, delta-h1 never prints a traceback and exits
only with a documented code (0 done, 2 bad input with one line on stderr). Micro preset: a model load and
a probe take about a second."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gradprobe.cli import app
from gradprobe.cli.common import EXIT_CODES

runner = CliRunner()
MICRO = ["--set", "model.preset=micro", "--set", "autocast=off", "--set", "checkpointing=off",
         "--set", "quant.compute_dtype=float32"]

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3), st.booleans())
tokens = st.lists(st.integers(-1, 11), max_size=4) | st.lists(st.just(3), min_size=60, max_size=70)
group = st.builds(
    lambda prompt, responses, rewards, extra: {"prompt": prompt, "responses": responses, "rewards": rewards, **extra},
    st.lists(st.integers(0, 11), max_size=3) | st.text("abcdefg", max_size=4),
    st.lists(tokens, min_size=1, max_size=3),
    st.lists(numbers, min_size=1, max_size=3),
    st.fixed_dictionaries({}, optional={"lengths": st.lists(st.integers(-1, 5), max_size=3),
                                        "advantages": st.lists(numbers, max_size=3)}),
)


@st.composite
def well_formed(draw) -> dict:
    """A group that parses: G responses of micro tokens and G finite rewards."""
    g = draw(st.integers(2, 3))
    return {"prompt": draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)),
            "responses": [draw(st.lists(st.integers(1, 9), max_size=4)) for _ in range(g)],
            "rewards": [draw(st.floats(-2, 2)) for _ in range(g)]}


line = st.one_of(well_formed().map(json.dumps), well_formed().map(json.dumps), group.map(json.dumps),
                 st.sampled_from(["", "{", "[]", "null", '{"prompt": 1}']))
override = st.one_of(
    st.tuples(st.just("probe.microbatch_size"), st.integers(-1, 5).map(str)),
    st.tuples(st.just("probe.schedule"), st.sampled_from(["fused", "literal", "one_backward", "bogus"])),
    st.tuples(st.just("probe.mode"), st.sampled_from(["exact", "blocks", "exactly"])),
    st.tuples(st.just("probe.block_size"), st.integers(0, 3).map(str)),
    st.tuples(st.just("probe.normalization"), st.sampled_from(["dr_grpo", "per_token", ""])),
    st.tuples(st.just("probe.learning_rate"), st.sampled_from(["1e-3", "0", "-1", "nan", "inf", "abc", "null"])),
    st.tuples(st.just("batch.temperature"), st.sampled_from(["0.7", "0", "nan", "1e308"])),
    st.tuples(st.sampled_from(["seed", "probe.seed", "lora.r"]), st.sampled_from(["0", "3", "-1", "x", "1.5"])),
).map(lambda kv: f"{kv[0]}={kv[1]}")


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(lines=st.lists(line, min_size=1, max_size=5), overrides=st.lists(override, max_size=3))
def test_cli_never_tracebacks_and_exits_with_documented_codes(lines, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        path.write_text("\n".join(lines) + "\n")
        sets = [a for o in overrides for a in ("--set", o)]
        res = runner.invoke(app, ["delta-h1", "--rollouts", str(path), *MICRO, *sets, "--json", "-", "--quiet"])
    event(f"exit {res.exit_code}")
    assert res.exit_code in EXIT_CODES and res.exit_code in (0, 2), (res.exit_code, res.stderr, lines, overrides)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    if res.exit_code == 2:
        assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
        assert res.stderr.startswith("error: ")
    else:
        r = json.loads(res.stdout)["result"]
        assert r["B"] >= 2 and (r["deltaH1"] is None or math.isfinite(r["deltaH1"]))

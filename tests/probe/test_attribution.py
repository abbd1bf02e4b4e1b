"""Per-unit attribution of deltaH and deltaH1: the shares sum to the estimates, and each equals the brute force
over per-unit gradients formed one sequence at a time, with the row means taken by an explicit double loop."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

import gradprobe as gp
from gradprobe.optim.precondition import Preconditioner
from gradprobe.optim.update import UpdateParts
from gradprobe.probe import real_step
from tests.conftest import FP32, make_cfg
from tests.support.persample import sequence_jacobian

LR = 3e-4


def row_mean_shares(k: torch.Tensor) -> list[float]:
    """-r[u]/B, r[u] = sum_{v != u} (K[u,v] + K[v,u]) / (2(B-1)), by a double loop."""
    b = k.shape[0]
    return [-sum(float(k[u, v] + k[v, u]) for v in range(b) if v != u) / (2 * (b - 1)) / b for u in range(b)]


def test_unit_contributions_sum_to_the_u_statistic_and_match_the_double_loop():
    g = torch.Generator().manual_seed(0)
    b = 7
    k = torch.randn(b, b, generator=g, dtype=torch.float64) + 0.3
    shares = real_step.unit_contributions(k)
    brute = -sum(float(k[u, v]) for u, v in itertools.permutations(range(b), 2)) / (b * (b - 1))
    assert float(shares.sum()) == pytest.approx(brute, rel=1e-12)
    assert shares.tolist() == pytest.approx(row_mean_shares(k), rel=1e-12)
    x_m, x_d = torch.randn(b, generator=g, dtype=torch.float64), torch.randn(b, generator=g, dtype=torch.float64)
    est = real_step.same_batch(k, x_m, x_d, 1.0)
    assert sum(est.unit_terms) == pytest.approx(est.deltaH, rel=1e-12)
    assert est.unit_terms == pytest.approx(row_mean_shares(k + (x_m + x_d)[:, None]), rel=1e-12)
    ind = real_step.independent(k[0], x_m, x_d, 1.0)
    assert ind.unit_terms == pytest.approx((-(k[0] + x_m + x_d) / b).tolist(), rel=1e-12)
    assert sum(ind.unit_terms) == pytest.approx(ind.deltaH, rel=1e-12)


def per_unit_brute_force(stack, batch, units: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """X[u] and grad LY[u] (fp64 [units, n]) from per-sequence gradients (tests/support/persample.py) and the
    weights written out: X = mean over the unit's prompts of (1/G) sum_g (S[g] - mean_{h != g} S[h]) grad S[g],
    LY likewise with A[g] / (G max L) (the default loss type, group_lmax)."""
    pairs = [(grp.prompt, r) for grp in batch.groups for r in grp.responses]
    s, jac = sequence_jacobian(stack, pairs, batch.temperature)
    jac = jac.double()
    xs, ys, i = [], [], 0
    for grp in batch.groups:
        g = len(grp.responses)
        sg, jg = s[i:i + g], jac[i:i + g]
        i += g
        c = torch.stack([sg[j] - (sg.sum() - sg[j]) / (g - 1) for j in range(g)])
        rewards = torch.tensor(grp.rewards, dtype=torch.float64)
        lmax = max(len(r) for r in grp.responses)
        xs.append((c[:, None] * jg).sum(0) / g)
        ys.append((((rewards - rewards.mean()) / lmax)[:, None] * jg).sum(0) / g)
    return (torch.stack([torch.stack([xs[p] for p in ps]).mean(0) for ps in units]),
            torch.stack([torch.stack([ys[p] for p in ps]).mean(0) for ps in units]))


@pytest.mark.parametrize("mode", ["exact", "blocks"])
def test_probe_units_equal_brute_force(fp32_stacks, rollouts_file, mode):
    """packed with a given step decomposition (random a, momentum, decay, clip 0.6): each unit's deltaH share is
    -r[u]/B of K[u,v] = X[u] . D[v], its deltaH1 share -lr r1[u]/B of X[u] . Y[v]; both sum to the estimates.
    Blocks mode: a unit carries its prompts, and the first prompt's text."""
    stack = fp32_stacks["non_reentrant"]
    cfg = make_cfg(*FP32, "checkpointing=non_reentrant", f"batch.rollouts={rollouts_file}", f"probe.mode={mode}",
                   "probe.block_size=2")
    batch = gp.build_batch(stack, cfg)
    g = torch.Generator().manual_seed(3)
    a = [-LR * (0.5 + torch.rand(p.shape, generator=g)) for p in stack.params]
    mom = [1e-4 * torch.randn(p.shape, generator=g) for p in stack.params]
    dec = [-1e-5 * p.detach().clone() for p in stack.params]
    r = gp.probe.run_probe(stack, batch, cfg.probe, Preconditioner(None), LR, step_parts=lambda grads:
                           UpdateParts(a, mom, dec, 0.6))
    units = [[p] for p in range(batch.B)] if mode == "exact" else [[0, 1], [2, 3], [4, 5]]
    x, ly = per_unit_brute_force(stack, batch, units)
    flat = [torch.cat([t.reshape(-1) for t in ts]).double() for ts in (a, mom, dec)]
    d = 0.6 * flat[0] * (-ly) + flat[1] + flat[2]  # D[v]; the run's loss is -LY
    assert [u["unit"] for u in r.units] == list(range(len(units))) and [u["prompts"] for u in r.units] == units
    assert set(r.units[0]) == {"unit", "prompts", "text", "deltaH", "deltaH1"}
    assert [u["deltaH"] for u in r.units] == pytest.approx(row_mean_shares(x @ d.T), rel=1e-4, abs=1e-12)
    lr_shares = [LR * v for v in row_mean_shares(x @ ly.T)]
    assert [u["deltaH1"] for u in r.units] == pytest.approx(lr_shares, rel=1e-4, abs=1e-12)
    assert sum(u["deltaH"] for u in r.units) == pytest.approx(r.deltaH, rel=1e-9)
    # deltaH1 itself comes from Xbar . Ybar (fp32 sums), the shares from K: equal up to fp32 rounding
    assert sum(u["deltaH1"] for u in r.units) == pytest.approx(r.deltaH1, rel=1e-5)
    texts = [gp.rollouts.prompt_text(stack.tokenizer, batch.groups[ps[0]].prompt) for ps in units]
    assert [u["text"] for u in r.units] == texts and all(texts)
    assert r.entropy_units == []


@pytest.mark.slow
def test_literal_has_deltaH1_shares_and_no_deltaH_shares(fp32_stacks, rollouts_file):
    stack = fp32_stacks["reentrant"]
    cfg = make_cfg(*FP32, f"batch.rollouts={rollouts_file}")
    batch = gp.build_batch(stack, cfg)
    packed = gp.probe.run_probe(stack, batch, cfg.probe, Preconditioner(None), LR)
    literal = gp.probe.run_probe(stack, batch, replace(cfg.probe, schedule="literal"), Preconditioner(None), LR)
    assert all(math.isnan(u["deltaH"]) for u in literal.units)
    assert [u["deltaH1"] for u in literal.units] == pytest.approx([u["deltaH1"] for u in packed.units], rel=1e-4)
    assert sum(u["deltaH1"] for u in literal.units) == pytest.approx(literal.deltaH1, rel=1e-5)


def test_prompt_text_is_one_line_and_keeps_both_ends(fp32_stacks):
    from gradprobe.rollouts import prompt_text

    tok = fp32_stacks["reentrant"].tokenizer
    assert prompt_text(tok, tok.encode("  say   hi: ", add_bos=True)) == "say hi:"
    text = "what is up? " * 30 + "say bye:"
    long = prompt_text(tok, tok.encode(text, add_bos=True))
    assert len(long) <= 200 and long.startswith("what is up?") and long.endswith("say bye:") and " … " in long


def test_schema_describes_every_result_field_and_the_unit_keys():
    """delta-h1.schema.json names every ProbeResult field (units and entropy_units sit beside the result), the
    registry's schedules, and exactly the five keys of a unit."""
    import dataclasses

    from gradprobe import schemas
    from gradprobe.probe import ProbeResult
    from gradprobe.probe.schedules import NAMES
    from tests.support.schema import validate

    schema = schemas.load("delta-h1")
    result = schema["properties"]["result"]
    fields = [f.name for f in dataclasses.fields(ProbeResult)
              if f.name not in ("units", "entropy_units") and f.metadata.get("json", True)]
    assert list(result["properties"]) == fields and result["required"] == fields
    assert result["properties"]["schedule"]["enum"] == list(NAMES)
    unit = {"unit": 0, "prompts": [0, 1], "text": "say hi:", "deltaH": None, "deltaH1": -1e-6}
    ref = {"$ref": "#/$defs/unit"}
    assert validate(unit, ref, schema) == []
    assert validate({**unit, "share": 0.5}, ref, schema)
    assert validate({k: v for k, v in unit.items() if k != "text"}, ref, schema)
    assert validate({**unit, "prompts": []}, ref, schema)
    assert validate({**unit, "deltaH": "n/a"}, ref, schema)

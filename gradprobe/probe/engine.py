"""The delta-H1 probe: per-unit gradients X[u], Y[u] = P grad LY[u] from backward() alone.

The engine splits a batch into units and forwards, runs forwards and weighted backwards, and turns what a
schedule returns into the result. The schedules themselves (how forwards and backwards are arranged, and
where per-unit gradients go) live in schedules/, one module each; probe.schedule picks one by name.
Dot products take fp32 products and fp64 sums.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from ..attention import without_cudnn_attention
from ..errors import GradprobeError
from ..objective import (
    PassSpec,
    batch_advantages,
    check_pass,
    needs_token_weights,
    pack,
    token_logprobs,
    token_y_weights,
    x_weights,
    y_norms_for_batch,
    y_weights_for_batch,
)
from ..optim.precondition import Preconditioner
from ..params import FlatLayout, GradReader, layer_name, module_name
from ..rollouts import Batch
from . import real_step, schedules, ustat
from .attribution import unit_rows
from .schedules.base import Context

if TYPE_CHECKING:
    from ..config import Config, ProbeSection

Chunk = list[tuple[int, int, int]]  # (prompt, first response, end response)


@dataclass
class ProbeResult:
    deltaH1: float
    U_cross: float
    se: float  # standard error of deltaH1 (Hoeffding, from the row means)
    se_jackknife: float  # standard error of deltaH1 (delete-one jackknife)
    U_cross_se: float
    U_cross_se_jackknife: float
    se_unbiased: float  # standard error of deltaH1 from the unbiased variance (ustat.py); NaN under literal
    U_cross_se_unbiased: float
    U_cross_var_unbiased: float  # that variance before clipping at 0: negative means "SE ~ 0, B too small"
    bars_dot: float
    diag_sum: float
    B: int  # units (prompts in exact mode, blocks in blocks mode)
    G: int
    n_prompts: int
    learning_rate: float
    n_params: int
    n_tensors: int
    x_sum_norm: float
    y_sum_norm: float
    x_nonnull: int  # tensors with a non-None grad in every X backward
    y_nonnull: int
    x_nonzero: int  # tensors whose summed X gradient is not all zero
    y_nonzero: int
    row_means: list[float]
    modules: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    mode: str
    schedule: str
    microbatch_size: int
    precondition: str
    normalization: str
    forwards: int
    backwards: int
    tokens: int
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the schedule decided and why (e.g. where the bank lives)
    # The real next optimizer step (real_step.py): set when run_probe was given the step's parts.
    deltaH: float = math.nan  # first-order entropy change of the step optimizer.step() will take
    se_deltaH: float = math.nan  # its SE as a prediction of this step's change (the step held at its value)
    se_deltaH_batches: float = math.nan  # the estimator's SD over batches (unbiased U variance)
    entropy_batch: str = "same"  # "same": X from the update batch (U-statistic); "independent": from batch E
    parts: dict[str, Any] = field(default_factory=dict)  # fresh, momentum, weight_decay {value, se}; clip_factor
    step: dict[str, Any] = field(default_factory=dict)  # the StepSettings, with `sources`
    update_norm: float = math.nan  # |Delta theta| of the real step, as the run's dtype rounds it
    update_norm_unrounded: float = math.nan  # |Delta theta| in exact arithmetic (the parts before rounding)
    deltaH_unrounded: float = math.nan  # deltaH of the unrounded step (deltaH minus the rounding part)
    rounded_away: float = 0.0  # share of coordinates with a non-zero exact step that the run's dtype leaves still
    update_rel: float = math.nan  # |Delta theta| / |theta|: past real_step.FIRST_ORDER_LIMIT deltaH is not first order
    beyond_first_order: bool = False  # update_rel > real_step.FIRST_ORDER_LIMIT (the report says so)
    plain_update_norm: float = math.nan  # |lr P Ybar|, the step deltaH1 describes
    plain_update_cosine: float = math.nan  # cos(real step, plain step)
    same_batch: dict[str, Any] = field(default_factory=dict)  # the same-batch estimate when deltaH is independent
    real_step_note: str = ""  # why deltaH is NaN, or what it assumed
    warmup_steps: int = 0  # AdamW steps taken on the model before probing (probe.warmup_steps)
    # each unit's share of deltaH and deltaH1, summing to them (attribution.py); the entropy batch's units
    units: list[dict[str, Any]] = field(default_factory=list)
    entropy_units: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1  # processes of a torchrun launch (distributed.py); 1 without it
    units_per_rank: list[int] = field(default_factory=list)  # how many units each rank processed
    # TRL's pass the Y loss models (objective.PassSpec): num_iterations, epsilon, beta, ratio source, clipped share
    trl_pass: dict[str, Any] = field(default_factory=dict)
    # per estimate (deltaH, deltaH1, each part): can it be told from zero, and at about how many units
    # (real_step.resolution); filled by resolve() once deltaH is final
    resolution: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the headline's step per trainable tensor (probe order names), kept only when asked (api.delta_h1
    # keep_update); never in the JSON
    update: dict[str, torch.Tensor] | None = field(default=None, repr=False, metadata={"json": False})
    gradient: dict[str, torch.Tensor] | None = field(default=None, repr=False,  # the run's loss gradient it used
                                                     metadata={"json": False})

    def resolve(self) -> None:
        """Fill `resolution` from the final estimates (an independent entropy batch replaces deltaH's)."""
        units = len(self.entropy_units) if self.entropy_batch == "independent" and self.entropy_units else self.B
        out = {"deltaH": real_step.resolution(self.deltaH, self.se_deltaH, units),
               "deltaH1": real_step.resolution(self.deltaH1, (self.se_unbiased if math.isfinite(self.se_unbiased)
                                                              else self.se) if self.B >= 4 else math.nan, self.B)}
        for key, part in self.parts.items():
            if isinstance(part, dict):
                out[key] = real_step.resolution(part["value"], part["se"], units)
        self.resolution = out

    def to_dict(self) -> dict[str, Any]:
        """The JSON's fields: every field but the tensors kept for the Python API (metadata json=False)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.metadata.get("json", True)}


def _plain(value: Any) -> Any:
    """A field as asdict gives it (nested dataclasses as dicts, containers copied)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def units_of(batch: Batch, mode: str, block_size: int) -> list[list[int]]:
    """Exact: one unit per prompt. Blocks: consecutive runs of block_size prompts."""
    b = batch.B
    units = [[p] for p in range(b)] if mode == "exact" else \
        [list(range(i, min(i + block_size, b))) for i in range(0, b, block_size)]
    if len(units) < 2:
        what = "prompts (B)" if mode == "exact" else f"blocks of {block_size} prompts"
        raise GradprobeError(f"the U-statistic needs at least 2 units; the batch gives {len(units)} {what}")
    for i, g in enumerate(batch.groups):
        if len(g.responses) < 2:
            raise GradprobeError(f"prompt {i} has {len(g.responses)} response(s); G >= 2 is needed")
    return units


def planned_units(cfg: Config) -> int:
    """The units the config's batch will give, before it is read or sampled (a rollouts file: its lines)."""
    b, p = cfg.batch, cfg.probe
    prompts = b.num_prompts
    if b.rollouts:
        try:
            prompts = sum(1 for line in Path(b.rollouts).read_text().splitlines() if line.strip())
        except OSError as exc:
            raise GradprobeError(f"cannot read the rollouts file {b.rollouts}: {exc.strerror}") from None
    return prompts if p.mode == "exact" else -(-prompts // p.block_size)


def plan_chunks(prompts: list[int], group_sizes: list[int], microbatch: int) -> list[Chunk]:
    """Pack whole response groups into forwards of at most `microbatch` sequences; split larger groups."""
    chunks: list[Chunk] = []
    cur: Chunk = []
    used = 0
    for p in prompts:
        g = group_sizes[p]
        if g > microbatch:
            if cur:
                chunks.append(cur)
                cur, used = [], 0
            chunks.extend([[(p, a, min(a + microbatch, g))] for a in range(0, g, microbatch)])
            continue
        if used + g > microbatch and cur:
            chunks.append(cur)
            cur, used = [], 0
        cur.append((p, 0, g))
        used += g
    if cur:
        chunks.append(cur)
    return chunks


class _Engine:
    """Forwards and weighted backwards over chunks of one batch."""

    def __init__(self, stack, batch: Batch, probe_cfg: ProbeSection, unit_of_prompt: dict[int, int],
                 unit_sizes: list[int], need_y: bool = True):
        self.stack = stack
        self.batch = batch
        self.mb = probe_cfg.microbatch_size
        self.norm = probe_cfg.loss_type
        self.unit_of_prompt = unit_of_prompt
        self.unit_sizes = unit_sizes
        self.group_sizes = [len(g.responses) for g in batch.groups]
        self.ref_s: dict[int, torch.Tensor] = {}  # S of groups split across forwards, from a no-grad pass
        self.forwards = 0
        self.backwards = 0
        self.tokens = 0
        # the run's own loss (objective.y_weights_for_batch: the batch loss is the mean over groups), per unit
        whole = y_weights_for_batch(batch, self.norm, probe_cfg.scale_rewards,
                                    probe_cfg.max_completion_length)
        self.y_w = {p: w / unit_sizes[unit_of_prompt[p]] for p, w in enumerate(whole) if p in unit_of_prompt}
        self._packed: dict[tuple, tuple[Any, int]] = {}
        self._wy: dict[tuple, torch.Tensor] = {}
        # TRL's per-token surrogate (objective.token_y_weights): LY = sum_{i,t} w[i,t] logp[i,t]
        self.spec = PassSpec.from_config(probe_cfg)
        if need_y:
            check_pass(batch, self.spec)
        self.token_y = need_y and needs_token_weights(batch, self.spec)
        if self.token_y:
            norms = y_norms_for_batch(batch, self.norm, probe_cfg.max_completion_length)
            self.y_norm = {p: n / unit_sizes[unit_of_prompt[p]] for p, n in enumerate(norms) if p in unit_of_prompt}
            self.adv = batch_advantages(batch, probe_cfg.scale_rewards)
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # (S, per-token log-probs) of the last forward
        self._token_rows: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.seq_stats: dict[tuple[int, int], tuple[int, int, float]] = {}  # (p, i) -> clipped, tokens, max|log r|

    def forward(self, chunk: Chunk) -> torch.Tensor:
        key = tuple(chunk)
        if key not in self._packed:  # packed once: a host-to-device copy synchronises the stream
            pairs = [(self.batch.groups[p].prompt, self.batch.groups[p].responses[i])
                     for p, a, b in chunk for i in range(a, b)]
            self._packed[key] = (pack(pairs, self.stack.tokenizer.pad_token_id, self.stack.device),
                                 sum(len(q) + len(r) for q, r in pairs))
        tb, tokens = self._packed[key]
        self.forwards += 1
        self.tokens += tokens
        tok = token_logprobs(self.stack.model, tb, self.batch.temperature, self.stack.autocast())
        s = tok.sum(-1)
        self._tokens = (s, tok)
        return s

    def y_loss(self, chunk: Chunk, s: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
        """LY of the chunk's last forward: sum_i wy[i] S[i]; with TRL's per-token surrogate sum_{i,t} w[i,t] logp."""
        if not self.token_y:
            return (s * wy).sum()
        if self._tokens is None or self._tokens[0] is not s:
            raise RuntimeError("y_loss takes the S of the engine's last forward")
        tok = self._tokens[1]
        return (tok * self.token_weights(chunk, tok).to(tok.device, torch.float32)).sum()

    def token_weights(self, chunk: Chunk, tok: torch.Tensor) -> torch.Tensor:
        """[rows, R] fp64 per-token weights of LY at the current log-probs (objective.token_y_weights)."""
        key = tuple(chunk)
        if key not in self._token_rows:
            width = tok.shape[1]
            rows = [(p, i) for p, a, b in chunk for i in range(a, b)]
            groups = self.batch.groups

            def right(values: list[list[float]] | None, i: int) -> list[float]:
                v = values[i] if values is not None else []
                return [0.0] * (width - len(v)) + list(v)

            lens = torch.tensor([len(groups[p].responses[i]) for p, i in rows])
            mask = torch.arange(width)[None, :] >= (width - lens)[:, None]
            old = torch.tensor([right(groups[p].old_logprobs, i) for p, i in rows], dtype=torch.float64)
            ref = torch.tensor([right(groups[p].ref_logprobs, i) for p, i in rows], dtype=torch.float64)
            has_old = groups[rows[0][0]].old_logprobs is not None
            has_ref = groups[rows[0][0]].ref_logprobs is not None
            adv = torch.stack([self.adv[p][i] for p, i in rows])
            norm = torch.stack([self.y_norm[p][i] for p, i in rows])
            dev = tok.device
            self._token_rows[key] = (mask.to(dev), old.to(dev) if has_old else None, ref.to(dev) if has_ref else None,
                                     adv.to(dev), norm.to(dev), rows)
        mask, old, ref, adv, norm, rows = self._token_rows[key]
        w, clipped = token_y_weights(tok, mask, adv, norm, self.spec, old, ref)
        log_r = (tok.detach().double() - old).abs() * mask if old is not None else torch.zeros_like(w)
        for j, pi in enumerate(rows):
            top = float(log_r[j].max()) if log_r.shape[1] else 0.0
            self.seq_stats.setdefault(pi, (int(clipped[j].sum()), int(mask[j].sum()), top))
        return w

    def pass_summary(self) -> dict[str, Any]:
        """The pass LY models, for the result: TRL's settings, where the ratio came from, the clipped share."""
        sp = self.spec
        has_old = bool(self.batch.groups) and self.batch.groups[0].old_logprobs is not None
        out: dict[str, Any] = {"num_iterations": sp.num_iterations, "epsilon": sp.epsilon,
                               "epsilon_high": sp.eps_high, "delta": sp.delta, "beta": sp.beta,
                               "per_token": self.token_y,
                               "ratio": "old_logprobs" if has_old else "1 (on-policy: no old_logprobs)"}
        out.update({f"captured_{k}": self.batch.meta[k] for k in ("step", "pass") if k in self.batch.meta})
        if self.seq_stats:
            stats = list(self.seq_stats.values())
            tokens = sum(t for _, t, _ in stats)
            out.update(clipped_tokens=sum(c for c, _, _ in stats), loss_tokens=tokens,
                       clipped_share=sum(c for c, _, _ in stats) / max(tokens, 1),
                       max_abs_log_ratio=max(m for _, _, m in stats))
        return out

    def prepare(self, chunks: list[Chunk]) -> None:
        """S for every group that a forward splits: the leave-one-out baseline needs the whole group."""
        split = sorted({p for c in chunks for p, a, b in c if (a, b) != (0, self.group_sizes[p])} - set(self.ref_s))
        for p in split:
            # no_grad: reentrant checkpointing warns that no input requires grad, which is the point here
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
                parts = [self.forward([c[0]]) for c in plan_chunks([p], self.group_sizes, self.mb)]
            self.ref_s[p] = torch.cat(parts).detach()

    def weights(self, chunk: Chunk, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wx, k = [], 0
        for p, a, b in chunk:
            whole = (a, b) == (0, self.group_sizes[p])
            group_s = s[k:k + b - a] if whole else self.ref_s[p]
            wx.append(x_weights(group_s)[a:b] / self.unit_sizes[self.unit_of_prompt[p]])
            k += b - a
        key = tuple(chunk)
        if key not in self._wy:
            self._wy[key] = torch.cat([self.y_w[p][a:b] for p, a, b in chunk]).to(s.device, torch.float32)
        return torch.cat(wx).to(s.device, torch.float32), self._wy[key]

    def backward(self, loss: torch.Tensor, retain: bool = False, zero: bool = True) -> None:
        """zero=False leaves .grad as it is: backward() then adds into it."""
        if zero:
            self.stack.model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain)
        self.backwards += 1


def _group_contributions(names: list[str], per_tensor: torch.Tensor, key: Callable[[str], str]) -> list[dict]:
    totals: dict[str, float] = {}
    for name, value in zip(names, per_tensor.tolist()):
        totals[key(name)] = totals.get(key(name), 0.0) + value
    rows = [{"name": k, "deltaH1": v} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -abs(r["deltaH1"]))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def forward_starts(units: list[list[int]], group_sizes: list[int], microbatch: int, schedule: str) -> list[int]:
    """The units at which a forward of the one-process run begins: a rank whose share starts at one of them
    runs the same forwards as one process (packed puts several units in a forward; the others one each)."""
    if schedule != "packed":
        return list(range(1, len(units)))
    first = {ps[0]: u for u, ps in enumerate(units)}
    chunks = plan_chunks([p for ps in units for p in ps], group_sizes, microbatch)
    return [first[c[0][0]] for c in chunks if c[0][1] == 0 and c[0][0] in first]


def shard_units(batch: Batch, probe_cfg: ProbeSection, units: list[list[int]]) -> distributed.Shard:
    """This rank's contiguous share of the units, cut where the one-process run starts a forward."""
    if probe_cfg.schedule == "literal":
        raise GradprobeError("the literal schedule is the one-process cross-check: run it without torchrun, or use "
                             "probe.schedule=packed, fused or one_backward")
    cuts = forward_starts(units, [len(g.responses) for g in batch.groups], probe_cfg.microbatch_size,
                          probe_cfg.schedule)
    starts, aligned = distributed.split(len(units), distributed.world_size(), cuts)
    return distributed.Shard(distributed.rank(), distributed.world_size(), starts, aligned)


def _context(stack, batch: Batch, probe_cfg: ProbeSection, precond: Preconditioner,
             progress: Callable[[int, int], None] | None = None, store: Any = None,
             step_parts: Callable[[list[torch.Tensor]], Any] | None = None) -> Context:
    units = units_of(batch, probe_cfg.mode, probe_cfg.block_size)
    shard = shard_units(batch, probe_cfg, units) if distributed.active() else None
    if shard is not None:
        if store is not None:
            raise GradprobeError(distributed.NO_RESUME)
        units = units[shard.lo:shard.hi]
    unit_of_prompt = {p: u for u, ps in enumerate(units) for p in ps}
    eng = _Engine(stack, batch, probe_cfg, unit_of_prompt, [len(ps) for ps in units])
    acc = stack.device if probe_cfg.accumulate_on == "device" else torch.device("cpu")
    if store is not None and probe_cfg.schedule == "literal":
        raise GradprobeError("the literal schedule sums every unit before its per-unit loop, so it cannot resume; "
                             "use probe.schedule=packed (the default) with --state")
    return Context(stack, batch, probe_cfg, precond, units, eng, FlatLayout(stack.params), acc, progress,
                   store=store, step_parts=step_parts, shard=shard)


@without_cudnn_attention()
def unit_directions(stack, batch: Batch, probe_cfg: ProbeSection, precond: Preconditioner,
                    v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-unit directional derivatives {"x": X[u].v, "y": Y[u].v} (fp64 [units], CPU) for one vector v of
    n_params values in the probe's parameter order, from the packed schedule's forwards and one backward
    per forward: no per-unit gradient is formed or stored (lora_grads.py)."""
    from .schedules.packed import directions

    if v.shape != (stack.n_params,):
        raise GradprobeError(f"a direction needs {stack.n_params} values (one per trainable parameter); "
                             f"got shape {tuple(v.shape)}")
    ctx = _context(stack, batch, probe_cfg, precond)
    with distributed.guard("the directional derivatives"):
        x, y = directions(ctx, v)
    if ctx.shard is not None:
        distributed.sync("gathering the directional derivatives")
        x, y = distributed.gather_rows(x, ctx.shard), distributed.gather_rows(y, ctx.shard)
    return {"x": x, "y": y}


@without_cudnn_attention()
def run_probe(stack, batch: Batch, probe_cfg: ProbeSection, precond: Preconditioner,
              learning_rate: float, progress: Callable[[int, int], None] | None = None,
              store: Any = None, step_parts: Callable[[list[torch.Tensor]], Any] | None = None) -> ProbeResult:
    """Compute delta-H1 = -lr * U_cross with its standard errors on one batch. `store` (resume.UnitStore:
    save(u, x, raw y, x_present, y_present) after each unit, load(u) before it) makes a run resumable. With
    `step_parts` (the real step's decomposition, sink.StepParts) also deltaH of the step the optimizer will
    take (real_step.py)."""
    ctx = _context(stack, batch, probe_cfg, precond, progress, store, step_parts)
    layout, eng, n, m = ctx.layout, ctx.eng, stack.n_params, ctx.total
    if stack.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(stack.device)
    t0 = time.perf_counter()
    with distributed.guard("the probe"):  # the schedule's sink.finish() opens the reductions with a sync
        out = schedules.get(probe_cfg.schedule)(ctx)
    sx, sy, diag_t, cross = out.sx, out.sy, out.diag_t, out.cross
    x_dot_sy, y_dot_sx = out.x_dot_sy, out.y_dot_sx
    x_present, y_present = min(ctx.x_present), min(ctx.y_present)
    counts = [eng.forwards, eng.backwards, eng.tokens]
    if stack.device.type == "cuda":
        torch.cuda.synchronize(stack.device)
    seconds = time.perf_counter() - t0
    if ctx.shard is not None:  # whole-run counts
        counts = distributed.all_reduce(torch.tensor(counts, dtype=torch.int64), "sum").tolist()
        x_present, y_present = distributed.all_reduce(torch.tensor([x_present, y_present]), "min").tolist()
    sxsy_t = layout.dots(sx, sy)
    bars_dot = float(sxsy_t.sum()) / m ** 2
    diag = diag_t.sum(1)
    st = ustat.summarize(bars_dot, diag.cpu(), x_dot_sy.cpu(), y_dot_sx.cpu(), cross=cross)
    per_tensor = -learning_rate * (sxsy_t - diag_t.sum(0).to(sxsy_t.device)).cpu() / (m * (m - 1))
    x_norms = layout.dots(sx, sx)
    y_norms = layout.dots(sy, sy)
    peak, peak_kind = _peak_memory(stack.device)
    if ctx.shard is not None:  # the largest rank's
        peak = int(distributed.all_reduce(torch.tensor([peak], dtype=torch.int64), "max"))
    extra = _real_step_fields(out.real, sy, learning_rate, m, step_parts is not None)
    trl_pass = eng.pass_summary()
    every_unit = units_of(batch, probe_cfg.mode, probe_cfg.block_size)  # ctx.units: this rank's share
    units = unit_rows(batch, every_unit, stack.tokenizer, [-learning_rate * r / m for r in st.row_means],
                      out.real[0].unit_terms if out.real is not None else None)
    return ProbeResult(
        deltaH1=-learning_rate * st.u_cross, U_cross=st.u_cross,
        se=learning_rate * st.se, se_jackknife=learning_rate * st.se_jackknife,
        U_cross_se=st.se, U_cross_se_jackknife=st.se_jackknife,
        se_unbiased=learning_rate * st.se_unbiased, U_cross_se_unbiased=st.se_unbiased,
        U_cross_var_unbiased=st.var_unbiased,
        bars_dot=bars_dot, diag_sum=st.diag_sum, B=m, G=batch.G, n_prompts=batch.B,
        learning_rate=learning_rate, n_params=n, n_tensors=len(stack.params),
        x_sum_norm=float(x_norms.sum().sqrt()), y_sum_norm=float(y_norms.sum().sqrt()),
        x_nonnull=x_present, y_nonnull=y_present,
        x_nonzero=int((x_norms > 0).sum()), y_nonzero=int((y_norms > 0).sum()),
        row_means=st.row_means,
        modules=_group_contributions(stack.names, per_tensor, module_name),
        layers=_group_contributions(stack.names, per_tensor, layer_name),
        mode=probe_cfg.mode, schedule=out.schedule, microbatch_size=eng.mb,
        precondition=precond.source, normalization=eng.norm,
        forwards=counts[0], backwards=counts[1], tokens=counts[2],
        seconds=seconds, peak_memory_bytes=peak, peak_memory_kind=peak_kind,
        notes=out.notes + _shard_notes(ctx) + _pass_notes(trl_pass), trl_pass=trl_pass,
        world_size=ctx.shard.world if ctx.shard else 1, units_per_rank=ctx.shard.counts if ctx.shard else [m],
        units=units, **extra,
    )


OFF_POLICY = 1e-4  # max |log r| above float rounding: the probed policy is not the one that sampled the batch


def _pass_notes(trl_pass: dict[str, Any]) -> list[str]:
    """What the Y loss models of TRL's pass, and what X then means."""
    if not trl_pass.get("per_token"):
        return []
    notes = [f"LY is TRL's per-token surrogate (ratio from {trl_pass['ratio']}, clip [1 - {trl_pass['epsilon']:g}, "
             f"1 + {trl_pass['epsilon_high']:g}], beta {trl_pass['beta']:g}): "
             f"{trl_pass.get('clipped_share', 0.0):.1%} of the loss tokens clipped"]
    if trl_pass.get("max_abs_log_ratio", 0.0) > OFF_POLICY:
        notes.append(f"the batch was sampled by an earlier policy (max |log ratio| "
                     f"{trl_pass['max_abs_log_ratio']:.3g}: a pass after the first): X, the entropy gradient, is "
                     f"estimated on samples not drawn from the probed policy (not importance-weighted), so the "
                     f"same-batch deltaH1 and deltaH carry that bias; the step and Y are TRL's")
    return notes


def _shard_notes(ctx: Context) -> list[str]:
    sh = ctx.shard
    if sh is None:
        return []
    how = ("each rank's forwards are the one-process run's, so every number equals it up to fp64 summation order"
           if sh.aligned else "too few forward boundaries to cut at: the packing, hence fp32 rounding, differs "
                              "from one process")
    return [f"{sh.world} ranks, units per rank {sh.counts}: {how}"]


def _real_step_fields(real: Any, sy: torch.Tensor, learning_rate: float, m: int, asked: bool) -> dict[str, Any]:
    """ProbeResult's real-step fields from the sink hook's (estimate, parts, Delta theta)."""
    if real is None:
        return dict(real_step_note="this schedule keeps no per-unit gradients: deltaH of the real step needs "
                                   "probe.schedule=packed, fused or one_backward") if asked else {}
    est, parts, update, exact = real
    update = update.double()
    plain = learning_rate * sy.to(update.device).double() / m  # lr P Ybar, the plain step
    norm = float(update.norm())
    rel = norm / parts.theta_norm if parts.theta_norm > 0 else math.nan
    return dict(deltaH=est.deltaH, se_deltaH=est.se_deltaH, se_deltaH_batches=est.se_deltaH_batches,
                parts=est.parts(), update_norm=norm, plain_update_norm=float(plain.norm()),
                plain_update_cosine=float(update @ plain / (update.norm() * plain.norm())),
                update_norm_unrounded=float(exact.double().norm()), rounded_away=parts.rounded_away,
                deltaH_unrounded=est.deltaH - (est.rounding.value if est.rounding is not None else 0.0),
                update_rel=rel, beyond_first_order=bool(rel > real_step.FIRST_ORDER_LIMIT))


@without_cudnn_attention()
def unit_gradients(stack, batch: Batch, probe_cfg: ProbeSection, precond: Preconditioner,
                   kinds: tuple[str, ...] = ("x", "y")) -> dict[str, torch.Tensor]:
    """Per-unit X[u] and/or Y[u] = P grad LY[u] as rows of [units, n] fp32 CPU tensors, from the probe's
    own forwards, weights and backward() reads; for callers that need more than U_cross (validate)."""
    units = units_of(batch, probe_cfg.mode, probe_cfg.block_size)
    unit_of_prompt = {p: u for u, ps in enumerate(units) for p in ps}
    eng = _Engine(stack, batch, probe_cfg, unit_of_prompt, [len(ps) for ps in units], need_y="y" in kinds)
    layout = FlatLayout(stack.params, block=1)  # unpadded: rows are [units, n_params]
    reader = GradReader(stack.params, layout)
    out = {k: torch.zeros(len(units), layout.n) for k in kinds}
    for u, ps in enumerate(units):
        chunks = plan_chunks(ps, eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            s = eng.forward(chunk)
            wx, wy = eng.weights(chunk, s)
            for i, k in enumerate(kinds):
                eng.backward((s * wx).sum() if k == "x" else eng.y_loss(chunk, s, wy), retain=i + 1 < len(kinds))
                reader.add(out[k][u])
        stack.model.zero_grad(set_to_none=True)
    pvec = layout.gather(precond.scales, torch.device("cpu")) if precond.scales is not None else None
    if "y" in out and pvec is not None:
        out["y"].mul_(pvec)
    return out

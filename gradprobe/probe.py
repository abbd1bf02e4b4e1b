"""The delta-H1 probe: per-unit gradients X[u], Y[u] = P grad LY[u] from backward() alone.

Two schedules compute the same estimator:
  literal  the seed's Plan A: an X-pass and a Y-pass for the sums, then a diagonal loop with two
           fresh forwards and backwards per unit (about 4 forwards + 4 backwards per unit);
  fused    one forward and two backwards per unit (retain_graph between them), running sums, and a
           host-side bank of per-unit gradients for the row means (1 forward + 2 backwards per unit).
Dot products are reduced per parameter tensor in fp32 and summed across tensors in fp64.
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import ustat
from .errors import GradprobeError
from .logprobs import pack, sequence_logprobs
from .losses import advantages, x_weights, y_weights
from .precondition import Preconditioner
from .rollouts import Batch

Chunk = list[tuple[int, int, int]]  # (prompt, first response, end response)


@dataclass
class ProbeResult:
    deltaH1: float
    U_cross: float
    se: float  # standard error of deltaH1 (Hoeffding, from the row means)
    se_jackknife: float  # standard error of deltaH1 (delete-one jackknife)
    U_cross_se: float
    U_cross_se_jackknife: float
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GradReader:
    """Adds the current .grad of every trainable tensor into one flat fp32 buffer."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    def add(self, out: torch.Tensor) -> int:
        present = 0
        for p, start, n in zip(self.params, self.offsets, self.sizes):
            if p.grad is not None:
                out[start:start + n].add_(p.grad.reshape(-1).to(out.device, torch.float32))
                present += 1
        return present


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

    def __init__(self, stack, batch: Batch, probe_cfg: dict[str, Any], unit_of_prompt: dict[int, int],
                 unit_sizes: list[int]):
        self.stack = stack
        self.batch = batch
        self.mb = probe_cfg["microbatch_size"]
        self.norm = probe_cfg["normalization"]
        self.unit_of_prompt = unit_of_prompt
        self.unit_sizes = unit_sizes
        self.group_sizes = [len(g.responses) for g in batch.groups]
        self.ref_s: dict[int, torch.Tensor] = {}  # S of groups split across forwards, from a no-grad pass
        self.forwards = 0
        self.backwards = 0
        self.tokens = 0
        self.y_w = [self._y_weights(p) for p in range(batch.B)]

    def _y_weights(self, p: int) -> torch.Tensor:
        g = self.batch.groups[p]
        adv = torch.tensor(g.advantages, dtype=torch.float64) if g.advantages is not None else \
            advantages(torch.tensor(g.rewards, dtype=torch.float64))
        lengths = torch.tensor([len(r) for r in g.responses])
        return y_weights(adv, lengths, self.norm) / self.unit_sizes[self.unit_of_prompt[p]]

    def forward(self, chunk: Chunk) -> torch.Tensor:
        pairs = [(self.batch.groups[p].prompt, self.batch.groups[p].responses[i])
                 for p, a, b in chunk for i in range(a, b)]
        tb = pack(pairs, self.stack.tokenizer.pad_token_id, self.stack.device)
        self.forwards += 1
        self.tokens += int(tb.attention_mask.sum())
        return sequence_logprobs(self.stack.model, tb, self.batch.temperature, self.stack.autocast())

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
        wx, wy, k = [], [], 0
        for p, a, b in chunk:
            whole = (a, b) == (0, self.group_sizes[p])
            group_s = s[k:k + b - a] if whole else self.ref_s[p]
            wx.append(x_weights(group_s)[a:b] / self.unit_sizes[self.unit_of_prompt[p]])
            wy.append(self.y_w[p][a:b])
            k += b - a
        dev = s.device
        return torch.cat(wx).to(dev, torch.float32), torch.cat(wy).to(dev, torch.float32)

    def backward(self, loss: torch.Tensor, retain: bool = False) -> None:
        self.stack.model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain)
        self.backwards += 1


def _segment_sums(v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.segment_reduce(v, "sum", lengths=lengths)


def _dot(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp32 partial dots [n_tensors]; callers sum them in fp64."""
    return _segment_sums(a * b, lengths)


def _group_contributions(names: list[str], per_tensor: torch.Tensor, key: Callable[[str], str]) -> list[dict]:
    totals: dict[str, float] = {}
    for name, value in zip(names, per_tensor.tolist()):
        totals[key(name)] = totals.get(key(name), 0.0) + value
    rows = [{"name": k, "deltaH1": v} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -abs(r["deltaH1"]))


def module_name(param_name: str) -> str:
    """'...layers.0.self_attn.q_proj.lora_A.default.weight' -> 'layers.0.self_attn.q_proj'."""
    name = param_name.replace("base_model.model.", "")
    for marker in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if marker in name:
            return name.split(marker)[0].removeprefix("model.")
    return name.rsplit(".", 1)[0].removeprefix("model.")


def layer_name(param_name: str) -> str:
    parts = param_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return "other"


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def run_probe(stack, batch: Batch, probe_cfg: dict[str, Any], precond: Preconditioner,
              learning_rate: float, progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Compute delta-H1 = -lr * U_cross with its standard errors on one batch."""
    units = units_of(batch, probe_cfg["mode"], probe_cfg["block_size"])
    unit_of_prompt = {p: u for u, ps in enumerate(units) for p in ps}
    eng = _Engine(stack, batch, probe_cfg, unit_of_prompt, [len(ps) for ps in units])
    acc = stack.device if probe_cfg["accumulate_on"] == "device" else torch.device("cpu")
    n = stack.n_params
    lengths = torch.tensor([p.numel() for p in stack.params], device=acc)
    reader = GradReader(stack.params)
    pvec = precond.flat(acc)
    m = len(units)
    if stack.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(stack.device)
    t0 = time.perf_counter()

    sx = torch.zeros(n, device=acc)
    sy = torch.zeros(n, device=acc)
    xu = torch.zeros(n, device=acc)
    yu = torch.zeros(n, device=acc)
    diag_t = torch.zeros(m, len(stack.params), dtype=torch.float64, device=acc)
    x_dot_sy = torch.zeros(m, dtype=torch.float64, device=acc)
    y_dot_sx = torch.zeros(m, dtype=torch.float64, device=acc)
    x_present: list[int] = []
    y_present: list[int] = []

    def unit_grads(u: int, fused: bool) -> None:
        """X[u] into xu and P grad LY[u] into yu."""
        xu.zero_()
        yu.zero_()
        chunks = plan_chunks(units[u], eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            s = eng.forward(chunk)
            wx, wy = eng.weights(chunk, s)
            eng.backward((s * wx).sum(), retain=fused)
            x_present.append(reader.add(xu))
            if not fused:
                s = eng.forward(chunk)
            eng.backward((s * wy).sum())
            y_present.append(reader.add(yu))
        stack.model.zero_grad(set_to_none=True)
        if pvec is not None:
            yu.mul_(pvec)

    def pass_sum(kind: str, out: torch.Tensor) -> None:
        """The literal schedule's X-pass or Y-pass: sum of per-unit gradients over packed forwards."""
        chunks = plan_chunks(list(range(batch.B)), eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            s = eng.forward(chunk)
            wx, wy = eng.weights(chunk, s)
            eng.backward((s * (wx if kind == "x" else wy)).sum())
            (x_present if kind == "x" else y_present).append(reader.add(out))
        stack.model.zero_grad(set_to_none=True)

    schedule = probe_cfg["schedule"]
    if schedule == "literal":
        pass_sum("x", sx)
        pass_sum("y", sy)
        if pvec is not None:
            sy.mul_(pvec)
        for u in range(m):
            unit_grads(u, fused=False)
            diag_t[u] = _dot(xu, yu, lengths).double()
            x_dot_sy[u] = _dot(xu, sy, lengths).double().sum()
            y_dot_sx[u] = _dot(yu, sx, lengths).double().sum()
            if progress:
                progress(u + 1, m)
    else:
        pin = acc.type == "cuda"
        xbank = torch.empty(m, n, pin_memory=pin)
        ybank = torch.empty(m, n, pin_memory=pin)
        for u in range(m):
            unit_grads(u, fused=True)
            diag_t[u] = _dot(xu, yu, lengths).double()
            sx.add_(xu)
            sy.add_(yu)
            xbank[u].copy_(xu)
            ybank[u].copy_(yu)
            if progress:
                progress(u + 1, m)
        sx_cpu, sy_cpu, lengths_cpu = sx.cpu(), sy.cpu(), lengths.cpu()
        for u in range(m):
            x_dot_sy[u] = _dot(xbank[u], sy_cpu, lengths_cpu).double().sum()
            y_dot_sx[u] = _dot(ybank[u], sx_cpu, lengths_cpu).double().sum()
        del xbank, ybank

    if stack.device.type == "cuda":
        torch.cuda.synchronize(stack.device)
    seconds = time.perf_counter() - t0
    sxsy_t = _dot(sx, sy, lengths).double()
    bars_dot = float(sxsy_t.sum()) / m ** 2
    diag = diag_t.sum(1)
    st = ustat.summarize(bars_dot, diag.cpu(), x_dot_sy.cpu(), y_dot_sx.cpu())
    per_tensor = -learning_rate * (sxsy_t - diag_t.sum(0)).cpu() / (m * (m - 1))
    x_norms = _segment_sums(sx * sx, lengths)
    y_norms = _segment_sums(sy * sy, lengths)
    peak, peak_kind = _peak_memory(stack.device)
    return ProbeResult(
        deltaH1=-learning_rate * st.u_cross, U_cross=st.u_cross,
        se=learning_rate * st.se, se_jackknife=learning_rate * st.se_jackknife,
        U_cross_se=st.se, U_cross_se_jackknife=st.se_jackknife,
        bars_dot=bars_dot, diag_sum=st.diag_sum, B=m, G=batch.G, n_prompts=batch.B,
        learning_rate=learning_rate, n_params=n, n_tensors=len(stack.params),
        x_sum_norm=float(x_norms.double().sum().sqrt()), y_sum_norm=float(y_norms.double().sum().sqrt()),
        x_nonnull=min(x_present), y_nonnull=min(y_present),
        x_nonzero=int((x_norms > 0).sum()), y_nonzero=int((y_norms > 0).sum()),
        row_means=st.row_means,
        modules=_group_contributions(stack.names, per_tensor, module_name),
        layers=_group_contributions(stack.names, per_tensor, layer_name),
        mode=probe_cfg["mode"], schedule=schedule, microbatch_size=eng.mb,
        precondition=precond.source, normalization=eng.norm,
        forwards=eng.forwards, backwards=eng.backwards, tokens=eng.tokens,
        seconds=seconds, peak_memory_bytes=peak, peak_memory_kind=peak_kind,
    )


def unit_gradients(stack, batch: Batch, probe_cfg: dict[str, Any], precond: Preconditioner,
                   kinds: tuple[str, ...] = ("x", "y")) -> dict[str, torch.Tensor]:
    """Per-unit X[u] and/or Y[u] = P grad LY[u] as rows of [units, n] fp32 CPU tensors, from the probe's
    own forwards, weights and backward() reads; for callers that need more than U_cross (validate)."""
    units = units_of(batch, probe_cfg["mode"], probe_cfg["block_size"])
    unit_of_prompt = {p: u for u, ps in enumerate(units) for p in ps}
    eng = _Engine(stack, batch, probe_cfg, unit_of_prompt, [len(ps) for ps in units])
    reader = GradReader(stack.params)
    out = {k: torch.zeros(len(units), stack.n_params) for k in kinds}
    for u, ps in enumerate(units):
        chunks = plan_chunks(ps, eng.group_sizes, eng.mb)
        eng.prepare(chunks)
        for chunk in chunks:
            s = eng.forward(chunk)
            wx, wy = eng.weights(chunk, s)
            for i, k in enumerate(kinds):
                eng.backward((s * (wx if k == "x" else wy)).sum(), retain=i + 1 < len(kinds))
                reader.add(out[k][u])
        stack.model.zero_grad(set_to_none=True)
    pvec = precond.flat(torch.device("cpu"))
    if "y" in out and pvec is not None:
        out["y"].mul_(pvec)
    return out

"""The delta-H1 probe: per-unit gradients X[u], Y[u] = P grad LY[u] from backward() alone.

Three schedules compute the same estimator:
  literal       the seed's Plan A: an X-pass and a Y-pass for the sums, then a diagonal loop with two
                fresh forwards and backwards per unit (about 4 forwards + 4 backwards per unit);
  fused         (default) one forward and two backwards per unit (retain_graph between them);
  one_backward  one forward and ONE backward per unit: the X and Y gradients of the LoRA weights are
                formed where the weight gradient is (lora_grads.py); exact in real arithmetic, but its
                bf16 rounding differs from Plan A's (bench/RESULTS.md), so it is opt-in.
In fused and one_backward, backward() adds straight into two flat fp32 buffers behind .grad (X[u] and
grad LY[u]); P, the diagonal dots and the running sums run on the device without a host round trip; the
per-unit gradients go to a host bank asynchronously, because the row means need X[u].sum_v Y[v] and
that sum is known only after the last unit (bench/RESULTS.md counts the buffers); the bank also gives the
cross matrix X[u].Y[v] behind the unbiased SE (ustat.py). Dot products take fp32 products and fp64 sums.
"""

from __future__ import annotations

import contextlib
import resource
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..attention import without_cudnn_attention
from ..environment import available_host_memory
from ..errors import GradprobeError
from ..objective import group_y_weights, pack, sequence_logprobs, x_weights
from ..optim.precondition import Preconditioner
from ..params import FlatGrads, FlatLayout, GradReader, layer_name, module_name
from ..rollouts import Batch
from . import lora_grads, ustat

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        self._packed: dict[tuple, tuple[Any, int]] = {}
        self._wy: dict[tuple, torch.Tensor] = {}

    def _y_weights(self, p: int) -> torch.Tensor:
        return group_y_weights(self.batch.groups[p], self.norm) / self.unit_sizes[self.unit_of_prompt[p]]

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


def host_bank(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two [m, n] fp32 host banks, refused up front (not by the OOM killer at unit m) when they do not fit."""
    need = 2 * m * n * 4
    avail = available_host_memory()
    if avail is not None and need > 0.9 * avail:
        raise GradprobeError(
            f"the fused schedule keeps every unit's X and Y on the host: {need / 2**30:.1f} GiB for {m} units x "
            f"{n:,} trainable values, but {avail / 2**30:.1f} GiB is available; use probe.mode=blocks with "
            f"probe.block_size=k (k times less), fewer prompts, or probe.schedule=literal (no bank, slower)")
    return torch.empty(m, n), torch.empty(m, n)


class _UnitSink:
    """Takes each unit's X[u] and raw grad LY[u] from the flat device buffers: the preconditioner, the
    diagonal dots X[u].Y[u], the running sums, and a host bank of the per-unit gradients.

    The row means need X[u].sum_v Y[v], a sum known only after the last unit, so X[u] and Y[u] wait on
    the host (2 x n fp32 per unit, never on the device); one pass at the end forms K[u, v] = X[u].Y[v],
    whose row and column sums are X[u].sum Y and Y[u].sum X.
    With sums on the device, P, the dots and the sums run there and the host only stores; with sums on
    the host (accumulate_on=cpu) the device holds nothing but the two gradient buffers. On CUDA the copy
    to the host runs on a side stream into pinned double buffers and a worker thread (with half the
    CPU threads, so the thread launching kernels keeps a core) does the host side."""

    def __init__(self, layout: FlatLayout, m: int, device: torch.device, sums_on_device: bool,
                 pvec: torch.Tensor | None):
        n = layout.n
        self.layout = layout
        self.device = device
        self.cuda = device.type == "cuda"
        self.on_device = self.cuda and sums_on_device
        where = device if self.on_device else torch.device("cpu")
        self.pvec = pvec.to(where) if pvec is not None else None  # padded
        self.bank_x, self.bank_y = host_bank(m, n)
        self.diag_t = torch.zeros(m, len(layout.sizes), dtype=torch.float64, device=where)
        self.sx = torch.zeros(n, device=where)
        self.sy = torch.zeros(n, device=where)
        self._tmp = None if self.on_device else torch.empty(n)
        self._last: torch.cuda.Event | None = None
        if self.cuda:
            threads = max(1, torch.get_num_threads() // 2)
            self._stream = torch.cuda.Stream(device)
            self._staging = [torch.empty(2, n, pin_memory=True) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._pending: list[Future | None] = [None, None]
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradprobe-bank",
                                            initializer=torch.set_num_threads, initargs=(threads,))

    def wait_free(self) -> None:
        """Before overwriting the buffers given to the last push(): wait (on the device) for their copy."""
        if self._last is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last)

    def push(self, u: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """x = X[u], y = raw grad LY[u]; y may be scaled by P in place."""
        if self.on_device:
            if self.pvec is not None:
                y.mul_(self.pvec)
            self.diag_t[u] = self.layout.dots(x, y)
            self.sx.add_(x)
            self.sy.add_(y)
        if not self.cuda:
            self._host(u, x, y)
            return
        slot = u % 2
        if self._pending[slot] is not None:
            self._pending[slot].result()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        stage = self._staging[slot]
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            stage[0].copy_(x, non_blocking=True)
            stage[1].copy_(y, non_blocking=True)
            self._copied[slot].record(self._stream)
        self._last = self._copied[slot]
        self._pending[slot] = self._pool.submit(self._drain, u, slot)

    def _drain(self, u: int, slot: int) -> None:
        self._copied[slot].synchronize()
        self._host(u, self._staging[slot][0], self._staging[slot][1])

    def _host(self, u: int, x: torch.Tensor, y: torch.Tensor) -> None:
        bx, by = self.bank_x[u], self.bank_y[u]
        bx.copy_(x)
        if self.on_device:
            by.copy_(y)
            return
        if self.pvec is not None:
            torch.mul(y, self.pvec, out=by)
        else:
            by.copy_(y)
        self.diag_t[u] = self.layout.dots(bx, by, tmp=self._tmp)
        self.sx.add_(bx)
        self.sy.add_(by)

    def finish(self) -> torch.Tensor:
        """Wait for the host work and bring the sums to the host; return K[u, v] = X[u].Y[v] (fp64, m x m)."""
        if self.cuda:
            for f in self._pending:
                if f is not None:
                    f.result()
            self._pool.shutdown()
            if self.on_device:
                stage = self._staging[0]  # pinned: a pageable copy of this size runs at a tenth of the speed
                stage[0].copy_(self.sx, non_blocking=True)
                stage[1].copy_(self.sy, non_blocking=True)
                torch.cuda.synchronize(self.device)
                self.sx, self.sy = stage[0], stage[1]
                self.diag_t = self.diag_t.cpu()
            self._staging = []
        out = self.layout.cross_dots(self.bank_x, self.bank_y)
        self.bank_x = self.bank_y = torch.empty(0)
        self._tmp = None
        return out


@without_cudnn_attention()
def run_probe(stack, batch: Batch, probe_cfg: dict[str, Any], precond: Preconditioner,
              learning_rate: float, progress: Callable[[int, int], None] | None = None,
              store: Any = None) -> ProbeResult:
    """Compute delta-H1 = -lr * U_cross with its standard errors on one batch. `store` (resume.UnitStore:
    save(u, x, raw y, x_present, y_present) after each unit, load(u) before it) makes a run resumable."""
    units = units_of(batch, probe_cfg["mode"], probe_cfg["block_size"])
    unit_of_prompt = {p: u for u, ps in enumerate(units) for p in ps}
    eng = _Engine(stack, batch, probe_cfg, unit_of_prompt, [len(ps) for ps in units])
    acc = stack.device if probe_cfg["accumulate_on"] == "device" else torch.device("cpu")
    layout = FlatLayout(stack.params)
    n = stack.n_params
    reader = GradReader(stack.params, layout)
    m = len(units)
    if stack.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(stack.device)
    t0 = time.perf_counter()
    x_present: list[int] = []
    y_present: list[int] = []

    schedule = probe_cfg["schedule"]
    if store is not None and schedule == "literal":
        raise GradprobeError("the literal schedule sums every unit before its per-unit loop, so it cannot resume; "
                             "use probe.schedule=fused (the default) with --state")
    cross = None  # K[u, v] = X[u].Y[v]: only the schedules that bank every unit's gradients have it
    if schedule == "literal":
        pvec = layout.gather(precond.scales, acc) if precond.scales is not None else None
        sx, sy, xu, yu = (torch.zeros(layout.n, device=acc) for _ in range(4))
        diag_t = torch.zeros(m, len(stack.params), dtype=torch.float64, device=acc)
        x_dot_sy = torch.zeros(m, dtype=torch.float64, device=acc)
        y_dot_sx = torch.zeros(m, dtype=torch.float64, device=acc)

        def pass_sum(kind: str, out: torch.Tensor) -> None:
            """The X-pass or the Y-pass: sum of per-unit gradients over packed forwards."""
            chunks = plan_chunks(list(range(batch.B)), eng.group_sizes, eng.mb)
            eng.prepare(chunks)
            for chunk in chunks:
                s = eng.forward(chunk)
                wx, wy = eng.weights(chunk, s)
                eng.backward((s * (wx if kind == "x" else wy)).sum())
                (x_present if kind == "x" else y_present).append(reader.add(out))
            stack.model.zero_grad(set_to_none=True)

        pass_sum("x", sx)
        pass_sum("y", sy)
        if pvec is not None:
            sy.mul_(pvec)
        for u in range(m):  # the diagonal loop: two fresh forwards and backwards per unit
            xu.zero_()
            yu.zero_()
            chunks = plan_chunks(units[u], eng.group_sizes, eng.mb)
            eng.prepare(chunks)
            for chunk in chunks:
                for kind, out in (("x", xu), ("y", yu)):
                    s = eng.forward(chunk)
                    w = eng.weights(chunk, s)[kind == "y"]
                    eng.backward((s * w).sum())
                    (x_present if kind == "x" else y_present).append(reader.add(out))
            stack.model.zero_grad(set_to_none=True)
            if pvec is not None:
                yu.mul_(pvec)
            diag_t[u] = layout.dots(xu, yu)
            x_dot_sy[u] = layout.dots(xu, sy).sum()
            y_dot_sx[u] = layout.dots(yu, sx).sum()
            if progress:
                progress(u + 1, m)
        del xu, yu
    else:
        pvec_host = layout.gather(precond.scales, torch.device("cpu")) if precond.scales is not None else None
        sink = _UnitSink(layout, m, stack.device, acc.type == "cuda", pvec_host)
        fx = torch.zeros(layout.n, device=stack.device)
        fy = torch.zeros(layout.n, device=stack.device)
        one = schedule == "one_backward"
        with (lora_grads.patch(stack.model, stack.params, layout.views(fx), layout.views(fy)) if one
              else contextlib.nullcontext()) as streams:
            if one and streams is None:
                schedule = "fused"  # a trainable tensor that is not a LoRA linear weight: two backwards
            grads = FlatGrads(stack.params, layout) if streams is None and FlatGrads.usable(stack.params) else None
            try:
                for u in range(m):  # one forward and two backwards per unit (one backward with streams)
                    saved = store.load(u) if store is not None else None
                    if saved is not None:  # a resumed run: this unit's saved fp32 bits, summed in the same order
                        sink.wait_free()
                        fx.copy_(saved["x"])
                        fy.copy_(saved["y"])
                        x_present.append(saved["x_present"])
                        y_present.append(saved["y_present"])
                        sink.push(u, fx, fy)
                        if progress:
                            progress(u + 1, m)
                        continue
                    nx, ny = len(x_present), len(y_present)
                    chunks = plan_chunks(units[u], eng.group_sizes, eng.mb)
                    eng.prepare(chunks)
                    for k, chunk in enumerate(chunks):
                        s = eng.forward(chunk)
                        wx, wy = eng.weights(chunk, s)
                        if k == 0:
                            sink.wait_free()
                            fx.zero_()
                            fy.zero_()
                        if streams is not None:
                            streams.wx, streams.wy = wx, wy
                            eng.backward(s.sum(), zero=False)
                            x_present.append(streams.take())
                            y_present.append(x_present[-1])
                            continue
                        for buf, w, retain, present in ((fx, wx, True, x_present), (fy, wy, False, y_present)):
                            if grads is not None:
                                grads.point(buf)
                                eng.backward((s * w).sum(), retain=retain, zero=False)
                                present.append(grads.take())
                            else:
                                eng.backward((s * w).sum(), retain=retain)
                                present.append(reader.add(buf))
                    if store is not None:  # before push(), which may scale fy by P in place
                        store.save(u, fx, fy, min(x_present[nx:]), min(y_present[ny:]))
                    sink.push(u, fx, fy)
                    if progress:
                        progress(u + 1, m)
            finally:
                if grads is not None:
                    grads.close()
                stack.model.zero_grad(set_to_none=True)
        del fx, fy
        cross = sink.finish()
        x_dot_sy, y_dot_sx = cross.sum(1), cross.sum(0)
        diag_t, sx, sy = sink.diag_t, sink.sx, sink.sy

    if stack.device.type == "cuda":
        torch.cuda.synchronize(stack.device)
    seconds = time.perf_counter() - t0
    sxsy_t = layout.dots(sx, sy)
    bars_dot = float(sxsy_t.sum()) / m ** 2
    diag = diag_t.sum(1)
    st = ustat.summarize(bars_dot, diag.cpu(), x_dot_sy.cpu(), y_dot_sx.cpu(), cross=cross)
    per_tensor = -learning_rate * (sxsy_t - diag_t.sum(0).to(sxsy_t.device)).cpu() / (m * (m - 1))
    x_norms = layout.dots(sx, sx)
    y_norms = layout.dots(sy, sy)
    peak, peak_kind = _peak_memory(stack.device)
    return ProbeResult(
        deltaH1=-learning_rate * st.u_cross, U_cross=st.u_cross,
        se=learning_rate * st.se, se_jackknife=learning_rate * st.se_jackknife,
        U_cross_se=st.se, U_cross_se_jackknife=st.se_jackknife,
        se_unbiased=learning_rate * st.se_unbiased, U_cross_se_unbiased=st.se_unbiased,
        U_cross_var_unbiased=st.var_unbiased,
        bars_dot=bars_dot, diag_sum=st.diag_sum, B=m, G=batch.G, n_prompts=batch.B,
        learning_rate=learning_rate, n_params=n, n_tensors=len(stack.params),
        x_sum_norm=float(x_norms.sum().sqrt()), y_sum_norm=float(y_norms.sum().sqrt()),
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


@without_cudnn_attention()
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

"""Sampling-time log-probabilities (a trainer's old log-probs) against the ones the loss recomputes.

A gap between the two means the importance ratio and the KL term are off before any gradient is taken.
The classes: the two were taken at different temperatures (each side is fitted with the captured
logits), the sampler renormalised over a top-p or top-k filter's kept mass (old = new − log kept mass
per token), the padding was handled differently (the gap sits on the padded rows only), or the token
ranges differ (truncation: the old log-probs cover another number of tokens than the loss; shifted:
the same count, one token earlier or later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError

TOL = 0.005  # nats per token: the same computation in another batch composition or kernel stays below this


@dataclass
class LogprobGap:
    kind: str  # "match", "temperature", "top_p", "top_k", "shifted", "padding", "truncation", "unclassified",
    # "not_compared"
    rows: int
    mean_gap: float = 0.0  # mean |old - S| per sequence (nats)
    max_gap: float = 0.0
    per_token: float | None = None  # mean |old - S| per token, when token counts are known
    evidence: dict[str, Any] = field(default_factory=dict)


def _as_rows(old: Any) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Per-sequence sums, and the per-token values of each row when old log-probs come per token."""
    if isinstance(old, torch.Tensor) and old.dim() == 1:
        return old.detach().double().cpu(), None
    if isinstance(old, torch.Tensor) and old.dim() == 2:
        raise GradprobeError("old_logprobs as a 2-D tensor is ambiguous about padding: give one list of per-token "
                             "log-probs per sequence (padding removed), or per-sequence sums")
    try:
        rows = list(old)
    except TypeError:
        raise GradprobeError(f"old_logprobs must be per-sequence sums or per-token lists, not {type(old).__name__}")\
            from None
    if rows and all(isinstance(r, (int, float)) for r in rows):
        return torch.tensor(rows, dtype=torch.float64), None
    seqs = [torch.as_tensor(r, dtype=torch.float64).reshape(-1).cpu() for r in rows]
    return torch.stack([s.sum() for s in seqs]) if seqs else torch.zeros(0), seqs


def _sums_at(tau: float, z: torch.Tensor, target: torch.Tensor, sel: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row sums of log softmax(z / tau)[target] over the selected positions."""
    lp = torch.log_softmax(z / tau, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(n, dtype=torch.float64).index_add_(0, sel, lp.double().cpu())


def _fit_tau(z, target, sel, n, goal: torch.Tensor) -> tuple[float, float]:
    """The temperature whose log-probs best reproduce `goal` (per-row sums), and the mean residual there."""
    def err(tau: float) -> float:
        return float((_sums_at(tau, z, target, sel, n) - goal).abs().mean())

    grid = [float(x) for x in torch.logspace(-0.7, 0.7, 29)] + [1.0]
    best = min(grid, key=err)
    for _ in range(2):  # refine around the best point
        fine = [best * float(x) for x in torch.logspace(-0.06, 0.06, 13)]
        best = min(fine + [best], key=err)
    return best, err(best)


def _positions(captured: dict[str, torch.Tensor], tokens: list[int], shift: int = 0):
    """(logits rows at the response positions, their target ids, row index) for responses ending at the last
    real token of each row (moved by `shift` tokens); None when the capture does not cover them."""
    ids, z = captured.get("input_ids"), captured.get("logits")
    if ids is None or z is None or z.dim() != 3 or ids.shape[0] != len(tokens):
        return None
    mask = captured.get("attention_mask")
    n, width = ids.shape
    offset = width - z.shape[1]  # logits cover the last z.shape[1] columns
    rows, cols, targets = [], [], []
    for i, count in enumerate(tokens):
        real = torch.nonzero(mask[i]).flatten() if mask is not None else torch.arange(width)
        if count == 0:
            continue
        end = int(real[-1]) if real.numel() else width - 1
        for c in range(end - count + 1 + shift, end + 1 + shift):
            if c - 1 - offset < 0 or c > end:
                return None
            rows.append(i)
            cols.append(c - 1 - offset)
            targets.append(int(ids[i, c]))
    r = torch.tensor(rows, dtype=torch.long)
    zsel = z[r.to(z.device), torch.tensor(cols, dtype=torch.long, device=z.device)]
    return zsel, torch.tensor(targets, device=z.device), r


TOP_P = [round(0.5 + 0.01 * k, 2) for k in range(50)]  # 0.50 .. 0.99


def _kept_mass(z: torch.Tensor, tau: float, vocab_limit: int = 256) -> tuple[torch.Tensor, list[tuple[str, float]]]:
    """Per position, the probability mass a top-p (nucleus: the smallest prefix of the sorted distribution whose
    mass reaches p) or top-k filter keeps, for each candidate: [positions, candidates] and the candidates' labels."""
    probs = torch.softmax(z.double() / tau, dim=-1).sort(dim=-1, descending=True).values
    cum = probs.cumsum(-1)
    cols, labels = [], []
    for p in TOP_P:
        idx = torch.searchsorted(cum, torch.full((cum.shape[0], 1), p, dtype=cum.dtype)).clamp(max=cum.shape[1] - 1)
        cols.append(cum.gather(-1, idx).squeeze(-1))
        labels.append(("top_p", p))
    ks = min(cum.shape[1], vocab_limit) - 1
    # top-k keeps every token as likely as the k-th (ties included, as a `logits < kth` filter does)
    desc = -probs
    kept = torch.searchsorted(desc.contiguous(), desc[:, :ks].contiguous(), right=True)
    mass_k = cum.gather(-1, kept - 1)
    cols.extend(mass_k.unbind(-1))
    labels.extend(("top_k", float(k)) for k in range(1, ks + 1))
    return torch.stack(cols, dim=1), labels


def _sampler_fits(z, target, sel, n, tau: float, s_sums: torch.Tensor, old_s: torch.Tensor, captured, tokens,
                  old_tokens: list[torch.Tensor] | None):
    """The other ways a sampler's log-probs differ from the loss's on the same logits, each with its best-fitting
    setting and residual (mean |fit - old| per sequence): top-p or top-k renormalisation over the kept mass
    (old = loss + log(1 / kept mass) per token), and a response range shifted by one token."""
    out: dict[str, tuple[Any, float]] = {}
    mass, labels = _kept_mass(z, tau)
    offsets = torch.zeros(n, mass.shape[1], dtype=torch.float64).index_add_(0, sel.cpu(), -mass.log().cpu())
    err = ((s_sums[:, None] + offsets) - old_s[:, None]).abs().mean(0)
    for kind in ("top_p", "top_k"):
        cand = [i for i, lab in enumerate(labels) if lab[0] == kind]
        if cand:
            best = min(float(err[i]) for i in cand)
            ties = [labels[i][1] for i in cand if float(err[i]) <= best * (1 + 1e-6) + 1e-9]
            out[kind] = ((min(ties), max(ties)), best)  # the settings that keep the same sets fit equally
    new_tokens = None
    if old_tokens is not None:  # per-token old log-probs: compare the overlap of the two ranges token by token
        lp = torch.log_softmax(z.double() / tau, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()
        new_tokens = list(lp.split(torch.bincount(sel.cpu(), minlength=n).tolist()))
    for shift in (-1, 1):
        if new_tokens is not None:
            res = [float((o[1:] - t[:-1]).abs().sum() if shift < 0 else (o[:-1] - t[1:]).abs().sum())
                   for o, t in zip(old_tokens, new_tokens) if o.numel() == t.numel() and o.numel() > 1]
            if res:
                out[f"shifted_{'earlier' if shift < 0 else 'later'}"] = (float(shift), sum(res) / len(res))
                continue
        pos = _positions(captured, tokens, shift)
        if pos is not None:
            out[f"shifted_{'earlier' if shift < 0 else 'later'}"] = (
                float(shift), float((_sums_at(tau, pos[0], pos[1], pos[2], n) - old_s).abs().mean()))
    return out


def _padded_rows(captured: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
    """Which rows carry padding: from the attention mask the forward got, else (a loss that passes no mask)
    from a run of one repeated token at the start of rows, the left padding's signature."""
    mask = captured.get("attention_mask")
    if mask is not None and mask.shape[0] == n:
        return (mask == 0).any(-1).cpu()
    ids = captured.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 2:
        return None
    ids = ids.cpu()
    runs = ids[:, 0] == ids[:, 1]
    if not runs.any():
        return None
    pad = int(torch.mode(ids[runs, 0]).values)
    return (ids[:, 0] == pad) & runs


def compare(old: Any, captured: dict[str, torch.Tensor], lengths: list[int] | None) -> LogprobGap:
    s = captured.get("S")
    if s is None or s.dim() != 1:
        return LogprobGap("not_compared", 0, evidence={"note": "the loss returned no per-sequence S to compare with"})
    old_s, old_tokens = _as_rows(old)
    counts = [t.numel() for t in old_tokens] if old_tokens is not None else None
    n = s.numel()
    if old_s.numel() != n:
        raise GradprobeError(f"old_logprobs has {old_s.numel()} sequences but the loss's S has {n}")
    gap = (old_s - s.double().cpu())
    tokens = counts if counts is not None else lengths
    per_tok = None
    if tokens is not None:
        per_tok = float((gap.abs() / torch.tensor(tokens, dtype=torch.float64).clamp(min=1)).mean())
    out = LogprobGap("match", n, float(gap.abs().mean()), float(gap.abs().max()), per_tok)
    out.evidence = {"rows": n, "mean_gap": round(out.mean_gap, 4), "max_gap": round(out.max_gap, 4)}
    if per_tok is not None:
        out.evidence["mean_gap_per_token"] = round(per_tok, 4)
    if (per_tok if per_tok is not None else out.mean_gap) <= TOL:
        return out
    if counts is not None and lengths is not None and counts != lengths:
        bad = [i for i, (a, b) in enumerate(zip(counts, lengths)) if a != b]
        out.kind = "truncation"
        out.evidence.update(rows_with_other_token_count=len(bad),
                            examples=[f"row {i}: {counts[i]} old vs {lengths[i]} in the loss" for i in bad[:4]])
        return out
    padded = _padded_rows(captured, n)
    if padded is not None:
        scale = torch.tensor(tokens, dtype=torch.float64).clamp(min=1) if tokens is not None else 1.0
        per_row = (gap.abs() / scale)
        if padded.any() and (~padded).any() and float(per_row[~padded].max()) <= TOL \
                and float(per_row[padded].mean()) > TOL:
            out.kind = "padding"
            out.evidence.update(padded_rows=int(padded.sum()), gap_on_padded_rows=round(float(per_row[padded].mean()),
                                                                                         4),
                                gap_on_unpadded_rows=round(float(per_row[~padded].max()), 4))
            return out
    pos = _positions(captured, tokens) if tokens is not None else None
    if pos is not None:
        z, target, sel = pos
        tau_old, res_old = _fit_tau(z, target, sel, n, old_s)
        tau_s, res_s = _fit_tau(z, target, sel, n, s.double().cpu())
        out.evidence.update(old_fits_temperature=round(tau_old, 3), loss_fits_temperature=round(tau_s, 3))
        fits = {}
        if abs(tau_old / tau_s - 1) > 0.02:
            fits["temperature"] = (tau_old, res_old)
        if res_s < 0.2 * out.mean_gap:  # the captured logits reproduce the loss's S: compare the sampler's ways
            fits.update(_sampler_fits(z, target, sel, n, tau_s, _sums_at(tau_s, z, target, sel, n), old_s, captured,
                                      tokens, old_tokens))
            good = {k: v for k, v in fits.items() if v[1] < 0.2 * out.mean_gap}
            if good:
                kind = min(good, key=lambda k: good[k][1])
                out.evidence["fit_residual"] = round(good[kind][1], 4)
                if kind in ("top_p", "top_k"):
                    lo, hi = good[kind][0]
                    cast = float if kind == "top_p" else int
                    out.evidence[f"old_fits_{kind}"] = [cast(lo), cast(hi)]
                    out.kind = kind
                elif kind.startswith("shifted"):
                    out.evidence["old_fits_shift"] = int(good[kind][0])
                    out.evidence["shift_direction"] = "earlier" if good[kind][0] < 0 else "later"
                    out.kind = "shifted"
                else:
                    out.kind = "temperature"
                return out
    out.kind = "unclassified"
    return out

"""Sampling-time log-probabilities (a trainer's old log-probs) against the ones the loss recomputes.

A gap between the two means the importance ratio and the KL term are off before any gradient is taken.
The classes: the two were taken at different temperatures (each side is fitted with the captured
logits), the padding was handled differently (the gap sits on the padded rows only), or the token
ranges differ (truncation: the old log-probs cover another number of tokens than the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError

TOL = 0.005  # nats per token: the same computation in another batch composition or kernel stays below this


@dataclass
class LogprobGap:
    kind: str  # "match", "temperature", "padding", "truncation", "unclassified", "not_compared"
    rows: int
    mean_gap: float = 0.0  # mean |old - S| per sequence (nats)
    max_gap: float = 0.0
    per_token: float | None = None  # mean |old - S| per token, when token counts are known
    evidence: dict[str, Any] = field(default_factory=dict)


def _as_rows(old: Any) -> tuple[torch.Tensor, list[int] | None]:
    """Per-sequence sums, and per-row token counts when old log-probs come per token."""
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
    return torch.stack([s.sum() for s in seqs]) if seqs else torch.zeros(0), [s.numel() for s in seqs]


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


def _positions(captured: dict[str, torch.Tensor], tokens: list[int]):
    """(logits rows at the response positions, their target ids, row index) for responses ending at the last
    real token of each row; None when the capture does not cover them."""
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
        for c in range(end - count + 1, end + 1):
            if c - 1 - offset < 0:
                return None
            rows.append(i)
            cols.append(c - 1 - offset)
            targets.append(int(ids[i, c]))
    r = torch.tensor(rows, dtype=torch.long)
    zsel = z[r.to(z.device), torch.tensor(cols, dtype=torch.long, device=z.device)]
    return zsel, torch.tensor(targets, device=z.device), r


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
    old_s, counts = _as_rows(old)
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
        if abs(tau_old / tau_s - 1) > 0.02 and res_old < 0.2 * out.mean_gap and res_s < 0.2 * out.mean_gap:
            out.kind = "temperature"
            return out
    out.kind = "unclassified"
    return out

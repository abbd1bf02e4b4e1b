"""Resumable probes: each finished unit's X[u] and grad LY[u] kept in a state directory, so that a run cut
short (a batch scheduler's SIGTERM) continues where it stopped and ends with the numbers of a run that
never stopped: the restored vectors are the saved fp32 bits, added in the same order.

A state directory holds meta.json (the configuration and a fingerprint of the inputs), rollouts.jsonl (the
batch, so a resumed run need not sample again) and unit-NNNNN.pt per finished unit (2 x trainable values x
4 bytes each). partial.json is what the interrupted run reported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import GradprobeError
from .files import load_torch_file, write_atomic

if TYPE_CHECKING:
    from .config import Config

META = "meta.json"
ROLLOUTS = "rollouts.jsonl"


def fingerprint(cfg: Config, batch, params: list[torch.Tensor], scales: list[torch.Tensor] | None) -> str:
    """sha256 of what the numbers depend on: the configuration, the batch, the trainable values and P."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for g in batch.groups:
        h.update(json.dumps([g.prompt, g.responses, g.rewards, g.advantages, g.lengths]).encode())
    h.update(repr(batch.temperature).encode())
    for p in [*params, *(scales or [])]:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class UnitStore:
    """The engine's per-unit callback: save(u, ...) after unit u, load(u) before it (None: compute it)."""

    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def _path(self, u: int) -> Path:
        return self.dir / f"unit-{u:05d}.pt"

    def save(self, u: int, x: torch.Tensor, y: torch.Tensor, x_present: int, y_present: int) -> None:
        obj = {"fingerprint": self.fingerprint, "unit": u, "x": x.detach().cpu().clone(),
               "y": y.detach().cpu().clone(), "x_present": x_present, "y_present": y_present}
        write_atomic(self._path(u), lambda f: torch.save(obj, f), f"unit {u}'s state")

    def load(self, u: int) -> dict[str, Any] | None:
        p = self._path(u)
        if not p.is_file():
            return None
        obj = load_torch_file(p, f"unit {u}'s state (delete it to recompute the unit)")
        if not isinstance(obj, dict) or obj.get("fingerprint") != self.fingerprint or obj.get("unit") != u:
            raise GradprobeError(f"{p} belongs to another run (its inputs differ); use a fresh --state directory")
        return obj

    def done(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("unit-*.pt"))


def prepare_state_dir(directory: str | Path, cfg: Config) -> Path:
    """A new or empty state directory (checked before the model loads); refuses one holding another run."""
    if cfg.probe.schedule == "literal":
        raise GradprobeError("--state needs probe.schedule=packed, fused or one_backward: the literal schedule "
                             "sums every unit before its per-unit loop, so it cannot resume")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise GradprobeError(f"--state {d} is a file; give a directory")
    if d.is_dir() and any(d.iterdir()):
        raise GradprobeError(f"--state {d} is not empty; continue that run with --resume {d}, or give a new directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradprobeError(f"cannot create --state directory {d}: {exc.strerror}") from exc
    write_atomic(d / META, json.dumps({"config": cfg.to_dict()}, indent=2, default=str) + "\n", "the run's state")
    return d


def read_resume(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """--resume DIR or --resume PARTIAL.json (which names its state directory): (state dir, config)."""
    p = Path(path)
    if p.is_file():
        try:
            partial = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GradprobeError(f"--resume {p}: not a partial result (not JSON)") from exc
        if not isinstance(partial, dict) or partial.get("complete") is not False:
            raise GradprobeError(f"--resume {p}: not a partial result (no \"complete\": false); nothing to resume")
        state = (partial.get("resume") or {}).get("state_dir")
        if not state:
            raise GradprobeError(f"--resume {p}: that run kept no unit state (it ran without --state DIR); "
                                 f"run it again with --state DIR to make it resumable")
        p = Path(state)
    if not (p / META).is_file():
        raise GradprobeError(f"--resume {p}: not a state directory (no {META})")
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GradprobeError(f"--resume {p}: {META} is not valid JSON") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise GradprobeError(f"--resume {p}: {META} holds no configuration")
    return p, meta["config"]

"""Every file gradprobe writes goes through here: checked before the work, written atomically.

A result that took an hour must not be lost to a typo in its path, and a run killed mid-write must not
leave half a file where the previous good one was: write a temporary file in the same directory, fsync
it, rename it over the target (atomic on POSIX), then fsync the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import GradprobeError


def jsonl_objects(text: str, source: str, hint: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", object) for each non-blank line of a JSONL text; a line that is not a JSON object is a
    one-line error naming it (`hint` says what the file should have been)."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GradprobeError(f"{where}: not valid JSON ({exc.msg}){hint}") from exc
        if not isinstance(obj, dict):
            raise GradprobeError(f"{where}: each line must be a JSON object")
        yield where, obj


def read_text_file(path: str | Path, what: str) -> str:
    """A text input's contents, or one line naming the file: missing, a directory, unreadable, not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise GradprobeError(f"{what} {p} is a directory; give a file")
    if not p.exists():
        raise GradprobeError(f"{what} not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GradprobeError(f"{what} {p}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                             f"a binary or compressed file?") from None
    except OSError as exc:
        raise GradprobeError(f"cannot read {what} {p}: {exc.strerror or type(exc).__name__}") from None


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_outputs(outputs: dict[str, str | Path | None], inputs: Iterable[str | Path | None] = ()) -> None:
    """Before any heavy work: every output's directory exists and is writable, no output is a directory
    or an input (symlinks resolved), and no two outputs are one file. `outputs` maps an option name to
    its path ('-' and None are skipped)."""
    ins = {_resolved(p): str(p) for p in inputs if p is not None and str(p) not in ("", "-")}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None or str(path) == "-":
            continue
        if str(path) == "":
            raise GradprobeError(f"{option}: empty path")
        target = _resolved(path)
        if target in ins:
            raise GradprobeError(f"{option} {path} is the input {ins[target]}: writing it would destroy the input")
        if target in seen:
            raise GradprobeError(f"{option} {path} is also the {seen[target]} path")
        seen[target] = option
        if target.is_dir():
            raise GradprobeError(f"{option} {path} is a directory; give a file path")
        parent = target.parent
        if not parent.is_dir():
            raise GradprobeError(f"{option} {path}: the directory {parent} does not exist")
        _try_writing(option, path, parent)
        if target.exists() and not os.access(target, os.W_OK):
            raise GradprobeError(f"{option} {path}: the file exists and is not writable")


def _try_writing(option: str, path: str | Path, parent: Path) -> None:
    """Create and remove a file in `parent`, as write_atomic will: permission bits say nothing to root, nor
    about /proc, a read-only mount or a full quota."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gradprobe-check-", dir=parent)
    except OSError as exc:
        raise GradprobeError(f"{option} {path}: cannot write in the directory {parent} "
                             f"({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def write_atomic(path: str | Path, data: str | bytes | Callable[[BinaryIO], None], what: str = "output") -> None:
    """Write text, bytes, or whatever `data(file)` writes, to a temporary file beside `path`, fsync it and
    rename it over `path`: readers see the old file or the new one, never a part. An existing file's
    permission bits are kept."""
    target = _resolved(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise GradprobeError(f"cannot write {what} to {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise GradprobeError(f"cannot write {what} to {path}: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the directory is synced
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_torch_file(path: str | Path, what: str, mmap: bool = False, allow: dict[str, type] | None = None) -> object:
    """torch.load(weights_only=True) with one plain line for any failure: torch's own message advises
    weights_only=False (running the file's code), which is never what a user should do with a file that
    failed here, and its warnings would break the one-line contract. `allow` maps the fully qualified
    names of globals the file may hold to the classes that stand in for them (no other global loads)."""
    import pickle
    import warnings

    import torch

    p = Path(path)
    allowed: contextlib.AbstractContextManager = contextlib.nullcontext()
    if allow:
        try:  # stand-ins under the names they replace: (class, name) pairs, which older torch lacks
            allowed = torch.serialization.safe_globals([(cls, name) for name, cls in allow.items()])
        except (AttributeError, TypeError, ValueError):
            raise GradprobeError(f"cannot read {what} {p}: loading it safely needs a newer torch (safe_globals with "
                                 f"(class, name) pairs)") from None
    try:
        with warnings.catch_warnings(), allowed:
            warnings.simplefilter("ignore")
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception:
                if not mmap:
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if "Unsupported global" in str(exc):
            why = "it holds objects other than tensors and plain containers" + (
                f" ({found.group(1)}, not loaded)" if found else "")
        else:  # torch's legacy path would unpickle it: refused before that, nothing in it ran
            raise GradprobeError(f"cannot read {what} {p}: not a torch.save file but a plain pickle or another "
                                 f"format, refused without unpickling it (a pickle can run code)") from None
        raise _load_error(p, what, why) from None
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        text = str(exc).strip()
        if "central directory" in text or "zip archive" in text or isinstance(exc, EOFError):
            why = "truncated or damaged (not a complete torch.save archive)"
        else:
            why = f"not a torch.save file ({type(exc).__name__}: {text.splitlines()[0][:120] if text else ''})"
        raise _load_error(p, what, why) from None


def _load_error(p: Path, what: str, why: str) -> GradprobeError:
    return GradprobeError(f"cannot read {what} {p}: {why}; it is loaded with weights_only=True, which runs no code")

"""Writing files that other processes may read while they are written.

Every file rmr_lightning writes goes to a temporary file in the same folder and is renamed into place,
so a reader (another rank, a parallel study run, a resumed study, a job killed mid-write) sees the old
file or the whole new one, never half of it; the temporary file is removed if writing fails.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

#: Leading characters a spreadsheet reads as a formula (CSV injection; OWASP "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` on a temporary file beside ``path``, renamed onto ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; caches, results and artifacts may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = False) -> None:
    """``write(f)`` into a temporary file that replaces ``path`` once complete."""
    with atomic_open(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename."""
    atomic_write(path, lambda f: torch.save(payload, f), binary=True)


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """A matplotlib figure saved atomically (the format from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs), binary=True)


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula: a leading ``= + - @`` gets a ``'`` before it.
    Numbers are left alone (a negative number is data, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def atomic_write_csv(path: str | Path, frame: Any, **kwargs: Any) -> None:
    """A pandas DataFrame as CSV, atomically, with text cells made spreadsheet-safe."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object:
            safe[column] = safe[column].map(spreadsheet_safe)
    safe.columns = [spreadsheet_safe(str(c)) for c in safe.columns]
    atomic_write(path, lambda f: safe.to_csv(f, index=False, **kwargs))

"""Reading Lightning checkpoints as untrusted files, and finding the one ``--ckpt_path`` means.

Checkpoints travel between machines and labs, and a job killed while saving leaves one cut short. So
every read here is ``torch.load(weights_only=True)`` (tensors and plain values; a pickled object is
refused, never run), an unreadable file is an error that names it, and ``--ckpt_path last`` resumes
from the newest checkpoint that reads whole, saying so when it had to pass over a damaged one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

SYMBOLIC = ("last", "best", "hpc", "registry")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or that ``--ckpt_path`` cannot find; names the file."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded without running code; a cut-short or foreign file names itself."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, or a pickled object weights_only refuses
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it may be "
            "cut short (a job killed while saving) or hold objects other than tensors and plain values, which "
            "rmr never unpickles. Delete it, or pass another --ckpt_path"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def checkpoint_dirs(callbacks: list[Any] | None) -> list[Path]:
    """The ``dirpath`` folders of a config's ModelCheckpoint callbacks (as parsed, before instantiation)."""
    dirs = []
    for cb in callbacks or []:
        dirpath = getattr(getattr(cb, "init_args", None), "dirpath", None)
        if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            dirs.append(Path(dirpath))
    return dirs


def _newest_first(dirs: list[Path], pattern: str) -> list[Path]:
    found = [p for d in dirs for p in d.glob(pattern) if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)


def newest_intact(dirs: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``last*.ckpt`` that reads whole, else the newest other checkpoint that does; a damaged
    newer file is passed over with a warning naming it. None when the folders hold no checkpoint."""
    candidates = _newest_first(dirs, "last*.ckpt") + [
        p for p in _newest_first(dirs, "*.ckpt") if not p.name.startswith("last")
    ]
    damaged = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            rank_zero_warn(
                f"passing over damaged checkpoints ({'; '.join(damaged)}); resuming from {path}, the newest intact one"
            )
        return path, checkpoint
    if damaged:
        raise CheckpointError(
            f"--ckpt_path last: no intact checkpoint in {[str(d) for d in dirs]}: {'; '.join(damaged)}"
        )
    return None


def resolve(ckpt_path: str, callbacks: list[Any] | None) -> tuple[Path, dict[str, Any]] | None:
    """The file ``--ckpt_path`` names and its content (``last``: the newest intact one in the config's
    checkpoint folders); None for ``last`` with no checkpoint yet and for Lightning's other symbols."""
    if ckpt_path == "last":
        return newest_intact(checkpoint_dirs(callbacks))
    if ckpt_path in SYMBOLIC:
        return None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file")
    return Path(ckpt_path), read_checkpoint(ckpt_path)


def best_checkpoint(callbacks: list[Any] | None) -> Path:
    """``--ckpt_path best`` in a process that did not fit: Lightning knows the best checkpoint only in the
    fitting process, so read it from the ModelCheckpoint state saved in the folder's last checkpoint."""
    dirs = checkpoint_dirs(callbacks)
    found = newest_intact(dirs)
    if found is None:
        raise CheckpointError(
            f"--ckpt_path best: no checkpoint in the checkpoint folders "
            f"{[str(d) for d in dirs] or '(none configured)'} "
            "to read the best checkpoint from; fit first (with save_last), or pass the checkpoint file"
        )
    last, checkpoint = found
    states = checkpoint.get("callbacks", {})
    best = [
        v.get("best_model_path")
        for k, v in states.items()
        if str(k).startswith("ModelCheckpoint") and isinstance(v, dict)
    ]
    best = [Path(b) for b in best if b and Path(b).is_file()]
    if not best:
        raise CheckpointError(
            f"--ckpt_path best: {last} records no best checkpoint that still exists; pass the checkpoint file"
        )
    return best[0]

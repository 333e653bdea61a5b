"""Typed argument groups: one dataclass per group of related arguments (as nanoGPT's ``GPTConfig``), given
in YAML as a mapping, on the command line as dotted names, from Python as the dataclass or a dict; kept in
``hparams`` and checkpoints (read with ``weights_only=True``) as plain dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, fields, is_dataclass
from typing import Any, TypeVar

Config = TypeVar("Config")


def as_config(kind: type[Config], value: Config | dict[str, Any] | None, default: Config | None = None) -> Config:
    """A typed config from itself, a plain dict of the fields that differ from ``default`` (YAML, Python,
    checkpoint hyperparameters) or None (``default``, else the dataclass's defaults)."""
    base = default if default is not None else kind()
    if value is None:
        return base
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in fields(kind)}
        if unknown:
            raise TypeError(f"{kind.__name__} has no field(s) {sorted(unknown)}")
        return dataclasses.replace(base, **value)
    raise TypeError(f"expected {kind.__name__} or a dict, got {type(value).__name__}")


def plain(value: Any) -> Any:
    """A dataclass config as a dict (what hyperparameters and checkpoints hold); anything else as is."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value

"""Typed groups of datamodule arguments, shared by the datamodules.

A datamodule takes each group as one argument (``loader``, ``split``, ...): in YAML a mapping
(``loader: {batch_size: 8}``), on the command line a dotted name (``--data.init_args.loader.batch_size=8``),
from Python the dataclass, a dict of the fields to change or None (the datamodule's defaults). ``hparams``
(and so checkpoints, which are read with ``weights_only=True``) hold each group as a plain dict
(``plain``); the datamodule keeps the typed group as an attribute of the same name (``dm.loader.batch_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
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


def flat_settings(hparams: Mapping[str, Any], groups: Sequence[str]) -> dict[str, Any]:
    """Hyperparameters with the fields of each group in ``groups`` at the top level, under the names the
    arguments had before they were grouped: what the cache keys hash, so grouping renamed no cache file."""
    flat: dict[str, Any] = {}
    for name, value in hparams.items():
        if name in groups:
            flat.update(plain(value))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are served.

    Args:
        batch_size: subjects (or graphs) per batch.
        num_workers: loader worker processes (the manifest also preprocesses scans into its cache with them).
    """

    batch_size: int = 8
    num_workers: int = 0


@dataclass(frozen=True)
class SplitConfig:
    """The subjects of a simulated cohort, stored as [training pool, validation, test].

    Args:
        train_pool: subjects available for training; ``train_size`` of them are used.
        train_size: training subjects (None: the whole pool), drawn from the pool with ``subset_seed``
            (``rmr-study`` sets both per run).
        subset_seed: seed of the training subset (and of the shuffling and augmentation of training).
        num_val, num_test: fixed validation and test subjects.
    """

    train_pool: int = 128
    train_size: int | None = None
    subset_seed: int = 0
    num_val: int = 32
    num_test: int = 64

    @property
    def total(self) -> int:
        """Subjects in the cohort: the pool, validation and test."""
        return self.train_pool + self.num_val + self.num_test

"""Typed groups of datamodule arguments, shared by the datamodules.

A datamodule takes each group as one argument (``loader``, ``split``, ...): in YAML a mapping
(``loader: {batch_size: 8}``), on the command line a dotted name (``--data.init_args.loader.batch_size=8``),
from Python the dataclass, a dict of the fields to change or None (the datamodule's defaults). ``hparams``
(and so checkpoints, which are read with ``weights_only=True``) hold each group as a plain dict
(``plain``); the datamodule keeps the typed group as an attribute of the same name (``dm.loader.batch_size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rmr_lightning.typed_config import as_config as as_config  # re-exported for the datamodules
from rmr_lightning.typed_config import plain


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

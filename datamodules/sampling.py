"""Epoch-seeded shuffling that is the same on one process or many, and after a resume.

The permutation of an epoch depends only on (seed, epoch): Lightning calls ``set_epoch`` on the
sampler every epoch, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run
would have seen. Under DDP each rank takes a disjoint slice (``torch.utils.data.DistributedSampler``);
Lightning leaves a sampler of that type in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.configs import LoaderConfig, SplitConfig


def epoch_sampler(dataset: Dataset, seed: int, shuffle: bool = True, drop_last: bool = False) -> DistributedSampler:
    """A ``DistributedSampler`` over this process's rank (one replica when not distributed)."""
    distributed = dist.is_available() and dist.is_initialized()
    return DistributedSampler(
        dataset,
        num_replicas=dist.get_world_size() if distributed else 1,
        rank=dist.get_rank() if distributed else 0,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def seeded_loader(
    dataset: Dataset,
    loader: LoaderConfig,
    sampler: DistributedSampler,
    collate_fn: Callable[[list], Any],
    loader_class: type[DataLoader] = DataLoader,
    drop_last: bool = False,
) -> DataLoader:
    """The one way datamodules build loaders: ``loader``'s batch size and workers (kept alive between epochs
    when there are any) over an ``epoch_sampler``; ``loader_class`` e.g. TorchIO's ``SubjectsLoader``."""
    return loader_class(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate_fn,
        num_workers=loader.num_workers,
        persistent_workers=loader.num_workers > 0,
    )


def check_train_size(train_size: int | None, train_pool: int) -> None:
    """A training subset must lie within the pool (None: the whole pool)."""
    if train_size is not None and not 1 <= train_size <= train_pool:
        raise ValueError(f"train_size must lie in 1..train_pool ({train_pool}), got {train_size}")


def training_subset(pool: int, train_size: int | None, subset_seed: int) -> list[int]:
    """Sorted indices of ``train_size`` of ``pool`` training subjects drawn with ``subset_seed`` (None: all)."""
    if train_size is None:
        return list(range(pool))
    return sorted(np.random.default_rng(subset_seed).permutation(pool)[:train_size].tolist())


def cohort_splits(split: SplitConfig) -> dict[str, list[int]]:
    """Subject indices of a cohort stored as [training pool, validation, test]: ``train_size`` of the pool
    drawn with ``subset_seed`` (the study's seed), and the fixed validation and test subjects after it."""
    train = training_subset(split.train_pool, split.train_size, split.subset_seed)
    first_test = split.train_pool + split.num_val
    return {
        "train": train,
        "val": list(range(split.train_pool, first_test)),
        "test": list(range(first_test, first_test + split.num_test)),
    }

"""Epoch-seeded shuffling that is the same on one process or many, and after a resume.

The permutation of an epoch depends only on (seed, epoch): Lightning calls ``set_epoch`` on the
sampler every epoch, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run
would have seen. Under DDP each rank takes a disjoint slice (``torch.utils.data.DistributedSampler``);
Lightning leaves a sampler of that type in place.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


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

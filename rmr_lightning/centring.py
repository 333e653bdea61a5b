"""Region centring: each region's features as a deviation from that region's cohort mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class RegionCentring(nn.Module):
    """Each region's features as a deviation from that region's mean over the training subjects.

    Atrophy shows as a region looking different from how that region usually looks, and how it usually
    looks (its partial volume of grey matter, white matter and CSF) differs between regions, which a head
    shared by all regions cannot know; normative modelling compares each region with its own reference
    the same way. Statistics as in BatchNorm (batch in training, running in eval), but the mean is kept
    per region and one scale is shared by all regions, so a region that varies little keeps small
    deviations instead of having its noise blown up to unit variance. Regions absent from a scan
    (``present`` 0) do not enter the statistics. Under DDP the batch statistics are those of the global
    batch, summed over the processes with gradients through the sums, as SyncBatchNorm's.
    (B, R, C) -> (B, R, C)
    """

    def __init__(self, num_regions: int, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_regions, channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor, present: Tensor) -> Tensor:
        """x (B, R, C) features, present (B, R, 1) in {0, 1}."""
        mean, var = self.running_mean, self.running_var
        if self.training:
            sums = torch.cat([(x * present).sum(0), present.sum(0)], dim=1)  # (R, C + 1)
            subjects = len(x)
            if _distributed():  # the subject count travels in the same reduction, as an extra row
                count = sums.new_zeros(1, sums.shape[1])
                count[0, 0] = len(x)
                sums, count = _sum_over_ranks(torch.cat([sums, count])).split([len(sums), 1])
                subjects = int(count[0, 0])  # the same on every rank, so every rank takes the same branch
            if subjects > 1:  # batch statistics need two subjects
                total, seen = sums[:, :-1], sums[:, -1:]  # (R, C), (R, 1) subjects in which each region is present
                # a region absent from the whole batch keeps its running mean, which lerp then leaves as is
                mean = torch.where(seen > 0, total / seen.clamp_min(1), self.running_mean)
                squares = torch.cat([((x - mean).pow(2) * present).sum((0, 1)), present.sum().reshape(1)])  # (C + 1,)
                squares = _sum_over_ranks(squares)
                var = squares[:-1] / squares[-1].clamp_min(1)  # (C,) pooled over regions
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var, self.momentum)
        return (x - mean) * present / (var + self.eps).sqrt()


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the processes of a distributed run, differentiably; ``t`` itself in one process."""
    return _AllReduceSum.apply(t) if _distributed() else t


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients of every rank's loss (the gradient of the sum of
    all ranks' losses with respect to each rank's input, as SyncBatchNorm computes it)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad

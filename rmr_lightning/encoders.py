"""Scan encoders ``f'``: voxel features pooled into one vector per atlas region.

An encoder maps an image and its label map to one feature vector per region:
``forward(image, labels, num_regions) -> (features (B, R, C), voxel counts (B, R))`` and exposes
``out_channels``. Most of the CNN's work runs at 1/2 and 1/4 resolution, which keeps it cheap enough
to train on a CPU at 4 mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(1, c_out),
        nn.ReLU(inplace=True),
    )


class RegionCNN(nn.Module):
    """A three-scale 3D CNN whose features are pooled per region at every scale. -> (B, R, C)

    Each scale is averaged within the regions of the label map subsampled to that scale (stride-2
    convolutions centre output voxel j on input voxel 2j), then the three pooled vectors are fused by
    a per-region linear map. Pooling each scale at its own resolution avoids upsampling full feature
    maps, the dominant cost on a CPU.

    Args:
        widths: channels at full, 1/2 and 1/4 resolution.
        out_channels: channels of each region's feature.
        in_channels: image channels.
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32), out_channels: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must give three scales, got {list(widths)}")
        w1, w2, w3 = (int(w) for w in widths)
        self.widths = (w1, w2, w3)
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.scale1 = _block(in_channels, w1, 1)
        self.scale2 = nn.Sequential(_block(w1, w2, 2), _block(w2, w2, 1))
        self.scale4 = nn.Sequential(_block(w2, w3, 2), _block(w3, w3, 1))
        self.fuse = nn.Linear(w1 + w2 + w3, out_channels)

    def forward(self, image: Tensor, labels: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
        """image, labels (B, 1, X, Y, Z) -> region features (B, R, C) and voxel counts (B, R)."""
        full = self.scale1(image)  # (B, w1, X, Y, Z)
        half = self.scale2(full)  # (B, w2, X/2, Y/2, Z/2)
        quarter = self.scale4(half)  # (B, w3, X/4, Y/4, Z/4)
        pooled, counts = [], None
        for features, stride in ((full, 1), (half, 2), (quarter, 4)):
            lab = labels[:, :, ::stride, ::stride, ::stride][:, :, : features.shape[2], : features.shape[3], : features.shape[4]]
            mean, count = pool_regions(features, lab, num_regions)
            pooled.append(mean)
            counts = count if counts is None else counts
        return self.fuse(torch.cat(pooled, dim=-1)), counts


def pool_regions(features: Tensor, labels: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
    """Mean feature of each region of the label map.

    Args:
        features: (B, C, X, Y, Z) voxel features.
        labels: (B, 1, X, Y, Z) integer labels, 1..R for regions, 0 for background.

    Returns:
        pooled (B, R, C) (zero for a region absent from a scan) and voxel counts (B, R).
    """
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1).transpose(1, 2).reshape(-1, c)  # (B*V, C)
    lab = labels.reshape(b, -1).clamp(0, num_regions)
    if int(labels.max()) > num_regions or int(labels.min()) < 0:
        raise ValueError(f"label map values must lie in 0..{num_regions}, found {int(labels.min())}..{int(labels.max())}")
    index = (lab + (num_regions + 1) * torch.arange(b, device=lab.device).unsqueeze(1)).reshape(-1)  # (B*V,)
    sums = flat.new_zeros(b * (num_regions + 1), c).index_add_(0, index, flat)
    counts = torch.bincount(index, minlength=b * (num_regions + 1)).to(flat.dtype)
    sums = sums.reshape(b, num_regions + 1, c)[:, 1:]
    counts = counts.reshape(b, num_regions + 1)[:, 1:]
    return sums / counts.clamp_min(1).unsqueeze(-1), counts

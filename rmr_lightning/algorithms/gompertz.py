"""Gompertz growth of a lung nodule, the algorithm of the lesion-growth task.

``V(t) = V0 exp((r / rho) (1 - exp(-rho t)))``: the specific growth rate ``d ln V / dt = r exp(-rho t)``
starts at ``r`` and decays at rate ``rho`` (Laird 1964). ``r`` sets the volume doubling time at baseline,
``VDT0 = ln 2 / r``; published mean VDTs of malignant nodules differ by type (solid ~267 d, part-solid
~598 d, ground-glass ~848 d), and a VDT under 400 d is the usual threshold of suspicious growth.
The abstract state is the volume in units of a reference volume, so the change ``V0 (G(r, t) - 1)``
is a product of the state and a nonlinear function of the parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rmr_lightning.algorithms.base import GraphAlgorithm

DAYS_PER_YEAR = 365.25
#: Mean volume doubling times (days) of malignant nodules by type (the design brief's figures).
NODULE_VDT_DAYS = {"solid": 267.0, "part_solid": 598.0, "ground_glass": 848.0}
#: VDT below which growth counts as suspicious (days).
SUSPICIOUS_VDT_DAYS = 400.0


def growth_rate(vdt_days: float | Tensor) -> float | Tensor:
    """Initial specific growth rate ``r = ln 2 / VDT0`` in 1/year from a doubling time in days."""
    return math.log(2.0) * DAYS_PER_YEAR / vdt_days


def gompertz_volume(v0: Tensor, r: Tensor | float, rho: Tensor | float, t: Tensor | float) -> Tensor:
    """``V(t) = V0 exp((r / rho)(1 - exp(-rho t)))``, broadcast over all arguments; ``rho -> 0`` gives ``V0 e^{r t}``.

    ``(1 - exp(-rho t)) / rho`` is evaluated as ``t * expm1(-rho t) / (-rho t)`` so that small ``rho`` loses
    no precision and ``rho = 0`` is exact.
    """
    v0 = torch.as_tensor(v0)
    r, rho, t = (torch.as_tensor(a, dtype=v0.dtype, device=v0.device) for a in (r, rho, t))
    x = rho * t
    safe = torch.where(x.abs() > 0, x, torch.ones_like(x))
    factor = torch.where(x.abs() > 0, -torch.expm1(-safe) / safe, torch.ones_like(x))  # (1 - e^-x) / x
    return v0 * torch.exp(r * t * factor)


def doubling_time(v0: Tensor, v1: Tensor, t: Tensor | float) -> Tensor:
    """Volume doubling time between two measurements ``t`` apart (Schwartz 1961): ``t ln 2 / ln(V1 / V0)``.

    Shrinking or static lesions get ``inf`` (never double)."""
    ratio = torch.log(v1 / v0)
    return torch.where(
        ratio > 0,
        torch.as_tensor(t, dtype=ratio.dtype) * math.log(2.0) / ratio.clamp_min(1e-12),
        torch.full_like(ratio, math.inf),
    )


def doubling_time_days(v0: Tensor, v1: Tensor, t_years: Tensor | float) -> Tensor:
    """``doubling_time`` in days for volumes that may be predicted at or below zero: those get NaN."""
    valid = (v0 > 0) & (v1 > 0)
    days = doubling_time(v0.clamp_min(1e-12), v1.clamp_min(1e-12), t_years) * DAYS_PER_YEAR
    return torch.where(valid, days, torch.full_like(days, math.nan))


def suspicious_growth(
    v0: Tensor, v1: Tensor, t_years: Tensor | float, threshold_days: float = SUSPICIOUS_VDT_DAYS
) -> Tensor:
    """Whether a nodule doubles faster than ``threshold_days`` (400 d: the usual cut for malignancy of
    solid lung nodules); False where no doubling time exists."""
    return doubling_time_days(v0, v1, t_years) < threshold_days


class GompertzGrowth(GraphAlgorithm):
    """Gompertz growth of each node's volume (no edges: one node per lesion); parameters (r, t).

    Args:
        r: range of the initial growth rate (1/year); the default spans VDTs of ~200 to ~1300 days.
        t: range of the follow-up horizon (years).
        rho: deceleration (1/year), a cohort constant.
    """

    param_names = ("r", "t")

    def __init__(
        self, r: tuple[float, float] = (0.2, 1.3), t: tuple[float, float] = (0.0, 2.0), rho: float = 0.3
    ) -> None:
        super().__init__(r=r, t=t)
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        self.rho = float(rho)

    @property
    def param_decay(self) -> list[float]:
        """``r`` decays at ``rho``: after ``s`` years the lesion grows as a fresh one with rate ``r e^{-rho s}``."""
        return [self.rho, 0.0]

    def run(self, prepared: Tensor, x0: Tensor, params: Tensor) -> Tensor:
        return gompertz_volume(x0, params[:, :1], self.rho, params[:, 1:])

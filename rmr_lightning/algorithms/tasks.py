"""The two brain-graph algorithms as plug-ins with parameter ranges (1/year and years).

Defaults: diffusivity gamma in [0.05, 0.6] /yr and horizons up to 4 years, so ``gamma t`` spans
slow spread (a few percent of a region's load per year) to near-equilibrium within a lobe.
"""

from __future__ import annotations

from torch import Tensor

from rmr_lightning.algorithms.base import GraphAlgorithm
from rmr_lightning.algorithms.diffusion import DiffusionSpectrum
from rmr_lightning.algorithms.fkpp import fisher_kpp


class NetworkDiffusion(GraphAlgorithm):
    """Raj et al. 2012: ``x(t) = expm(-gamma H t) x0``; parameters (gamma, t)."""

    param_names = ("gamma", "t")

    def __init__(self, gamma: tuple[float, float] = (0.05, 0.6), t: tuple[float, float] = (0.0, 4.0)) -> None:
        super().__init__(gamma=gamma, t=t)

    def prepare(self, connectivity: Tensor) -> DiffusionSpectrum:
        return DiffusionSpectrum(connectivity)

    def run(self, prepared: DiffusionSpectrum, x0: Tensor, params: Tensor) -> Tensor:
        return prepared.solve(x0, params[:, 0] * params[:, 1])


class FisherKPP(GraphAlgorithm):
    """Weickenmeier et al. 2018: network diffusion plus logistic growth; parameters (gamma, alpha, t)."""

    param_names = ("gamma", "alpha", "t")

    def __init__(
        self,
        gamma: tuple[float, float] = (0.05, 0.6),
        alpha: tuple[float, float] = (0.3, 1.0),
        t: tuple[float, float] = (0.0, 4.0),
        growth_rate: float = 0.5,
    ) -> None:
        super().__init__(gamma=gamma, alpha=alpha, t=t)
        self.growth_rate = float(growth_rate)

    def run(self, prepared: Tensor, x0: Tensor, params: Tensor) -> Tensor:
        w = x0.new_full((1, x0.shape[-1]), self.growth_rate)
        return fisher_kpp(prepared, x0, params[:, 0], params[:, 1], params[:, 2], weights=w)

"""Known algorithms ``A``: exact, batched, pure torch (CPU or GPU, float32 or float64)."""

from rmr_lightning.algorithms.base import GraphAlgorithm
from rmr_lightning.algorithms.diffusion import (
    DiffusionSpectrum,
    network_diffusion,
    random_walk_laplacian,
    row_normalised,
)
from rmr_lightning.algorithms.fkpp import fisher_kpp
from rmr_lightning.algorithms.gompertz import (
    DAYS_PER_YEAR,
    NODULE_VDT_DAYS,
    SUSPICIOUS_VDT_DAYS,
    GompertzGrowth,
    doubling_time,
    doubling_time_days,
    gompertz_volume,
    growth_rate,
    suspicious_growth,
)
from rmr_lightning.algorithms.spec import AbstractSpec
from rmr_lightning.algorithms.tasks import FisherKPP, NetworkDiffusion

__all__ = [
    "AbstractSpec",
    "DAYS_PER_YEAR",
    "DiffusionSpectrum",
    "FisherKPP",
    "GompertzGrowth",
    "GraphAlgorithm",
    "NODULE_VDT_DAYS",
    "NetworkDiffusion",
    "SUSPICIOUS_VDT_DAYS",
    "doubling_time",
    "doubling_time_days",
    "fisher_kpp",
    "gompertz_volume",
    "growth_rate",
    "network_diffusion",
    "random_walk_laplacian",
    "row_normalised",
    "suspicious_growth",
]

"""Abstract data of the lesion-growth task: one node per lesion, ``V0 -> V(t)`` under Gompertz growth.

Each sample is a graph of one node and no edges, so the pretraining module, the processor contract
and the artifact are those of the brain task; a graph-free processor (the deep MLP) fits it. The state
is the lesion volume in units of a reference volume (a 20 mm sphere, 4.19 mL).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datamodules.abstract import AbstractGraphDataModule, GraphSamples
from datamodules.configs import LoaderConfig, as_config
from rmr_lightning.algorithms import GompertzGrowth, GraphAlgorithm

#: Volume of a 20 mm sphere in mL: state 1 of the lesion task.
REFERENCE_VOLUME_ML = 4.0 / 3.0 * np.pi * 10.0**3 / 1000.0


def lesion_volumes(diameter_mm: tuple[float, float]):
    """A sampler of states ``(d / 20 mm)^3`` with diameters ``d`` uniform in ``diameter_mm``."""
    low, high = (float(d) / 20.0 for d in diameter_mm)

    def sample(connectivity: Tensor, num: int, rng: np.random.Generator) -> Tensor:
        return torch.as_tensor(rng.uniform(low, high, size=(num, connectivity.shape[0])) ** 3)

    return sample


_LOADER = LoaderConfig(batch_size=256)


class AbstractLesionDataModule(AbstractGraphDataModule):
    """Synthetic ``V0 -> A(V0; r, t)`` for single lesions; test sets in distribution and at 1.5-3x longer horizons.

    Args:
        algorithm: the growth law (default ``GompertzGrowth()``).
        diameter_mm: range of baseline lesion diameters (states are volumes relative to 20 mm).
        num_train, num_val, num_test, horizon_factor, loader, seed: as in ``AbstractGraphDataModule``
            (``loader.batch_size`` 256 by default).
    """

    test_names = ("in_distribution", "longer_horizon")

    def __init__(
        self,
        algorithm: GraphAlgorithm | None = None,
        diameter_mm: tuple[float, float] = (4.0, 20.0),
        num_train: int = 100_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        horizon_factor: tuple[float, float] = (1.5, 3.0),
        loader: LoaderConfig | None = _LOADER,
        seed: int = 0,
    ) -> None:
        super().__init__(
            algorithm=algorithm if algorithm is not None else GompertzGrowth(),
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            num_graphs=1,
            min_nodes=2,
            max_nodes=2,
            dk84_fraction=0.0,
            horizon_factor=horizon_factor,
            loader=as_config(LoaderConfig, loader, _LOADER),
            seed=seed,
        )
        self.diameter_mm = tuple(float(d) for d in diameter_mm)
        if not 0 < self.diameter_mm[0] <= self.diameter_mm[1]:
            raise ValueError(f"diameter_mm must be (low, high) with 0 < low <= high, got {diameter_mm}")

    @property
    def largest_training_graph(self) -> int:
        return 1

    def _split(self, name: str, seed: int) -> GraphSamples:
        hp = self.hparams
        count = {"train": hp.num_train, "val": hp.num_val}.get(name, hp.num_test)
        algorithm = self.algorithm
        if name == "longer_horizon":
            t_max = algorithm.max_time
            algorithm = algorithm.with_ranges(**{algorithm.time_param: tuple(f * t_max for f in hp.horizon_factor)})
        elif name not in ("train", "val", "in_distribution"):
            raise KeyError(name)
        lesion = torch.zeros(1, 1, dtype=torch.float64)  # one node, no edges
        return GraphSamples(
            [lesion], torch.zeros(count, dtype=torch.long), algorithm, seed, lesion_volumes(self.diameter_mm)
        )

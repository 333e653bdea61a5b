"""What a stage may ask of a datamodule, declared once (``isinstance`` checks, not ``hasattr`` probing).

Each protocol is one capability; a stage tests for it with ``isinstance(datamodule, HasX)`` and falls
back where the capability is optional. What the project's datamodules provide:

- ``datamodules.abstract.AbstractGraphDataModule`` and ``datamodules.lesion_abstract.AbstractLesionDataModule``
  (abstract data for pretraining): ``HasAlgorithm``, ``HasAbstractSpec``, ``HasTestNames``.
- ``datamodules.brain_phantom.BrainPhantomDataModule`` (phantom scans made by A): ``HasAlgorithm``,
  ``HasCovariates``, ``HasTrainTable``.
- ``datamodules.manifest.ManifestDataModule`` (real scans from a CSV) and ``datamodules.lesion_ct.LesionCTDataModule``
  (simulated nodule CT): ``HasCovariates``, ``HasTrainTable``.

Who asks: the CLI links ``HasAbstractSpec`` into the pretraining module's ``abstract_spec`` and
``HasCovariates`` into the fine-tuning module's ``covariate_names``; ``ProcessorPretraining`` names its test
sets by ``HasTestNames``; ``NaturalFinetuning.setup`` calibrates from ``HasTrainTable`` (else one pass
over the training loader) and warns when ``HasAlgorithm``'s A differs from the one ``P`` was pretrained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from rmr_lightning.algorithms import AbstractSpec, GraphAlgorithm


@runtime_checkable
class HasAlgorithm(Protocol):
    """Data made by a known algorithm ``A`` (abstract graphs, phantoms)."""

    algorithm: GraphAlgorithm


@runtime_checkable
class HasAbstractSpec(Protocol):
    """Abstract data whose spec the pretraining module is built from and the artifact records."""

    @property
    def abstract_spec(self) -> AbstractSpec: ...


@runtime_checkable
class HasCovariates(Protocol):
    """Scan data with per-subject covariates, in the column order of ``ScanBatch.covariates``."""

    @property
    def covariate_names(self) -> list[str]: ...


@runtime_checkable
class HasTrainTable(Protocol):
    """Scan data whose training targets and covariates can be read without loading any scan."""

    def train_table(self) -> tuple[Tensor, Tensor]:
        """Targets (n, R, 2): baseline and follow-up per region; covariates (n, C) in ``covariate_names`` order."""
        ...


@runtime_checkable
class HasTestNames(Protocol):
    """Data with several test sets: ``test_names[i]`` names the i-th test dataloader."""

    test_names: Sequence[str]

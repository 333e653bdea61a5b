"""Shared fixtures: a tiny processor artifact and an isolated cache, so tests never touch results/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Anatomy and phantom caches go to a session folder (unless the caller set RMR_CACHE)."""
    if "RMR_CACHE" not in os.environ:
        os.environ["RMR_CACHE"] = str(tmp_path_factory.mktemp("rmr_cache"))


def _tiny_artifact(datamodule, processor: str, path: Path) -> Path:
    """Pretrain a width-16 ``processor`` for one epoch of ``datamodule`` and save it as a processor artifact."""
    from rmr_lightning.pretraining import quick_artifact

    return quick_artifact(datamodule, processor, 16, path)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MPNN (hidden 16) pretrained for a few steps on network diffusion, saved as processor.pt."""
    from datamodules.abstract import AbstractGraphDataModule

    dm = AbstractGraphDataModule(num_train=256, num_val=32, num_test=32, num_graphs=16, loader={"batch_size": 32})
    return _tiny_artifact(dm, "mpnn", tmp_path_factory.mktemp("artifact") / "processor.pt")


@pytest.fixture(scope="session")
def tiny_lesion_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deep MLP (hidden 16) pretrained for a few steps on Gompertz growth of single lesions."""
    from datamodules.lesion_abstract import AbstractLesionDataModule

    dm = AbstractLesionDataModule(num_train=512, num_val=32, num_test=32, loader={"batch_size": 64})
    return _tiny_artifact(dm, "mlp", tmp_path_factory.mktemp("lesion_artifact") / "processor.pt")

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


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 8 mm brain phantoms written as NIfTI scans and DK84 label maps, listed in a CSV as a user would
    (follow-up values only; the datamodule splits them 4/2/2 by default)."""
    import csv

    import torch
    import torchio as tio

    from datamodules.brain_phantom import BrainPhantomDataModule
    from rmr_lightning.data.connectome import load_dk84

    dm = BrainPhantomDataModule(spacing=8, split={"train_pool": 6, "num_val": 1, "num_test": 1})
    cohort, _ = dm._load_or_generate()
    folder = tmp_path_factory.mktemp("scans")
    names = load_dk84()[1]
    rows = []
    for i in range(8):
        image, labels = folder / f"sub-{i:02d}_T1w.nii.gz", folder / f"sub-{i:02d}_dseg.nii.gz"
        tio.ScalarImage(tensor=cohort["image"][i], affine=cohort["affine"].numpy()).save(image)
        tio.LabelMap(tensor=cohort["labels"][i].long(), affine=cohort["affine"].numpy()).save(labels)
        age, horizon = cohort["covariates"][i].tolist()
        row = {"subject_id": f"sub-{i:02d}", "image": image.name, "label_map": labels.name, "age": age}
        row["horizon"] = horizon
        followup = cohort["target"][i, :, 1]
        row.update({n: ("" if torch.isnan(v) else float(v)) for n, v in zip(names, followup, strict=True)})
        rows.append(row)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path

"""What every scan datamodule hands the natural stage: one batch layout and one preprocessing.

Phantoms and user scans go through the same ``preprocessing`` (TorchIO: canonical orientation,
resampling to an isotropic spacing, crop/pad to a fixed shape, intensity normalisation or CT
windowing) and the same ``collate_subjects``, so the model never knows where a scan came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchio as tio

from rmr_lightning.data.batches import ScanBatch

__all__ = [
    "CT_WINDOW",
    "MODALITIES",
    "ScanBatch",
    "augment_training_batch",
    "collate_subjects",
    "ct_windowing",
    "default_cache_dir",
    "preprocessing",
]

MODALITIES = ("mri", "ct")
#: Brain window for CT in Hounsfield units (level 40, width 80).
CT_WINDOW = (0.0, 80.0)


def default_cache_dir() -> Path:
    """Where preprocessed data are cached, shared by runs, workers and ranks: ``$RMR_CACHE`` or ~/.cache."""
    return Path(os.environ.get("RMR_CACHE", Path.home() / ".cache" / "rmr_lightning"))


def transform_key(transform: tio.Transform) -> str:
    """A short hash of a transform's settings that is the same in every process: its repr without the
    memory addresses of function arguments (``ZNormalization``'s ``masking_method``), which change from run
    to run and would make every process preprocess the cohort again into a new cache file. Callables are
    known by name alone, so two different functions with one name would share a key (ours use TorchIO's)."""
    settings = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
    return hashlib.sha256(settings.encode()).hexdigest()[:12]


def settings_key(settings: dict, skip: Sequence[str] = ()) -> str:
    """A short hash of a datamodule's settings for its cache file name: the same whether the datamodule was
    built in Python or by LightningCLI (which adds private ``_class_path``/``_instantiator`` entries to
    ``hparams``), and blind to the settings in ``skip`` that do not change the cached data."""
    kept = {k: v for k, v in settings.items() if not k.startswith("_") and k not in skip}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preprocessing(
    spacing: float,
    shape: Sequence[int],
    modality: str = "mri",
    ct_window: tuple[float, float] = CT_WINDOW,
) -> tio.Compose:
    """The deterministic preprocessing shared by phantoms and user scans.

    ``shape`` is in TorchIO's voxel order after ``ToCanonical``: (left-right, back-front, bottom-top).
    Cropping and padding centre on the label map, so a wide field of view cannot cut the brain off.

    MRI: z-score over the head foreground (voxels above the mean, TorchIO's ``mean`` mask), so contrast and
    scanner gain drop out. Not over the label map: where the labels cover grey matter only, its statistics
    would move with the atrophy the model must see.
    CT: clamp to the brain window (Hounsfield units) and rescale it to [0, 1]; HU are absolute, so no
    per-subject statistics are used.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive (mm), got {spacing}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be three positive sizes (x, y, z voxels), got {shape}")
    spatial = [
        tio.CopyAffine("image"),  # label maps saved in float32 differ from the image's affine by ~1e-6
        tio.ToCanonical(),
        tio.Resample(float(spacing)),
        tio.CropOrPad(tuple(int(s) for s in shape), mask_name="label_map"),  # centred on the brain
    ]
    if modality == "mri":
        intensity = [tio.ZNormalization(masking_method=tio.ZNormalization.mean)]
    else:
        intensity = ct_windowing(ct_window)
    return tio.Compose(spatial + intensity)


def ct_windowing(window: tuple[float, float]) -> list[tio.Transform]:
    """Clamp Hounsfield units to ``window`` (low, high) and rescale it to [0, 1]: HU are absolute, so no
    per-subject statistics are used."""
    low, high = window
    if not low < high:
        raise ValueError(f"ct_window must be (low, high) with low < high in HU, got {window}")
    return [tio.Clamp(low, high), tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(low, high))]


def augment_intensity(batch: ScanBatch, seed: int) -> ScanBatch:
    """A random gain (1 + 0.05 N(0, 1)) and noise level (up to 0.03 of a unit-variance image) per subject, on
    the device. Seeded by ``seed`` (the run's subset seed and step): the same after a resume."""
    image = batch.image
    shape = (image.shape[0], 1, 1, 1, 1)
    gen = torch.Generator(device=image.device).manual_seed(seed)
    scale = 1.0 + 0.05 * torch.randn(shape, device=image.device, generator=gen)
    level = 0.03 * torch.rand(shape, device=image.device, generator=gen)
    batch.image = image * scale + level * torch.randn(image.shape, device=image.device, generator=gen)
    return batch


def augment_training_batch(datamodule: Any, batch: ScanBatch) -> ScanBatch:
    """``on_after_batch_transfer`` of the scan datamodules: ``augment_intensity`` on training batches when
    the datamodule's ``augment`` is on, seeded by its ``split.subset_seed`` and the global step."""
    trainer = getattr(datamodule, "trainer", None)
    if not (datamodule.hparams.augment and trainer is not None and trainer.training):
        return batch
    return augment_intensity(batch, datamodule.split.subset_seed * 1_000_003 + trainer.global_step)


def _stack_labels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Label maps stacked in their own integer dtype (the cache's uint8 or int16: 4-8x fewer bytes than
    int64 to pass from loader workers); pooling promotes them to int64 where it indexes."""
    dtypes = {m.dtype for m in maps}
    if len(dtypes) > 1 or next(iter(dtypes)).is_floating_point or torch.bool in dtypes:
        maps = [m.long() for m in maps]
    return torch.stack(maps)


def collate_subjects(subjects: list[tio.Subject]) -> ScanBatch:
    """Stack TorchIO subjects into a ``ScanBatch`` (used as ``collate_fn`` of the loaders)."""
    return ScanBatch(
        image=torch.stack([s["image"].data.float() for s in subjects]),
        labels=_stack_labels([s["label_map"].data for s in subjects]),
        covariates=torch.stack([torch.as_tensor(s["covariates"], dtype=torch.float32) for s in subjects]),
        target=torch.stack([torch.as_tensor(s["target"], dtype=torch.float32) for s in subjects]),
        state=torch.stack([torch.as_tensor(s["state"], dtype=torch.float32) for s in subjects]),
        subject_ids=[str(s["subject_id"]) for s in subjects],
    )

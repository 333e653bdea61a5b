"""Lung-nodule CT phantoms streamed as lesion-centred patches by a TorchIO ``Queue`` (the lesion-growth task).

Each subject is a small chest-CT volume in Hounsfield units: lung parenchyma with texture and vessels,
and one nodule (an ellipsoid with a soft edge) whose type sets its density: solid (soft tissue),
ground-glass (hazy, around -600 HU) or part-solid (a solid core inside ground glass). Its follow-up
volume comes from Gompertz growth with the baseline doubling time of its type (solid ~267 d,
part-solid ~598 d, ground-glass ~848 d), so the follow-up is identifiable from the scan (size and
density) plus the horizon, a covariate. Scanner effects: blur, noise, a calibration offset.

The label map is the region of interest a reader marks around the nodule (a sphere of ``roi_mm``);
the encoder pools its features over it, so the size must be seen in the image, not counted from a
segmentation. Training patches come from ``tio.Queue`` with a ``LabelSampler`` whose sampling map is a
small ball at the nodule (lesion-centred patches with a little jitter) and a ``DistributedSampler`` as
subject sampler: under DDP the ranks read disjoint subjects, and Lightning's ``set_epoch`` reaches the
subject sampler through the loader's sampler. Validation and test use the exactly centred patch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.brain_phantom import default_cache_dir
from datamodules.configs import LoaderConfig, SplitConfig, as_config, flat_settings, plain
from datamodules.lesion_abstract import REFERENCE_VOLUME_ML
from datamodules.sampling import check_train_size, cohort_splits, epoch_sampler
from datamodules.scans import collate_subjects, ct_windowing, settings_key
from rmr_lightning.algorithms import NODULE_VDT_DAYS, gompertz_volume, growth_rate
from rmr_lightning.files import atomic_torch_save

COHORT_VERSION = 1  # bump when rendering changes: the cache key includes it
NODULE_TYPES = tuple(NODULE_VDT_DAYS)  # solid, part_solid, ground_glass
#: Lung window in Hounsfield units (level -400, width 1200), rescaled to [0, 1].
LUNG_WINDOW = (-1000.0, 200.0)
#: Typical densities (HU) of the solid and ground-glass components, and of lung and vessels.
SOLID_HU, GROUND_GLASS_HU, LUNG_HU, VESSEL_HU = 30.0, -600.0, -860.0, 40.0


def simulate_lesions(
    count: int,
    rng: np.random.Generator,
    type_probs: tuple[float, float, float],
    diameter_mm: tuple[float, float],
    horizon: tuple[float, float],
    rho: float,
) -> dict[str, Tensor]:
    """Nodule type, baseline and follow-up volume (mL) and horizon (years) of ``count`` subjects."""
    kind = rng.choice(len(NODULE_TYPES), size=count, p=np.asarray(type_probs) / np.sum(type_probs))
    diameter = rng.uniform(*diameter_mm, size=count)
    t = rng.uniform(*horizon, size=count)
    r = np.array([growth_rate(NODULE_VDT_DAYS[NODULE_TYPES[k]]) for k in kind])  # 1/year
    v0 = torch.as_tensor(math.pi / 6.0 * diameter**3 / 1000.0)  # mL
    v1 = gompertz_volume(v0, torch.as_tensor(r), rho, torch.as_tensor(t))
    return {
        "kind": torch.as_tensor(kind),
        "diameter": torch.as_tensor(diameter),
        "target": torch.stack([v0, v1], dim=-1).unsqueeze(1).float(),  # (n, 1, 2): one region, [baseline, follow-up]
        "covariates": torch.as_tensor(t).unsqueeze(1).float(),  # (n, 1): horizon
        "state": (v0 / REFERENCE_VOLUME_ML).unsqueeze(1).float(),  # (n, 1): the abstract state of P
    }


def _gaussian_blur(volume: Tensor, sigma_vox: float) -> Tensor:
    """Separable Gaussian blur of a (X, Y, Z) volume, replicate padding."""
    radius = max(1, int(math.ceil(3 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel = kernel / kernel.sum()
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0, 0, 0, 0, 0, 0]
        pad[4 - 2 * axis], pad[5 - 2 * axis] = radius, radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def _soft(distance_mm: Tensor, edge_mm: float = 0.5) -> Tensor:
    """Partial-volume fraction of a surface at signed distance 0 (inside negative)."""
    return torch.sigmoid(-distance_mm / edge_mm)


def _random_rotation(rng: np.random.Generator) -> Tensor:
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float32,
    )


def render_lesion(
    kind: int, diameter: float, size: int, spacing: float, roi_mm: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """One chest-CT volume (X, Y, Z) in HU with its nodule, the ROI label map and the sampling map.

    The ellipsoid's semi-axes multiply to ``(diameter / 2)^3``, so its volume is that of the sphere of
    ``diameter`` (the baseline volume of the targets)."""
    axis = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) * spacing
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (X, Y, Z, 3) mm
    # lung with texture: smooth fluctuations of a few tens of HU
    texture = _gaussian_blur(torch.as_tensor(rng.standard_normal((size,) * 3), dtype=torch.float32), 2.0 / spacing)
    hu = LUNG_HU + 25.0 * texture / texture.std()
    for _ in range(int(rng.integers(2, 6))):  # vessels: straight tubes with a soft wall
        point = torch.as_tensor(rng.uniform(-size * spacing / 2, size * spacing / 2, 3), dtype=torch.float32)
        direction = torch.as_tensor(rng.standard_normal(3), dtype=torch.float32)
        direction = direction / direction.norm()
        rel = grid - point
        dist = (rel - (rel @ direction).unsqueeze(-1) * direction).norm(dim=-1)
        vessel = _soft(dist - float(rng.uniform(0.6, 2.0)))
        hu = hu * (1 - vessel) + VESSEL_HU * vessel
    # the nodule
    centre = torch.as_tensor(rng.uniform(-3.0, 3.0, 3), dtype=torch.float32)
    stretch = np.exp(rng.normal(0.0, 0.12, 3))
    axes = torch.as_tensor(diameter / 2 * stretch / np.prod(stretch) ** (1 / 3), dtype=torch.float32)
    local = (grid - centre) @ _random_rotation(rng)  # (X, Y, Z, 3) in the ellipsoid's frame
    rho = (local / axes).norm(dim=-1)  # 1 on the surface
    mean_axis = float(axes.mean())
    inside = _soft((rho - 1) * mean_axis)
    name = NODULE_TYPES[kind]
    solid = SOLID_HU + float(rng.normal(0, 15))
    glass = GROUND_GLASS_HU + float(rng.normal(0, 50))
    if name == "solid":
        density = torch.full_like(hu, solid)
    elif name == "ground_glass":
        density = torch.full_like(hu, glass)
    else:  # part-solid: a solid core of about half the diameter inside ground glass
        core = _soft((rho - float(rng.uniform(0.4, 0.6))) * mean_axis)
        density = glass * (1 - core) + solid * core
    hu = hu * (1 - inside) + density * inside
    # scanner: resolution, calibration, noise
    hu = _gaussian_blur(hu, float(rng.uniform(0.5, 1.0)) / spacing)
    hu = (
        hu
        + float(rng.normal(0, 10))
        + float(rng.uniform(15, 45)) * torch.as_tensor(rng.standard_normal(hu.shape), dtype=torch.float32)
    )
    # where a reader marks the nodule: within a millimetre of its centre
    mark = centre + torch.as_tensor(rng.uniform(-1.0, 1.0, 3), dtype=torch.float32)
    from_mark = (grid - mark).norm(dim=-1)
    roi = (from_mark <= roi_mm).to(torch.uint8)
    sampling = (from_mark <= 2.0).to(torch.uint8)
    return hu, roi, sampling


class _LesionSubjects(Dataset):
    """TorchIO subjects of one split; ``patch`` crops the exactly centred patch (validation, test)."""

    def __init__(
        self, cohort: dict[str, Tensor], indices: list[int], transform: tio.Transform, patch: int | None = None
    ) -> None:
        self.cohort, self.indices, self.transform, self.patch = cohort, list(indices), transform, patch

    def __len__(self) -> int:
        return len(self.indices)

    def subject(self, index: int) -> tio.Subject:
        i = self.indices[index]
        c, affine = self.cohort, self.cohort["affine"].numpy()
        return tio.Subject(
            image=tio.ScalarImage(tensor=c["image"][i].float(), affine=affine),
            label_map=tio.LabelMap(tensor=c["roi"][i].long(), affine=affine),
            sampling_map=tio.LabelMap(tensor=c["sampling"][i].long(), affine=affine),
            covariates=c["covariates"][i],
            target=c["target"][i],
            state=c["state"][i],
            subject_id=f"lesion-ct-{i:05d}",
        )

    def __getitem__(self, index: int) -> tio.Subject:
        subject = self.transform(self.subject(index))
        if self.patch is None:
            return subject
        centre = torch.nonzero(subject["sampling_map"].data[0]).float().mean(0).round().long()  # voxel
        start = (centre - self.patch // 2).tolist()
        shape = subject["image"].spatial_shape
        crop = [v for s, n in zip(start, shape, strict=True) for v in (s, n - s - self.patch)]
        if min(crop) < 0:
            raise ValueError(
                f"subject {subject['subject_id']}: the {self.patch}-voxel patch at its nodule leaves the volume {shape}"
            )
        return tio.Crop(tuple(crop))(subject)


class EpochQueue(tio.Queue):
    """A ``tio.Queue`` whose epochs are functions of (seed, epoch, rank) alone, as a resumed run needs.

    ``start_epoch`` sets the subject sampler's epoch and clears what TorchIO's queue carries over: it keeps
    counting subjects across epochs, so from the second epoch on each fill read a single subject (batches
    of one subject's patches), and a queue built for a resumed run filled differently from one that had
    run since the start. TorchIO's samplers, flips and patch shuffling draw from the global RNGs, which a
    checkpoint does not hold, so the first fill of an epoch reseeds them (the lesion model draws nothing
    else from them). Touches ``tio.Queue``'s private state (torchio 1.2.1, pinned); the tests guard it.
    """

    def start_epoch(self, epoch: int, seed: int) -> None:
        if self.subject_sampler is not None and hasattr(self.subject_sampler, "set_epoch"):
            self.subject_sampler.set_epoch(epoch)
        self.patches_list = []
        self._incomplete_subject = None
        self._num_patches_incomplete = 0
        self._num_sampled_subjects = 0
        self._subjects_iterable = None  # re-created at the first fill, in this epoch's order
        rank = getattr(self.subject_sampler, "rank", 0)
        self._epoch_seed = (seed * 1_000_003 + epoch) * 1_009 + rank

    def _fill(self) -> None:
        # at the first fill, not in start_epoch: Lightning creates the loader's iterator (which draws a
        # seed from the global RNG) before set_epoch in a resumed epoch and after it in a continuing one
        seed = getattr(self, "_epoch_seed", None)
        if seed is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            self._epoch_seed = None
        super()._fill()


class _QueueEpochSampler(DistributedSampler):
    """The sampler of the loader around an ``EpochQueue``: patches in the queue's order, and Lightning's
    ``set_epoch`` passed on to the queue. Being a ``DistributedSampler`` (of one replica), Lightning leaves
    it in place under DDP instead of splitting the queue's patches again."""

    def __init__(self, queue: EpochQueue, seed: int) -> None:
        super().__init__(queue, num_replicas=1, rank=0, shuffle=False, seed=seed)
        self.queue = queue

    def __iter__(self):
        return iter(range(len(self.queue)))  # the queue's length follows its subject sampler

    def __len__(self) -> int:
        return len(self.queue)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.queue.start_epoch(epoch, self.seed)


@dataclass(frozen=True)
class NoduleConfig:
    """The simulated nodules and their follow-up.

    Args:
        type_probs: shares of solid, part-solid and ground-glass nodules.
        diameter_mm: range of baseline diameters (mm).
        horizon: range of follow-up delays (years).
        rho: Gompertz deceleration (1/year), a cohort constant; the growth rate follows the type.
    """

    type_probs: tuple[float, float, float] = (0.5, 0.25, 0.25)
    diameter_mm: tuple[float, float] = (6.0, 20.0)
    horizon: tuple[float, float] = (0.5, 2.0)
    rho: float = 0.3


_SPLIT, _NODULES, _LOADER = SplitConfig(), NoduleConfig(), LoaderConfig()


class LesionCTDataModule(L.LightningDataModule):
    """Simulated lung-nodule CT cohorts: baseline patch -> nodule volume at baseline and follow-up (mL).

    Args:
        split, loader, seed, cache_dir: as in ``BrainPhantomDataModule`` (the study overrides
            ``split.train_size`` and ``split.subset_seed``).
        nodules: ``NoduleConfig`` (type shares, baseline diameters, follow-up delays, Gompertz rho).
        size, spacing: volume edge (voxels) and voxel size (mm); patch_size: edge of the patches (voxels).
        roi_mm: radius of the region of interest around the nodule (the label map).
        samples_per_volume: training patches per subject and epoch (each centred within 2 mm of the nodule).
        augment: random flips of the training patches (TorchIO, in the queue's workers).
    """

    covariate_names = ["horizon"]

    def __init__(
        self,
        split: SplitConfig | None = _SPLIT,
        nodules: NoduleConfig | None = _NODULES,
        size: int = 48,
        spacing: float = 1.0,
        patch_size: int = 32,
        roi_mm: float = 12.0,
        samples_per_volume: int = 2,
        augment: bool = True,
        loader: LoaderConfig | None = _LOADER,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.split = as_config(SplitConfig, split, _SPLIT)
        self.nodules = as_config(NoduleConfig, nodules, _NODULES)
        self.loader = as_config(LoaderConfig, loader, _LOADER)
        check_train_size(self.split.train_size, self.split.train_pool)
        if patch_size > size:
            raise ValueError(f"patch_size ({patch_size}) cannot exceed the volume size ({size})")
        if (roi_mm + 2.0) / spacing > patch_size / 2:
            raise ValueError(
                f"a {patch_size}-voxel patch at {spacing} mm cannot hold the {roi_mm} mm region of interest"
            )
        self.save_hyperparameters()
        for key in ("split", "nodules", "loader"):  # plain dicts: checkpoints are read with weights_only=True
            self.hparams[key] = plain(getattr(self, key))
        self.cohort: dict[str, Tensor] | None = None
        self.splits: dict[str, list[int]] = {}

    @property
    def num_regions(self) -> int:
        return 1

    def _cache_path(self) -> Path:
        skip = (
            "train_size",
            "subset_seed",
            "batch_size",
            "num_workers",
            "cache_dir",
            "augment",
            "samples_per_volume",
            "patch_size",
        )
        settings = flat_settings(self.hparams, ("split", "nodules", "loader"))
        key = settings_key({**settings, "version": COHORT_VERSION}, skip)
        cache_dir = Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir()
        return cache_dir / f"lesion_ct_{key}.pt"

    def _generate(self) -> dict[str, Tensor]:
        hp, split, nodules = self.hparams, self.split, self.nodules
        parts = []
        for offset, count in enumerate((split.train_pool, split.num_val, split.num_test)):
            if count == 0:  # e.g. no test split (scripts/export_lesion_phantoms.py)
                continue
            rng = np.random.default_rng(hp.seed * 1000 + offset)
            part = simulate_lesions(count, rng, nodules.type_probs, nodules.diameter_mm, nodules.horizon, nodules.rho)
            volumes = [
                render_lesion(int(k), float(d), hp.size, hp.spacing, hp.roi_mm, rng)
                for k, d in zip(part["kind"], part["diameter"], strict=True)
            ]
            part["image"] = (
                torch.stack([v[0] for v in volumes]).round().clamp(-32768, 32767).to(torch.int16).unsqueeze(1)
            )
            part["roi"] = torch.stack([v[1] for v in volumes]).unsqueeze(1)
            part["sampling"] = torch.stack([v[2] for v in volumes]).unsqueeze(1)
            parts.append(part)
        cohort = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        half = (hp.size - 1) / 2 * hp.spacing
        affine = np.diag([hp.spacing] * 3 + [1.0])
        affine[:3, 3] = -half  # the volume centred on the origin
        cohort["affine"] = torch.as_tensor(affine)
        return cohort

    def prepare_data(self) -> None:
        """Render and cache the cohort once (rank 0); later runs and other ranks load it."""
        path = self._cache_path()
        if not path.is_file():
            rank_zero_info(f"rendering {self.split.total} lesion CT subjects -> {path}")
            atomic_torch_save(self._generate(), path)

    def setup(self, stage: str | None = None) -> None:
        if self.cohort is not None:  # idempotent
            return
        path = self._cache_path()
        if not path.is_file():
            self.prepare_data()
        self.cohort = torch.load(path, weights_only=True)
        self.splits = cohort_splits(self.split)

    def intensity(self) -> tio.Transform:
        """CT windowing shared by every split: the lung window rescaled to [0, 1]."""
        return tio.Compose(ct_windowing(LUNG_WINDOW))

    def train_table(self) -> tuple[Tensor, Tensor]:
        """Targets (n, 1, 2) and covariates (n, 1) of the training subjects, without reading images."""
        idx = self.splits["train"]
        return self.cohort["target"][idx], self.cohort["covariates"][idx]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        transforms = [self.intensity()] + ([tio.RandomFlip(axes=(0, 1, 2))] if hp.augment else [])
        subjects = _LesionSubjects(self.cohort, self.splits["train"], tio.Compose(transforms))
        dataset = tio.SubjectsDataset([subjects.subject(i) for i in range(len(subjects))], transform=subjects.transform)
        queue = EpochQueue(
            dataset,
            max_length=max(self.loader.batch_size, 4 * hp.samples_per_volume),
            samples_per_volume=hp.samples_per_volume,
            sampler=tio.LabelSampler(hp.patch_size, label_name="sampling_map", label_probabilities={1: 1.0}),
            subject_sampler=epoch_sampler(dataset, self.split.subset_seed, shuffle=True),
            num_workers=self.loader.num_workers,
            shuffle_subjects=False,  # the subject sampler shuffles, per epoch and rank
            shuffle_patches=True,
            start_background=False,  # read subjects only once iterated, in the order of the epoch set by then
            verbose=False,
        )
        # the queue loads in its own workers: the loader around it must not start any
        return DataLoader(
            queue,
            batch_size=self.loader.batch_size,
            sampler=_QueueEpochSampler(queue, self.split.subset_seed),
            collate_fn=collate_subjects,
            num_workers=0,
        )

    def _fixed_loader(self, name: str) -> DataLoader:
        hp = self.hparams
        subjects = _LesionSubjects(self.cohort, self.splits[name], self.intensity(), patch=hp.patch_size)
        return tio.SubjectsLoader(
            subjects,
            batch_size=self.loader.batch_size,
            sampler=epoch_sampler(subjects, self.split.subset_seed, shuffle=False),
            collate_fn=collate_subjects,
            num_workers=self.loader.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

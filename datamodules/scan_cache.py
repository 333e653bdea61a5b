"""An on-disk cache of preprocessed scans, shared by runs, loader workers and DDP ranks.

Each (scan, label map, label scheme, preprocessing) is read, checked for content and preprocessed
once, then written atomically as one small torch file under ``$RMR_CACHE/scans/``. The key hashes the
files' names, sizes and modification times with the preprocessing settings, so a changed file or
setting is never served stale. Loading maps the file (``mmap``) and builds one subject, so memory does
not grow with the cohort. A scan whose content is unusable gets a ``.bad.json`` entry instead, holding
what is wrong (no paths), so later runs report it without decoding it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.freesurfer import label_lookup, relabel
from datamodules.scan_checks import Header, brain_content, image_content, label_content, same_space
from rmr_lightning.files import atomic_torch_save, atomic_write_json

#: Bump when what an entry holds, or how it is made, changes: old entries are then never read.
CACHE_VERSION = 1

#: A problem of one scan before it is worded: (column, what is wrong).
Problem = tuple[str, str]


@dataclass(frozen=True)
class ScanSource:
    """The files of one subject and what identifies their bytes (from the header check)."""

    image: Path
    label_map: Path
    scheme: str
    fingerprint: str  # the files' names, sizes and modification times


class ScanCache:
    """Preprocessed scans on disk. ``transform`` is the deterministic preprocessing; ``settings`` identify it
    (``transform_key``); ``region_names`` give R and the FreeSurfer mapping."""

    def __init__(self, folder: Path, transform: tio.Transform, settings: str, region_names: list[str]) -> None:
        self.folder = Path(folder)
        self.transform = transform
        self.settings = settings
        self.region_names = list(region_names)
        self._lookups: dict[str, Tensor | None] = {}

    def key(self, source: ScanSource) -> str:
        text = json.dumps([CACHE_VERSION, source.fingerprint, source.scheme, self.settings, self.region_names])
        return hashlib.sha256(text.encode()).hexdigest()

    def entry(self, source: ScanSource) -> Path:
        key = self.key(source)
        return self.folder / key[:2] / f"{key}.pt"

    def status(self, source: ScanSource) -> list[Problem] | None:
        """Problems recorded for a cached scan ([] when it is usable), or None when it is not cached yet."""
        entry = self.entry(source)
        bad = entry.with_suffix(".bad.json")
        if bad.is_file():
            try:
                return [tuple(p) for p in json.loads(bad.read_text())["problems"]]
            except (OSError, ValueError, KeyError, TypeError):
                return None  # unreadable record: check the scan again
        return [] if entry.is_file() else None

    def build(self, source: ScanSource) -> list[Problem]:
        """Read, check and preprocess one scan and write its entry (or its ``.bad.json``); returns its problems."""
        problems = self._prepare(source)
        entry = self.entry(source)
        if isinstance(problems, list):
            atomic_write_json(entry.with_suffix(".bad.json"), {"version": CACHE_VERSION, "problems": problems})
            return problems
        atomic_torch_save(problems, entry)
        return []

    def _prepare(self, source: ScanSource) -> dict[str, Tensor] | list[Problem]:
        image, problems = _read(tio.ScalarImage, source.image, "image")
        labels, label_problems = _read(tio.LabelMap, source.label_map, "label_map")
        problems += label_problems
        if image is not None:
            problems += [("image", what) for what in image_content(image.data)]
        if labels is not None:
            problems += [
                ("label_map", what) for what in label_content(labels.data, len(self.region_names), source.scheme)
            ]
        if image is not None and labels is not None:
            loaded = [Header(i.spatial_shape, i.affine, 1, "") for i in (image, labels)]
            problems += [("label_map", what)] if (what := same_space(*loaded)) else []
        if problems:
            return problems
        regions = relabel(labels.data, self._lookup(source.scheme))
        if problems := [("image", what) for what in brain_content(image.data, regions)]:
            return problems
        image = tio.ScalarImage(tensor=image.data.float(), affine=image.affine)
        subject = tio.Subject(image=image, label_map=tio.LabelMap(tensor=regions.to(torch.int16), affine=labels.affine))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.transform(subject)
        except Exception as e:  # e.g. a normalisation mask that selects nothing
            return [("image", f"preprocessing failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")]
        result = [
            ("image", what) for what in brain_content(out["image"].data, out["label_map"].data, " after preprocessing")
        ]
        if result:
            return result
        small = torch.uint8 if len(self.region_names) < 256 else torch.int16
        return {
            "image": out["image"].data.float().contiguous(),
            "label_map": out["label_map"].data.to(small).contiguous(),
            "affine": torch.as_tensor(out["image"].affine, dtype=torch.float64),
        }

    def _lookup(self, scheme: str) -> Tensor | None:
        if scheme not in self._lookups:
            self._lookups[scheme] = label_lookup(scheme, self.region_names)
        return self._lookups[scheme]

    def ensure(
        self, sources: list[ScanSource], num_workers: int = 0, show_progress: bool = True
    ) -> list[list[Problem]]:
        """Build every entry not cached yet (in ``num_workers`` processes); the problems of every source."""
        found = [self.status(s) for s in sources]
        missing = [i for i, status in enumerate(found) if status is None]
        if missing:
            missing = _rotate_for_rank(missing)
            jobs = DataLoader(_BuildJobs(self, [sources[i] for i in missing]), batch_size=None, num_workers=num_workers)
            with _progress(show_progress) as progress:
                task = progress.add_task("preprocessing scans into the cache", total=len(missing))
                for k, problems in enumerate(jobs):
                    found[missing[k]] = problems
                    progress.advance(task)
        return found

    def load(self, source: ScanSource) -> dict[str, Tensor]:
        """A cached scan: image (1, X, Y, Z) float32, label_map (1, X, Y, Z), affine (4, 4); memory-mapped."""
        entry = self.entry(source)
        try:
            return torch.load(entry, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RuntimeError(
                f"cache entry {entry} is unreadable ({type(e).__name__}); delete it to rebuild it"
            ) from e


class _BuildJobs(Dataset):
    """Building cache entries as a dataset, so a DataLoader runs them in worker processes."""

    def __init__(self, cache: ScanCache, sources: list[ScanSource]) -> None:
        self.cache, self.sources = cache, sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> list[Problem]:
        source = self.sources[index]
        done = self.cache.status(source)  # another rank or run may have built it meanwhile
        return done if done is not None else self.cache.build(source)


#: Files read with nibabel, so the voxels are seen as stored: SimpleITK (TorchIO's first reader) turns NaN into 0.
_NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")


def _read(kind: type[tio.Image], path: Path, column: str) -> tuple[tio.Image | None, list[Problem]]:
    """Read an image (nibabel for NIfTI/MGH, TorchIO for DICOM); errors are summarised without the reader's
    text, which may hold DICOM tags or paths."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchIO warns with SimpleITK's text before trying NiBabel
            if path.is_file() and path.name.lower().endswith(_NIBABEL_SUFFIXES):
                volume = nib.load(path)
                voxels = np.asanyarray(volume.dataobj)
                data = torch.from_numpy(voxels.astype(voxels.dtype.newbyteorder("="), copy=True))  # native byte order
                data = data.unsqueeze(0) if data.ndim == 3 else data.movedim(-1, 0)  # (C, X, Y, Z)
                image = kind(tensor=data, affine=np.asarray(volume.affine, dtype=np.float64))
            else:
                image = kind(path)
                image.load()
    except Exception as e:
        return None, [(column, f"could not be read as an image ({type(e).__name__})")]
    if image.num_channels != 1:
        return None, [(column, f"has {image.num_channels} channels, expected 1")]
    return image, []


def _rotate_for_rank(indices: list[int]) -> list[int]:
    """Under DDP every rank builds what is missing; starting at a rank's own offset spreads the work."""
    rank, world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    start = len(indices) * rank // max(world, 1)
    return indices[start:] + indices[:start]


def _progress(show: bool) -> Progress:
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, disable=not show, transient=False)

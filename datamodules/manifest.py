"""User scans listed in a CSV manifest: fine-tune and predict on your own MRI or CT.

One row per subject. Required columns: ``subject_id`` (a pseudonym, never a patient identifier),
``image`` (a NIfTI file, or a folder holding exactly one DICOM series) and ``label_map`` (NIfTI or
DICOM, in the image's voxel space: region r of the connectome is label r, 0 is background). Then one
column per region with its follow-up value (``target_columns``, default the 84 DK84 region names of
``rmr_lightning/data/connectome_dk84/regions.csv``), optionally one baseline column per region
(``baseline_columns``), and the float covariates (``covariate_columns``, default ``age, horizon``).
Relative paths are resolved against the CSV's folder. Example header (R = 2 regions)::

    subject_id,image,label_map,age,horizon,base_Cuneus_L,base_Cuneus_R,Cuneus_L,Cuneus_R
    sub-001,scans/sub-001_t1.nii.gz,scans/sub-001_dk84.nii.gz,71.5,2.0,0.91,0.88,0.84,0.80
    sub-002,dicom/sub-002/,scans/sub-002_dk84.nii.gz,64.0,1.5,,,,

Target cells may be empty (unknown); a row whose follow-up cells are all empty is used for
prediction only. The whole manifest is validated when ``setup`` first runs, before any training,
and every problem found is reported at once in a ``ManifestError``.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
import torch
import torchio as tio
from pydicom.misc import is_dicom
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.sampling import epoch_sampler, training_subset
from datamodules.scans import CT_WINDOW, MODALITIES, collate_subjects, preprocessing

FILE_COLUMNS = ("image", "label_map")
#: Largest difference (mm, or mm per voxel) tolerated between the affines of image and label map.
AFFINE_ATOL = 1e-3
#: How many problems a ``ManifestError`` spells out; the rest are counted.
MAX_REPORTED = 20
_MISSING = {"", "na", "nan", "n/a", "none", "null"}


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` lists every problem found (one line each)."""

    def __init__(self, manifest: Path | str, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"manifest {str(manifest)!r}: {len(self.problems)} problem(s)\n{shown}{tail}")


def dk84_region_names() -> list[str]:
    """The 84 region names in connectome order (label r is region r-1)."""
    with (files("rmr_lightning") / "data" / "connectome_dk84" / "regions.csv").open(newline="") as f:
        return [row["region_name"].strip() for row in csv.DictReader(f)]


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row."""

    subject_id: str
    image: Path
    label_map: Path
    covariates: Tensor  # (C,) float32
    target: Tensor  # (R, 2) float32: [baseline, follow-up]; NaN where unknown

    @property
    def labelled(self) -> bool:
        """Has at least one follow-up value, so it can be trained or evaluated on."""
        return bool(torch.isfinite(self.target[:, 1]).any())

    def subject(self) -> tio.Subject:
        """The TorchIO subject (images are read lazily, in the loader's workers)."""
        num_regions = self.target.shape[0]
        return tio.Subject(
            image=tio.ScalarImage(self.image),
            label_map=tio.LabelMap(self.label_map),
            covariates=self.covariates.clone(),
            target=self.target.clone(),
            state=torch.full((num_regions,), float("nan")),  # no hidden state for real scans
            subject_id=self.subject_id,
        )


# ----------------------------------------------------------------------------------------- reading


def _read_csv(manifest: Path) -> pd.DataFrame:
    """All cells as stripped strings (so ``007`` stays ``007`` and empty stays empty)."""
    if not manifest.is_file():
        raise ManifestError(manifest, [f"manifest file {str(manifest)!r} does not exist"])
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(manifest, [f"not a readable CSV file ({type(e).__name__}: {_first_line(e)})"]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.apply(lambda col: col.str.strip())


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an error, short enough for a one-line problem report."""
    lines = str(error).strip().splitlines()
    return (lines[0].split(". ")[0] if lines else "")[:limit]


def _resolve(cell: str, folder: Path) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else folder / path


def _parse_float(cell: str) -> float | None:
    """The cell's number, NaN when the cell is empty, None when it is not a number."""
    if cell.lower() in _MISSING:
        return float("nan")
    try:
        return float(cell)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------ row checks

#: A problem of one row before it is worded: (column, file or None, what is wrong).
Issue = tuple[str, Path | None, str]


def _numbers(row: pd.Series, columns: list[str], required: bool) -> tuple[list[float], list[Issue]]:
    """Parse numeric cells; empty cells are NaN unless ``required`` (covariates must be finite)."""
    values, issues = [], []
    for column in columns:
        cell = row[column]
        value = _parse_float(cell)
        if value is None:
            issues.append((column, None, f"{cell[:40]!r} is not a number"))
        elif required and not math.isfinite(value):
            issues.append((column, None, "is empty" if cell.lower() in _MISSING else f"{cell!r} is not finite"))
        elif not required and math.isinf(value):
            issues.append((column, None, f"{cell!r} is not finite (leave the cell empty if unknown)"))
        values.append(float("nan") if value is None else value)
    return values, issues


def _dicom_files(path: Path) -> tuple[list[str], str | None]:
    """The DICOM files TorchIO would read for ``path`` (a series folder or one file), or why none."""
    if not path.is_dir():
        return ([str(path)] if is_dicom(path) else []), None
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if len(series) == 0:
        return [], "the folder holds no DICOM series"
    if len(series) > 1:  # TorchIO would silently read only the first one
        return [], f"the folder holds {len(series)} DICOM series; put each series in its own folder"
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])), None


def _normalise_name(value: object) -> str:
    return " ".join(str(value).replace("^", " ").split()).casefold()


def _identifies_patient(files: list[str], subject_id: str) -> bool | None:
    """Whether a DICOM header's PatientID or PatientName equals ``subject_id``; None if unreadable.

    Only compares; tag values are never returned, logged or printed.
    """
    wanted = _normalise_name(subject_id)
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
        except Exception:
            return None
        for tag in ("PatientID", "PatientName"):
            value = header.get(tag)
            if value is not None and wanted and _normalise_name(value) == wanted:
                return True
    return False


def _load(path: Path, kind: type[tio.Image], column: str, dicom: bool) -> tuple[tio.Image | None, list[Issue]]:
    """Read an image with TorchIO; DICOM errors are summarised without the reader's text (tags)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchIO warns with SimpleITK's text before trying NiBabel
            image = kind(path)
            image.load()
    except Exception as e:
        reason = _first_line(e, limit=100).replace(str(path), "the file")
        detail = type(e).__name__ if dicom else f"{type(e).__name__}: {reason}"
        what = "could not be read as a DICOM series" if dicom else "could not be read as an image"
        return None, [(column, path, f"{what} ({detail})")]
    if image.num_channels != 1:
        return None, [(column, path, f"has {image.num_channels} channels, expected 1")]
    return image, []


def _check_image(image: tio.Image, path: Path) -> list[Issue]:
    data = image.data
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        return [("image", path, "contains NaN or infinite intensities")]
    return []


def _check_labels(labels: tio.Image, path: Path, num_regions: int) -> list[Issue]:
    """Labels must be integers in 0..R with at least one brain voxel (MRI is normalised over it)."""
    data = labels.data
    if data.is_floating_point() and not bool((data == data.round()).all()):  # NaN fails too
        return [("label_map", path, "has non-integer values; a label map holds region numbers 0..R")]
    low, high = int(data.min()), int(data.max())
    issues: list[Issue] = []
    if low < 0:
        issues.append(("label_map", path, f"has negative label {low}; labels must lie in 0..{num_regions}"))
    if high > num_regions:
        what = f"has label {high} > R = {num_regions} (one region per target column); allowed: 0..{num_regions}"
        issues.append(("label_map", path, what))
    if high <= 0:
        issues.append(("label_map", path, "has no region voxels (all background)"))
    return issues


def _check_space(image: tio.Image, labels: tio.Image, label_path: Path) -> list[Issue]:
    """Image and label map must share the voxel grid: same spatial shape, affines within tolerance."""
    if image.spatial_shape != labels.spatial_shape:
        return [("label_map", label_path,
                 f"spatial shape {labels.spatial_shape} differs from the image's {image.spatial_shape}")]
    gap = float(np.abs(image.affine - labels.affine).max())
    if gap > AFFINE_ATOL:
        return [("label_map", label_path,
                 f"affine differs from the image's by up to {gap:.3g} mm (tolerance {AFFINE_ATOL}); "
                 "the label map must be in the image's voxel space")]
    return []


@dataclass
class _RowCheck:
    """Everything found about one row: the parsed row if it is usable, and its issues."""

    line: int
    subject_id: str
    identifies_patient: bool = False
    issues: list[Issue] = field(default_factory=list)
    row: ManifestRow | None = None

    def who(self) -> str:
        """How messages name the row; a row whose subject_id is a patient identifier is named by line only."""
        if self.identifies_patient or not self.subject_id:
            return f"line {self.line}"
        return f"subject_id {self.subject_id!r} (line {self.line})"

    def messages(self) -> list[str]:
        return [
            f"{self.who()}, column {column!r}" + (f", file '{file}'" if file is not None else "") + f": {what}"
            for column, file, what in self.issues
        ]


def _check_files(check: _RowCheck, paths: dict[str, Path | None], num_regions: int) -> list[Issue]:
    """Existence, DICOM pseudonym rule, readability, label values, shared space."""
    issues: list[Issue] = []
    dicom: dict[str, bool] = {}
    for column, path in paths.items():
        if path is None:
            issues.append((column, None, "is empty; give the path of a NIfTI file or DICOM folder"))
        elif not path.exists():
            issues.append((column, path, "does not exist"))
        else:
            files, why = _dicom_files(path)
            dicom[column] = bool(files) or why is not None
            if why is not None:
                issues.append((column, path, why))
            if files:
                identifies = _identifies_patient(files, check.subject_id)
                if identifies is None:
                    issues.append((column, path, "has an unreadable DICOM header"))
                elif identifies:
                    check.identifies_patient = True
                    issues.append((column, path, "subject_id equals the DICOM PatientID or PatientName; "
                                   "subject_id must be a pseudonym: replace it in the manifest"))
    if issues:
        return issues
    image, image_issues = _load(paths["image"], tio.ScalarImage, "image", dicom["image"])
    labels, label_issues = _load(paths["label_map"], tio.LabelMap, "label_map", dicom["label_map"])
    issues = image_issues + label_issues
    if image is not None:
        issues += _check_image(image, paths["image"])
    if labels is not None:
        issues += _check_labels(labels, paths["label_map"], num_regions)
    if image is not None and labels is not None:
        issues += _check_space(image, labels, paths["label_map"])
    return issues


def _check_row(
    line: int,
    row: pd.Series,
    folder: Path,
    targets: list[str],
    baselines: list[str] | None,
    covariates: list[str],
) -> _RowCheck:
    """Validate one row; the column lists hold only columns present in the header (others were reported)."""
    check = _RowCheck(line=line, subject_id=row["subject_id"])
    issues: list[Issue] = []
    if not check.subject_id:
        issues.append(("subject_id", None, "is empty"))
    paths = {c: (_resolve(row[c], folder) if row[c] else None) for c in FILE_COLUMNS}
    issues += _check_files(check, paths, len(targets))
    covariate_values, covariate_issues = _numbers(row, covariates, required=True)
    follow_up, target_issues = _numbers(row, targets, required=False)
    baseline, baseline_issues = [math.nan] * len(targets), []
    if baselines:
        baseline, baseline_issues = _numbers(row, baselines, required=False)
    issues += covariate_issues + target_issues + baseline_issues
    check.issues = issues
    if not issues:
        check.row = ManifestRow(
            subject_id=check.subject_id,
            image=paths["image"],
            label_map=paths["label_map"],
            covariates=torch.tensor(covariate_values, dtype=torch.float32),
            target=torch.tensor([baseline, follow_up], dtype=torch.float32).T.contiguous(),  # (R, 2)
        )
    return check


def _missing_columns(frame: pd.DataFrame, manifest: Path, groups: dict[str, list[str]]) -> list[str]:
    return [
        f"column {column!r} ({group}): missing from the header of {str(manifest)!r}"
        for group, columns in groups.items()
        for column in columns
        if column not in frame.columns
    ]


def _present(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in frame.columns]


def _duplicates(checks: list[_RowCheck]) -> list[str]:
    first: dict[str, _RowCheck] = {}
    problems = []
    for check in checks:
        if not check.subject_id:
            continue
        if check.subject_id in first:
            problems.append(f"{check.who()}, column 'subject_id': duplicate of line {first[check.subject_id].line}")
        else:
            first[check.subject_id] = check
    return problems


def read_manifest(
    manifest: str | Path,
    target_columns: list[str],
    baseline_columns: list[str] | None,
    covariate_columns: list[str],
    require_labels: bool,
) -> list[ManifestRow]:
    """Parse and validate a manifest; raise one ``ManifestError`` listing every problem found.

    Reads every image and label map once (TorchIO; SimpleITK for DICOM) and writes nothing.
    """
    manifest = Path(os.path.abspath(Path(manifest).expanduser()))  # rows stay valid if the cwd changes
    frame = _read_csv(manifest)
    groups = {"required": ["subject_id", *FILE_COLUMNS], "target": target_columns, "covariate": covariate_columns}
    if baseline_columns:
        groups["baseline"] = baseline_columns
    problems = _missing_columns(frame, manifest, groups)
    if any(c not in frame.columns for c in groups["required"]):
        raise ManifestError(manifest, problems)  # rows cannot be checked without their files
    if frame.empty:
        raise ManifestError(manifest, problems + ["the manifest has no rows"])
    targets, covariates = _present(frame, target_columns), _present(frame, covariate_columns)
    baselines = _present(frame, baseline_columns) if baseline_columns else None
    checks = [
        _check_row(index + 2, row, manifest.parent, targets, baselines, covariates)
        for index, row in frame.iterrows()  # line 1 is the header
    ]
    for check in checks:
        problems += check.messages()
    problems += _duplicates(checks)
    rows = [c.row for c in checks if c.row is not None]
    if require_labels and not problems and not any(r.labelled for r in rows):
        problems.append("target columns: no row has a follow-up value, so there is nothing to train on")
    if problems:
        raise ManifestError(manifest, problems)
    return rows


# ------------------------------------------------------------------------------------------ splits


def split_counts(num_subjects: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes: fractions rounded half up; training must keep at least one subject."""
    num_val, num_test = (int(num_subjects * f + 0.5) for f in (val_fraction, test_fraction))
    num_train = num_subjects - num_val - num_test
    if num_train < 1:
        raise ValueError(
            f"{num_subjects} labelled subject(s) with val_fraction={val_fraction} and test_fraction={test_fraction} "
            f"leave none for training; lower the fractions or add subjects"
        )
    return num_train, num_val, num_test


def split_subjects(
    rows: list[ManifestRow], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[ManifestRow]]:
    """Seeded split of labelled subjects; sorted by subject_id first, so row order does not matter."""
    labelled = sorted((r for r in rows if r.labelled), key=lambda r: r.subject_id)
    _, num_val, num_test = split_counts(len(labelled), val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(len(labelled)).tolist()
    shuffled = [labelled[i] for i in order]
    return {
        "test": shuffled[:num_test],
        "val": shuffled[num_test : num_test + num_val],
        "train": shuffled[num_test + num_val :],
    }


def _subset(train: list[ManifestRow], train_size: int | None, subset_seed: int) -> list[ManifestRow]:
    """``train_size`` of the training rows (ordered by subject_id, so the draw ignores row order)."""
    if train_size is not None and not 1 <= train_size <= len(train):
        raise ValueError(f"train_size {train_size} is not within the {len(train)} subjects of the training split (1..{len(train)})")
    ordered = sorted(train, key=lambda r: r.subject_id)
    return [ordered[i] for i in training_subset(len(ordered), train_size, subset_seed)]


class PreprocessedSubjects(Dataset):
    """Subjects read and preprocessed once, then served from memory. The manifest's preprocessing is
    deterministic, so repeating it every epoch (decompressing NIfTI, resampling) costs only time: 400
    steps on 1 mm nodule patches took ~105 s per run without this cache. With loader workers each worker
    keeps the subjects it has served (the workers persist across epochs)."""

    def __init__(self, subjects: tio.SubjectsDataset) -> None:
        self.subjects = subjects
        self.cache: dict[int, tio.Subject] = {}

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> tio.Subject:
        if index not in self.cache:
            self.cache[index] = self.subjects[index]
        return self.cache[index]


# ------------------------------------------------------------------------------------- datamodule


class ManifestDataModule(L.LightningDataModule):
    """Scans listed in a CSV manifest (see the module docstring), as ``ScanBatch`` batches.

    Args:
        manifest: CSV of subjects to train, validate and test on (split by ``seed``).
        predict_manifest: CSV of subjects to predict; default ``manifest`` (all its rows).
        spacing: isotropic voxel size (mm) after resampling.
        shape: voxels per axis after crop/pad, in TorchIO's (x, y, z) = RAS order.
        modality: "mri" (z-score over the head foreground) or "ct" (Hounsfield window to [0, 1]).
        ct_window: (low, high) Hounsfield units mapped to [0, 1] for CT.
        target_columns: follow-up value per region, in region order (label r = column r-1);
            default the 84 DK84 region names. R = len(target_columns).
        baseline_columns: baseline value per region, same order; absent -> baseline is NaN.
        covariate_columns: float covariates, in this order in ``ScanBatch.covariates``.
        val_fraction: share of labelled subjects for validation (rounded; 0 -> no validation).
        test_fraction: share of labelled subjects for testing.
        seed: seed of the split.
        train_size: train on this many of the training split's subjects, drawn with ``subset_seed``
            (None: all); ``rmr-study`` sets both, so the sample-efficiency study runs on your scans too,
            with the validation and test subjects fixed by ``seed``.
        batch_size: subjects per batch.
        num_workers: DataLoader worker processes (reading and resampling run there).
        cache: keep each preprocessed subject in memory after its first read (about 12 bytes per voxel of
            ``shape``: 1.5 MB for a 4 mm brain, 0.4 MB for a 32^3 patch); false re-reads the files every epoch.
    """

    def __init__(
        self,
        manifest: str,
        predict_manifest: str | None = None,
        spacing: float = 4.0,
        shape: tuple[int, int, int] = (40, 48, 40),
        modality: str = "mri",
        ct_window: tuple[float, float] = CT_WINDOW,
        target_columns: list[str] | None = None,
        baseline_columns: list[str] | None = None,
        covariate_columns: list[str] = ["age", "horizon"],  # noqa: B006 (copied, never mutated)
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        train_size: int | None = None,
        subset_seed: int = 0,
        batch_size: int = 4,
        num_workers: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self._targets = list(target_columns) if target_columns is not None else dk84_region_names()
        self._baselines = list(baseline_columns) if baseline_columns is not None else None
        self._covariates = list(covariate_columns)
        _check_arguments(
            self._targets, self._baselines, self._covariates, modality, shape, val_fraction, test_fraction, batch_size
        )
        self.save_hyperparameters()
        # preprocessing() copies the image's affine onto the label map: validation accepted it within AFFINE_ATOL
        self.transform = preprocessing(spacing, shape, modality, tuple(ct_window))
        self.rows: dict[str, list[ManifestRow]] = {}  # split name -> rows
        self.datasets: dict[str, tio.SubjectsDataset] = {}

    @property
    def region_names(self) -> list[str]:
        return list(self._targets)

    @property
    def num_regions(self) -> int:
        return len(self._targets)

    @property
    def covariate_names(self) -> list[str]:
        return list(self._covariates)

    @property
    def splits(self) -> dict[str, list[str]]:
        """Subject ids per split (train, val, test, predict) after ``setup``."""
        return {name: [r.subject_id for r in rows] for name, rows in self.rows.items()}

    def _read(self, manifest: str, require_labels: bool) -> list[ManifestRow]:
        return read_manifest(manifest, self._targets, self._baselines, self._covariates, require_labels)

    def setup(self, stage: str | None = None) -> None:
        """Validate and split; idempotent. Fitting also validates the predict manifest, before training."""
        hp = self.hparams
        needs_fit = stage in (None, "fit", "validate", "test")
        needs_predict = stage in (None, "fit", "predict")
        if needs_fit and "train" not in self.rows:
            rows = self._read(hp.manifest, require_labels=True)
            try:
                split = split_subjects(rows, hp.val_fraction, hp.test_fraction, hp.seed)
                split["train"] = _subset(split["train"], hp.train_size, hp.subset_seed)
            except ValueError as e:
                raise ManifestError(hp.manifest, [str(e)]) from None
            self._store(split)
            if hp.predict_manifest is None:
                self._store({"predict": rows})
        if needs_predict and "predict" not in self.rows:
            self._store({"predict": self._read(hp.predict_manifest or hp.manifest, require_labels=False)})

    def train_table(self) -> tuple[Tensor, Tensor]:
        """Targets (n, R, 2) and covariates (n, C) of the training subjects, from the CSV alone."""
        rows = self.rows["train"]
        return torch.stack([r.target for r in rows]), torch.stack([r.covariates for r in rows])

    def _store(self, split: dict[str, list[ManifestRow]]) -> None:
        for name, rows in split.items():
            self.rows[name] = rows
            if rows:  # TorchIO refuses empty datasets; empty val/test splits have no loader
                subjects = tio.SubjectsDataset([r.subject() for r in rows], transform=self.transform)
                self.datasets[name] = PreprocessedSubjects(subjects) if self.hparams.cache else subjects

    def _loader(self, name: str, shuffle: bool = False) -> tio.SubjectsLoader:
        workers = self.hparams.num_workers
        return tio.SubjectsLoader(
            self.datasets[name],
            batch_size=self.hparams.batch_size,
            sampler=epoch_sampler(self.datasets[name], self.hparams.seed, shuffle=shuffle),
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_subjects,
        )

    def train_dataloader(self) -> tio.SubjectsLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> tio.SubjectsLoader | list:
        return self._loader("val") if self.rows["val"] else []

    def test_dataloader(self) -> tio.SubjectsLoader | list:
        return self._loader("test") if self.rows["test"] else []

    def predict_dataloader(self) -> tio.SubjectsLoader:
        return self._loader("predict")


def _check_arguments(
    targets: list[str],
    baselines: list[str] | None,
    covariates: list[str],
    modality: str,
    shape: tuple[int, int, int],
    val_fraction: float,
    test_fraction: float,
    batch_size: int,
) -> None:
    """Configuration errors, raised at construction (before any file is read)."""
    if not targets:
        raise ValueError("target_columns must name at least one region")
    if baselines is not None and len(baselines) != len(targets):
        raise ValueError(f"baseline_columns has {len(baselines)} names, target_columns {len(targets)}: one per region")
    named = {"target_columns": targets, "baseline_columns": baselines or [], "covariate_columns": covariates}
    for name, columns in named.items():
        if len(set(columns)) != len(columns):
            raise ValueError(f"{name} has duplicate names")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts, got {shape}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need val_fraction, test_fraction >= 0 with sum < 1, got {val_fraction}, {test_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

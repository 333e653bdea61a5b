"""User scans listed in a CSV manifest: fine-tune and predict on your own MRI or CT.

One row per subject. Required columns: ``subject_id`` (a pseudonym, never a patient identifier),
``image`` (a NIfTI file, or a folder holding exactly one DICOM series) and ``label_map`` (NIfTI or
DICOM, in the image's voxel space: region r of the connectome is label r, 0 is background). Then one
column per region with its follow-up value (``columns.targets``, default the 84 DK84 region names of
``rmr_lightning/data/connectome_dk84/regions.csv``), optionally one baseline column per region
(``columns.baselines``), and the float covariates (``columns.covariates``, default ``age, horizon``).
Relative paths are resolved against the CSV's folder. Example header (R = 2 regions)::

    subject_id,image,label_map,age,horizon,base_Cuneus_L,base_Cuneus_R,Cuneus_L,Cuneus_R
    sub-001,scans/sub-001_t1.nii.gz,scans/sub-001_dk84.nii.gz,71.5,2.0,0.91,0.88,0.84,0.80
    sub-002,dicom/sub-002/,scans/sub-002_dk84.nii.gz,64.0,1.5,,,,

Target cells may be empty (unknown); a row whose follow-up cells are all empty is used for
prediction only. An optional ``split`` column (train, val or test per labelled row) fixes the split;
without it subjects are split at random by ``seed``. The whole manifest is validated when ``setup`` first
runs, before any training, and every problem found is reported at once in a ``ManifestError``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import pydicom
import torch
import torchio as tio
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.configs import LoaderConfig, as_config, plain
from datamodules.freesurfer import LABEL_SCHEMES, scheme_absent
from datamodules.sampling import epoch_sampler, seeded_loader, training_subset
from datamodules.scan_cache import ScanCache, ScanSource
from datamodules.scan_checks import Header, dicom_files, dicom_fingerprint, dicom_problems, same_space, volume_header
from datamodules.scans import (
    CT_WINDOW,
    MODALITIES,
    ScanBatch,
    augment_training_batch,
    collate_subjects,
    default_cache_dir,
    preprocessing,
    transform_key,
)
from rmr_lightning.files import atomic_write_csv

FILE_COLUMNS = ("image", "label_map")
SPLITS = ("", "train", "val", "test")  # "": drawn at random by seed
COVARIATE_COLUMNS = ("age", "horizon")
#: The report of subjects left out with ``on_bad_subject: skip``, in the run folder.
BAD_SUBJECTS_FILE = "bad_subjects.csv"
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
    source: ScanSource  # image, label map, label scheme and the files' fingerprint
    covariates: Tensor  # (C,) float32
    target: Tensor  # (R, 2) float32: [baseline, follow-up]; NaN where unknown
    split: str = ""  # train, val or test from the manifest's optional split column; "" to be drawn

    @property
    def labelled(self) -> bool:
        """Has at least one follow-up value, so it can be trained or evaluated on."""
        return bool(torch.isfinite(self.target[:, 1]).any())

    @property
    def image(self) -> Path:
        return self.source.image

    @property
    def label_map(self) -> Path:
        return self.source.label_map


# ----------------------------------------------------------------------------------------- reading


def _read_csv(manifest: Path) -> pd.DataFrame:
    """All cells as stripped strings (so ``007`` stays ``007`` and empty stays empty), indexed by the line
    each row starts on; a row with more or fewer cells than the header, or a repeated column, is refused."""
    if not manifest.is_file():
        raise ManifestError(manifest, [f"manifest file {str(manifest)!r} does not exist"])
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(manifest, [f"not UTF-8 text (byte {e.start}); save the CSV as UTF-8"]) from None
    if "\x00" in text:
        raise ManifestError(manifest, ["holds NUL bytes: not a CSV text file"])
    reader = csv.reader(io.StringIO(text, newline=""))
    records, lines = [], []
    try:
        for record in reader:
            if record:  # blank lines are skipped
                records.append([cell.strip() for cell in record])
                lines.append(reader.line_num)
    except csv.Error as e:
        raise ManifestError(manifest, [f"not a readable CSV file (line {reader.line_num}: {e})"]) from None
    if not records:
        raise ManifestError(manifest, ["the file is empty: no header"])
    header, body = records[0], records[1:]
    problems = [
        f"column {c!r} appears {header.count(c)} times in the header"
        for c in sorted(set(header))
        if header.count(c) > 1
    ]
    problems += [
        f"line {line}: {len(r)} cells, the header has {len(header)}"
        for line, r in zip(lines[1:], body, strict=False)
        if len(r) != len(header)
    ]
    if problems:
        raise ManifestError(manifest, problems)
    return pd.DataFrame(body, columns=header, index=lines[1:], dtype=str)


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
        """For the console: full paths."""
        return [
            f"{self.who()}, column {column!r}" + (f", file '{file}'" if file is not None else "") + f": {what}"
            for column, file, what in self.issues
        ]

    def records(self, folder: Path | None = None) -> list[dict[str, str]]:
        """For files we write: the subject by pseudonym (or line); with ``folder``, files relative to it. A run's
        own report names no file (folder names often hold patient names; subject and column locate it)."""
        name = "" if self.identifies_patient else self.subject_id
        return [
            {"line": str(self.line), "subject_id": name, "column": column}
            | ({"file": _relative(file, folder)} if folder is not None else {})
            | {"problem": what}
            for column, file, what in self.issues
        ]


def _relative(file: Path | None, folder: Path) -> str:
    if file is None:
        return ""
    try:
        return os.path.relpath(file, folder)
    except ValueError:  # another drive (Windows)
        return file.name


def _file_header(column: str, path: Path, check: _RowCheck) -> tuple[Header | None, list[Issue]]:
    """Header-level checks of one file: NIfTI/MGH sizes, DICOM slices and the pseudonym rule."""
    files, why = dicom_files(path)
    if why is not None:
        return None, [(column, path, why)]
    if not files:
        header, problems = volume_header(path)
        return header, [(column, path, p) for p in problems]
    issues = [(column, path, p) for p in dicom_problems(path, files)]
    identifies = _identifies_patient(files, check.subject_id)
    if identifies is None:
        issues.append((column, path, "has an unreadable DICOM header"))
    elif identifies:
        check.identifies_patient = True
        issues.append(
            (
                column,
                path,
                "subject_id equals the DICOM PatientID or PatientName; "
                "subject_id must be a pseudonym: replace it in the manifest",
            )
        )
    return Header((0, 0, 0), np.eye(4), 1, dicom_fingerprint(files)), issues  # space checked when read


def _check_files(check: _RowCheck, paths: dict[str, Path | None]) -> tuple[str, list[Issue]]:
    """Existence and headers of the row's files; returns the files' fingerprint and the issues."""
    issues: list[Issue] = []
    headers: dict[str, Header] = {}
    for column, path in paths.items():
        if path is None:
            issues.append((column, None, "is empty; give the path of a NIfTI/MGH file or DICOM folder"))
        elif not path.exists():
            issues.append((column, path, "does not exist"))
        else:
            header, found = _file_header(column, path, check)
            issues += found
            if header is not None:
                headers[column] = header
    image, labels = headers.get("image"), headers.get("label_map")
    comparable = not issues and image is not None and labels is not None and image.shape != (0, 0, 0) != labels.shape
    if comparable and (what := same_space(image, labels)) is not None:
        issues.append(("label_map", paths["label_map"], what))
    return "\n".join(h.fingerprint for h in headers.values()), issues


def _check_row(line: int, row: pd.Series, folder: Path, columns: _Columns, default_scheme: str) -> _RowCheck:
    """Validate one row from its cells and its files' headers (no voxel is decoded here)."""
    check = _RowCheck(line=line, subject_id=row["subject_id"])
    issues: list[Issue] = [] if check.subject_id else [("subject_id", None, "is empty")]
    scheme = row.get("label_scheme", "") or default_scheme
    if scheme not in LABEL_SCHEMES:
        issues.append(("label_scheme", None, f"{scheme[:40]!r} is not one of {list(LABEL_SCHEMES)}"))
    split = row.get("split", "") or ""
    if split not in SPLITS:
        issues.append(("split", None, f"{split[:40]!r} is not one of train, val, test (or empty)"))
    paths = {c: (_resolve(row[c], folder) if row[c] else None) for c in FILE_COLUMNS}
    fingerprint, file_issues = _check_files(check, paths)
    covariate_values, covariate_issues = _numbers(row, columns.covariates, required=True)
    follow_up, target_issues = _numbers(row, columns.targets, required=False)
    baseline, baseline_issues = [math.nan] * len(columns.targets), []
    if columns.baselines:
        baseline, baseline_issues = _numbers(row, columns.baselines, required=False)
    check.issues = issues + file_issues + covariate_issues + target_issues + baseline_issues
    if not check.issues:
        check.row = ManifestRow(
            subject_id=check.subject_id,
            source=ScanSource(paths["image"], paths["label_map"], scheme, fingerprint),
            covariates=torch.tensor(covariate_values, dtype=torch.float32),
            target=torch.tensor([baseline, follow_up], dtype=torch.float32).T.contiguous(),  # (R, 2)
            split=split,
        )
    return check


@dataclass(frozen=True)
class _Columns:
    """The manifest's columns by role (only those present in the header; the rest were reported)."""

    targets: list[str]
    baselines: list[str] | None
    covariates: list[str]


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


def _baseline_columns(frame: pd.DataFrame, targets: list[str], baselines: list[str] | None) -> list[str] | None:
    """The baseline columns: as configured, else ``base_<region>`` when the header has one for every region
    (as ``rmr-data bids`` writes them), else none."""
    if baselines is not None:
        return baselines
    auto = [f"base_{t}" for t in targets]
    return auto if all(c in frame.columns for c in auto) else None


def read_manifest(
    manifest: str | Path,
    target_columns: list[str],
    baseline_columns: list[str] | None,
    covariate_columns: list[str],
    label_scheme: str = "dk84",
) -> tuple[list[_RowCheck], list[str]]:
    """Parse a manifest and check every row from its cells and file headers (seconds for 10,000 rows).

    Returns the row checks and the problems of the manifest as a whole; writes nothing.
    """
    manifest = Path(os.path.abspath(Path(manifest).expanduser()))  # rows stay valid if the cwd changes
    frame = _read_csv(manifest)
    baseline_columns = _baseline_columns(frame, target_columns, baseline_columns)
    groups = {"required": ["subject_id", *FILE_COLUMNS], "target": target_columns, "covariate": covariate_columns}
    if baseline_columns:
        groups["baseline"] = baseline_columns
    problems = _missing_columns(frame, manifest, groups)
    if any(c not in frame.columns for c in groups["required"]):
        raise ManifestError(manifest, problems)  # rows cannot be checked without their files
    if frame.empty:
        raise ManifestError(manifest, problems + ["the manifest has no rows"])
    baselines = _present(frame, baseline_columns) if baseline_columns else None
    columns = _Columns(_present(frame, target_columns), baselines, _present(frame, covariate_columns))
    checks = [
        _check_row(int(line), row, manifest.parent, columns, label_scheme)
        for line, row in frame.iterrows()  # indexed by line in the file
    ]
    return checks, problems + _duplicates(checks)


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
    """Seeded split of labelled subjects; sorted by subject_id first, so row order does not matter. A manifest
    with a ``split`` column (a predefined split: a held-out site, a published test set) is split by it instead,
    and the fractions are not used."""
    labelled = sorted((r for r in rows if r.labelled), key=lambda r: r.subject_id)
    if any(r.split for r in labelled):
        unassigned = [r.subject_id for r in labelled if not r.split]
        if unassigned:
            raise ValueError(
                f"the split column is empty for {len(unassigned)} labelled subject(s) ({', '.join(unassigned[:5])}"
                f"{', ...' if len(unassigned) > 5 else ''}): give every labelled row train, val or test, or none"
            )
        given = {name: [r for r in labelled if r.split == name] for name in ("test", "val", "train")}
        if not given["train"]:
            raise ValueError("the split column names no training subject")
        return given
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
        raise ValueError(
            f"train_size {train_size} is not within the {len(train)} subjects of the training split (1..{len(train)})"
        )
    ordered = sorted(train, key=lambda r: r.subject_id)
    return [ordered[i] for i in training_subset(len(ordered), train_size, subset_seed)]


class CachedScans(Dataset):
    """Subjects served from the scan cache: each item maps one small file, so memory stays flat however many
    subjects the manifest lists, and loader workers and ranks share the preprocessing done once."""

    def __init__(self, rows: list[ManifestRow], cache: ScanCache) -> None:
        self.rows, self.cache = rows, cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tio.Subject:
        row = self.rows[index]
        scan = self.cache.load(row.source)
        affine = scan["affine"].numpy()
        return tio.Subject(
            image=tio.ScalarImage(tensor=scan["image"], affine=affine),
            label_map=tio.LabelMap(tensor=scan["label_map"], affine=affine),
            covariates=row.covariates,
            target=row.target,
            state=torch.full((row.target.shape[0],), float("nan")),  # no hidden state for real scans
            subject_id=row.subject_id,
        )


# ------------------------------------------------------------------------------------- datamodule


@dataclass(frozen=True)
class ColumnsConfig:
    """What the manifest's columns hold.

    Args:
        targets: follow-up value per region, in region order (label r = column r-1); default the 84 DK84
            region names. R = len(targets).
        baselines: baseline value per region, same order; default ``base_<region>`` when the manifest has
            all of them (as ``rmr-data bids`` writes), else none (baseline NaN).
        covariates: float covariates, in this order in ``ScanBatch.covariates``.
        label_scheme: numbering of the label maps: ``dk84`` (label r is region r), ``aparc+aseg``
            (FreeSurfer) or ``aparc.DKTatlas+aseg`` (FastSurfer); a ``label_scheme`` column overrides it per row.
    """

    targets: list[str] | None = None
    baselines: list[str] | None = None
    covariates: list[str] = field(default_factory=lambda: list(COVARIATE_COLUMNS))
    label_scheme: str = "dk84"


@dataclass(frozen=True)
class ManifestSplitConfig:
    """How the labelled subjects are split.

    Args:
        val_fraction: share of labelled subjects for validation (rounded; 0 -> no validation).
        test_fraction: share of labelled subjects for testing.
        seed: seed of the split (and of the shuffling of training).
        train_size: train on this many of the training split's subjects, drawn with ``subset_seed``
            (None: all); ``rmr-study`` sets both, with the validation and test subjects fixed by ``seed``.
        subset_seed: seed of the training subset (and of the augmentation).
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    train_size: int | None = None
    subset_seed: int = 0


_COLUMNS, _SPLIT, _LOADER = ColumnsConfig(), ManifestSplitConfig(), LoaderConfig(batch_size=4)


class ManifestDataModule(L.LightningDataModule):
    """Scans listed in a CSV manifest (see the module docstring), as ``ScanBatch`` batches.

    ``setup`` checks every row from its cells and file headers, then makes sure every scan is in the
    preprocessing cache, checking its voxels as it enters; a bad subject stops the run with every
    problem listed, or with ``on_bad_subject: skip`` is left out and listed in ``bad_subjects.csv``.

    Args:
        manifest: CSV of subjects to train, validate and test on (split by ``split.seed``).
        predict_manifest: CSV of subjects to predict; default ``manifest`` (all its rows).
        spacing: isotropic voxel size (mm) after resampling.
        shape: voxels per axis after crop/pad, in TorchIO's (x, y, z) = RAS order.
        modality: "mri" (z-score over the head foreground) or "ct" (Hounsfield window to [0, 1]).
        ct_window: (low, high) Hounsfield units mapped to [0, 1] for CT.
        columns: ``ColumnsConfig`` (target, baseline and covariate columns, default label scheme).
        on_bad_subject: ``error`` (stop, listing every problem) or ``skip`` (leave bad subjects out, list
            them in ``<default_root_dir>/bad_subjects.csv``, and go on).
        split: ``ManifestSplitConfig`` (validation and test fractions, their seed, the training subset).
        loader: ``LoaderConfig``; its ``num_workers`` also preprocess scans into the cache.
        augment: a random gain and noise level per training subject, on the device (as the phantoms);
            after the cache, so it changes no cached scan.
        cache_dir: the preprocessing cache (default ``$RMR_CACHE``, else ~/.cache/rmr_lightning), shared
            by runs, workers and ranks; about 5 bytes per voxel of ``shape`` per scan.

    ``columns``, ``split`` and ``loader`` take the dataclass or a dict of the fields to change; ``hparams``
    holds them as dicts, the attributes of the same name as dataclasses.
    """

    def __init__(
        self,
        manifest: str,
        predict_manifest: str | None = None,
        spacing: float = 4.0,
        shape: tuple[int, int, int] = (40, 48, 40),
        modality: str = "mri",
        ct_window: tuple[float, float] = CT_WINDOW,
        columns: ColumnsConfig | None = _COLUMNS,
        on_bad_subject: Literal["error", "skip"] = "error",
        split: ManifestSplitConfig | None = _SPLIT,
        loader: LoaderConfig | None = _LOADER,
        augment: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.columns = as_config(ColumnsConfig, columns, _COLUMNS)
        self.split = as_config(ManifestSplitConfig, split, _SPLIT)
        self.loader = as_config(LoaderConfig, loader, _LOADER)
        cols = self.columns
        self._targets = list(cols.targets) if cols.targets is not None else dk84_region_names()
        self._baselines = list(cols.baselines) if cols.baselines is not None else None
        self._covariates = list(cols.covariates)
        _check_arguments(self._targets, self._baselines, self._covariates, modality, shape, self.split, self.loader)
        if cols.label_scheme not in LABEL_SCHEMES or on_bad_subject not in ("error", "skip"):
            raise ValueError(
                f"label_scheme must be one of {LABEL_SCHEMES} and on_bad_subject 'error' or 'skip', "
                f"got {cols.label_scheme!r}, {on_bad_subject!r}"
            )
        self.save_hyperparameters()
        for key in ("columns", "split", "loader"):  # plain dicts: checkpoints are read with weights_only=True
            self.hparams[key] = plain(getattr(self, key))
        # preprocessing() copies the image's affine onto the label map: validation accepted it within AFFINE_ATOL
        self.transform = preprocessing(spacing, shape, modality, tuple(ct_window))
        folder = Path(cache_dir) if cache_dir else default_cache_dir() / "scans"
        self.cache = ScanCache(folder, self.transform, transform_key(self.transform), self._targets)
        self.rows: dict[str, list[ManifestRow]] = {}  # split name -> rows
        self.datasets: dict[str, CachedScans] = {}
        self.bad_subjects: list[dict[str, str]] = []  # rows left out with on_bad_subject: skip

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

    def inspect(self, manifest: str, show_progress: bool = True) -> tuple[list[_RowCheck], list[str]]:
        """Every check of a manifest, headers and then voxels (as scans enter the cache); nothing raised.
        Returns the row checks (usable rows have ``row`` set) and the manifest-wide problems."""
        checks, problems = read_manifest(
            manifest, self._targets, self._baselines, self._covariates, self.columns.label_scheme
        )
        usable = [c for c in checks if c.row is not None]
        found = self.cache.ensure([c.row.source for c in usable], self.loader.num_workers, show_progress)
        for check, scan_problems in zip(usable, found, strict=True):
            if scan_problems:
                files = {"image": check.row.image, "label_map": check.row.label_map}
                check.issues += [(column, files.get(column), what) for column, what in scan_problems]
                check.row = None
        return checks, problems

    def _read(self, manifest: str, require_labels: bool) -> list[ManifestRow]:
        """Validated rows; raise one ``ManifestError`` listing every problem, unless bad subjects are skipped."""
        checks, problems = self.inspect(manifest, show_progress=_is_rank_zero())
        bad = [c for c in checks if c.issues]
        if bad and self.hparams.on_bad_subject == "error":
            problems = problems + [m for c in bad for m in c.messages()]
        rows = [c.row for c in checks if c.row is not None]
        if require_labels and not problems and not any(r.labelled for r in rows):
            problems.append("target columns: no usable row has a follow-up value, so there is nothing to train on")
        if problems:
            raise ManifestError(manifest, problems)
        if bad:
            self.bad_subjects += [record for c in bad for record in c.records()]
            rank_zero_warn(
                f"{len(bad)} subject(s) of {manifest} left out (on_bad_subject: skip):\n"
                + "\n".join(m for c in bad for m in c.messages()[:1])
            )
            self._write_report()
        _warn_absent(rows, self._targets)
        return rows

    def _write_report(self) -> None:
        """``bad_subjects.csv`` in the run folder: line, pseudonym, column and problem; no paths."""
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero and self.bad_subjects:
            atomic_write_csv(Path(trainer.default_root_dir) / BAD_SUBJECTS_FILE, pd.DataFrame(self.bad_subjects))

    def setup(self, stage: str | None = None) -> None:
        """Validate and split; idempotent. Fitting also validates the predict manifest, before training."""
        hp, config = self.hparams, self.split
        needs_fit = stage in (None, "fit", "validate", "test")
        needs_predict = stage in (None, "fit", "predict")
        if needs_fit and "train" not in self.rows:
            rows = self._read(hp.manifest, require_labels=True)
            try:
                split = split_subjects(rows, config.val_fraction, config.test_fraction, config.seed)
                split["train"] = _subset(split["train"], config.train_size, config.subset_seed)
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
            if rows:  # empty val/test splits have no loader
                self.datasets[name] = CachedScans(rows, self.cache)

    def _loader(self, name: str, shuffle: bool = False) -> tio.SubjectsLoader:
        sampler = epoch_sampler(self.datasets[name], self.split.seed, shuffle=shuffle)
        return seeded_loader(self.datasets[name], self.loader, sampler, collate_subjects, tio.SubjectsLoader)

    def train_dataloader(self) -> tio.SubjectsLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> tio.SubjectsLoader | list:
        return self._loader("val") if self.rows["val"] else []

    def test_dataloader(self) -> tio.SubjectsLoader | list:
        return self._loader("test") if self.rows["test"] else []

    def predict_dataloader(self) -> tio.SubjectsLoader:
        return self._loader("predict")

    def on_after_batch_transfer(self, batch: ScanBatch, dataloader_idx: int) -> ScanBatch:
        """Intensity augmentation on the device (training only): a random gain and noise level per subject."""
        return augment_training_batch(self, batch)


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _warn_absent(rows: list[ManifestRow], regions: list[str]) -> None:
    """Say once which regions a label scheme never labels (FastSurfer's DKT atlas lacks six DK regions)."""
    for scheme in sorted({r.source.scheme for r in rows}):
        absent = scheme_absent(scheme, regions)
        if absent:
            rank_zero_warn(
                f"label scheme {scheme} does not label {', '.join(absent)}: these regions are absent from "
                "its label maps and are predicted without image evidence (flagged in predictions.csv)"
            )


def _check_arguments(
    targets: list[str],
    baselines: list[str] | None,
    covariates: list[str],
    modality: str,
    shape: tuple[int, int, int],
    split: ManifestSplitConfig,
    loader: LoaderConfig,
) -> None:
    """Configuration errors, raised at construction (before any file is read)."""
    if not targets:
        raise ValueError("columns.targets must name at least one region")
    if baselines is not None and len(baselines) != len(targets):
        raise ValueError(
            f"columns.baselines has {len(baselines)} names, columns.targets {len(targets)}: one per region"
        )
    named = {"columns.targets": targets, "columns.baselines": baselines or [], "columns.covariates": covariates}
    for name, columns in named.items():
        if len(set(columns)) != len(columns):
            raise ValueError(f"{name} has duplicate names")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts, got {shape}")
    val, test = split.val_fraction, split.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"need val_fraction, test_fraction >= 0 with sum < 1, got {val}, {test}")
    if loader.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {loader.batch_size}")

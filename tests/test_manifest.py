"""ManifestDataModule on real files: nibabel's and pydicom's test scans plus small NIfTI files written here."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
import torchio as tio
from jsonargparse import ArgumentParser

import datamodules.manifest as manifest_module
from datamodules.configs import LoaderConfig
from datamodules.manifest import ManifestDataModule, ManifestError, ManifestSplitConfig
from datamodules.scan_cache import ScanCache
from datamodules.scans import ScanBatch

REGIONS = ["reg_a", "reg_b", "reg_c"]
BASELINES = ["base_a", "base_b", "base_c"]
SMALL = {"columns": {"targets": REGIONS}, "spacing": 4.0, "shape": (6, 6, 4), "loader": {"batch_size": 2}}
GRID = (12, 10, 8)  # voxels of the synthetic scans, 2 mm isotropic
AFFINE = np.array([[2.0, 0, 0, -12], [0, 2.0, 0, -10], [0, 0, 2.0, -8], [0, 0, 0, 1]])


# ------------------------------------------------------------------------------------------ files


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def slab_labels(shape: tuple[int, ...], num_regions: int = 3) -> np.ndarray:
    """Regions 1..R as slabs along x inside a central box; background around it."""
    labels = np.zeros(shape, dtype=np.int16)
    x0, x1 = shape[0] // 6, shape[0] - shape[0] // 6
    box = tuple(slice(s // 6, s - s // 6) if s > 2 else slice(None) for s in shape[1:])
    for r, xs in enumerate(np.array_split(np.arange(x0, x1), num_regions), start=1):
        labels[(slice(xs[0], xs[-1] + 1), *box)] = r
    return labels


def write_manifest(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    columns = [c for c in rows[0] if c not in drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_row(folder: Path, index: int) -> dict:
    """One subject: a random 2 mm NIfTI scan, its slab label map, covariates and targets."""
    sid = f"sub-{index:02d}"
    rng = np.random.default_rng(index)
    write_nifti(folder / "scans" / f"{sid}_t1.nii.gz", rng.normal(100 + 10 * index, 20, GRID).astype(np.float32))
    write_nifti(folder / "scans" / f"{sid}_dk.nii.gz", slab_labels(GRID))
    row = {"subject_id": sid, "image": f"scans/{sid}_t1.nii.gz", "label_map": f"scans/{sid}_dk.nii.gz"}
    row |= {"age": 60.0 + index, "horizon": 1.0 + index / 2}
    row |= {b: round(index + 0.01 * (k + 1), 3) for k, b in enumerate(BASELINES)}
    row |= {r: round(index + 0.1 * (k + 1), 3) for k, r in enumerate(REGIONS)}
    return row


@pytest.fixture
def cohort(tmp_path):
    """Factory: ``cohort(n)`` -> (study folder, rows) with n synthetic subjects."""

    def make(n: int) -> tuple[Path, list[dict]]:
        folder = tmp_path / "study"
        return folder, [synthetic_row(folder, i) for i in range(n)]

    return make


def dicom_case(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A pydicom test file as a one-file series folder, and a NIfTI label map in its exact space."""
    folder = tmp_path / f"series_{name[:2].lower()}"
    folder.mkdir()
    shutil.copy(pydicom.data.get_testdata_file(name), folder / "slice0001.dcm")
    image = tio.ScalarImage(folder)
    labels = torch.as_tensor(slab_labels(image.spatial_shape))[None]  # (1, W, H, D)
    label_path = tmp_path / f"labels_{name[:2].lower()}.nii.gz"
    tio.LabelMap(tensor=labels, affine=image.affine).save(label_path)
    return folder, label_path


def anatomical_case(tmp_path: Path) -> tuple[Path, Path]:
    """nibabel's anatomical.nii (33 x 41 x 25, 2 mm) and a label map in its space."""
    path = Path(nibabel.testing.data_path) / "anatomical.nii"
    header = nib.load(path)
    return path, write_nifti(tmp_path / "anatomical_labels.nii.gz", slab_labels(header.shape), header.affine)


def scan_row(sid: str, image: Path, labels: Path) -> dict:
    return {
        "subject_id": sid,
        "image": str(image),
        "label_map": str(labels),
        "age": 70,
        "horizon": 2,
        "reg_a": 1.0,
        "reg_b": 2.0,
        "reg_c": 3.0,
    }


def files_under(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def setup_error(manifest: Path, **kwargs) -> str:
    """The ManifestError message of ``setup('fit')``."""
    dm = ManifestDataModule(str(manifest), **(SMALL | kwargs))
    with pytest.raises(ManifestError) as info:
        dm.setup("fit")
    return str(info.value)


# ------------------------------------------------------------------------------------ construction


def test_defaults_are_the_dk84_regions_and_parse_from_the_cli():
    dm = ManifestDataModule("unused.csv")
    assert dm.num_regions == 84 and len(dm.region_names) == 84
    assert dm.region_names[0] == "Bankssts_L"
    assert dm.covariate_names == ["age", "horizon"]
    assert dm.split == ManifestSplitConfig() and dm.loader == LoaderConfig(batch_size=4)
    parser = ArgumentParser()
    parser.add_class_arguments(ManifestDataModule, "data")
    cfg = parser.parse_args(
        ["--data.manifest=m.csv", "--data.shape=[8, 8, 8]", "--data.columns.targets=[a, b]", "--data.split.seed=3"]
    )
    assert tuple(cfg.data.shape) == (8, 8, 8) and cfg.data.columns.targets == ["a", "b"]
    assert cfg.data.split.seed == 3 and cfg.data.split.val_fraction == 0.2 and cfg.data.loader.batch_size == 4
    grouped = ManifestDataModule("m.csv", columns={"targets": ["a", "b"]}, split={"seed": 3}, loader={"num_workers": 1})
    assert grouped.region_names == ["a", "b"] and grouped.covariate_names == ["age", "horizon"]
    assert grouped.split.seed == 3 and grouped.loader == LoaderConfig(batch_size=4, num_workers=1)
    assert grouped.hparams.split == dataclasses.asdict(grouped.split) and grouped.hparams.loader["num_workers"] == 1
    with pytest.raises(TypeError, match="no field"):
        ManifestDataModule("m.csv", split={"train_pool": 4})


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="columns.baselines"):
        ManifestDataModule("m.csv", columns={"targets": REGIONS, "baselines": BASELINES[:2]})
    with pytest.raises(ValueError, match="modality"):
        ManifestDataModule("m.csv", modality="pet")
    with pytest.raises(ValueError, match="val_fraction"):
        ManifestDataModule("m.csv", split={"val_fraction": 0.6, "test_fraction": 0.5})


# ------------------------------------------------------------------------------------------ batches


def test_train_batches_have_the_scan_batch_layout(cohort):
    folder, rows = cohort(5)
    dm = ManifestDataModule(str(write_manifest(folder / "manifest.csv", rows)), **SMALL)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, ScanBatch)
    assert batch.image.shape == (2, 1, 6, 6, 4) and batch.image.dtype == torch.float32
    assert (
        batch.labels.shape == (2, 1, 6, 6, 4) and batch.labels.dtype == torch.uint8
    )  # compact: 8x fewer bytes from workers
    assert set(batch.labels.unique().tolist()) <= {0, 1, 2, 3} and batch.labels.max() > 0
    assert batch.covariates.shape == (2, 2) and batch.covariates.dtype == torch.float32
    assert batch.target.shape == (2, 3, 2) and batch.state.shape == (2, 3)
    assert torch.isnan(batch.state).all()
    by_id = {r["subject_id"]: r for r in rows}
    for i, sid in enumerate(batch.subject_ids):
        assert sid in dm.splits["train"]
        assert batch.covariates[i].tolist() == pytest.approx([by_id[sid]["age"], by_id[sid]["horizon"]])


@pytest.mark.parametrize("with_baseline", [False, True])
def test_targets_follow_the_csv_and_nan_where_unknown(cohort, with_baseline):
    folder, rows = cohort(4)
    rows[1]["reg_b"] = ""  # one unknown follow-up value
    rows[3] |= dict.fromkeys(REGIONS, "")  # no follow-up at all: predict only
    baselines = BASELINES if with_baseline else None
    drop = () if with_baseline else tuple(BASELINES)
    columns = {"targets": REGIONS, "baselines": baselines}
    dm = ManifestDataModule(str(write_manifest(folder / "m.csv", rows, drop)), **(SMALL | {"columns": columns}))
    dm.setup("fit")
    assert "sub-03" not in dm.splits["train"] + dm.splits["val"] + dm.splits["test"]
    assert sorted(dm.splits["predict"]) == [r["subject_id"] for r in rows]
    seen = {}
    for batch in dm.predict_dataloader():
        seen |= dict(zip(batch.subject_ids, batch.target, strict=True))
    for row in rows:
        target = seen[row["subject_id"]]  # (R, 2)
        expected = [math.nan if row[r] == "" else row[r] for r in REGIONS]
        torch.testing.assert_close(target[:, 1], torch.tensor(expected, dtype=torch.float32), equal_nan=True)
        if with_baseline:
            assert target[:, 0].tolist() == pytest.approx([row[b] for b in BASELINES])
        else:
            assert torch.isnan(target[:, 0]).all()


@pytest.mark.parametrize("case", ["anatomical.nii", "MR_small.dcm"])
def test_mri_is_z_normalised_over_the_head_foreground(tmp_path, case):
    """TorchIO's ``mean`` mask (voxels above the image mean) sets the statistics; a linear rescaling keeps
    that set, so it can be recovered from the output."""
    if case == "anatomical.nii":
        image, labels = anatomical_case(tmp_path)
        grid = {"spacing": 4.0, "shape": (16, 20, 12)}
    else:
        image, labels = dicom_case(tmp_path, case)
        grid = {"spacing": 1.0, "shape": (18, 18, 1)}
    manifest = write_manifest(tmp_path / "m.csv", [scan_row("mri-1", image, labels)])
    dm = ManifestDataModule(str(manifest), **(SMALL | grid))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch.image.shape == (1, 1, *grid["shape"])
    image = batch.image.double()
    foreground = image[image > image.mean()]
    assert foreground.numel() > 50
    assert abs(foreground.mean().item()) < 1e-4
    assert foreground.std().item() == pytest.approx(1.0, abs=1e-3)


def test_ct_is_windowed_to_the_unit_interval(tmp_path):
    image, labels = dicom_case(tmp_path, "CT_small.dcm")
    manifest = write_manifest(tmp_path / "m.csv", [scan_row("ct-1", image, labels)])
    dm = ManifestDataModule(str(manifest), modality="ct", **(SMALL | {"spacing": 2.0, "shape": (32, 32, 2)}))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch.image.min() >= 0.0 and batch.image.max() <= 1.0
    assert batch.image.min() == 0.0 and batch.image.max() == 1.0  # air and bone saturate the brain window
    between = ((batch.image > 0) & (batch.image < 1)).float().mean()
    assert 0.0 < between < 1.0  # soft tissue inside the window keeps its contrast


# ------------------------------------------------------------------------------------------- splits


def test_splits_are_disjoint_seeded_and_stable(cohort, monkeypatch):
    folder, rows = cohort(10)
    rows.append(synthetic_row(folder, 10) | dict.fromkeys(REGIONS, ""))  # unlabelled: predict only
    manifest = str(write_manifest(folder / "m.csv", rows))
    reads = []
    original = manifest_module.read_manifest
    monkeypatch.setattr(manifest_module, "read_manifest", lambda *a, **k: reads.append(a) or original(*a, **k))

    def splits(seed: int) -> dict[str, list[str]]:
        dm = ManifestDataModule(manifest, split={"seed": seed}, **SMALL)
        dm.setup("fit")
        return {name: sorted(ids) for name, ids in dm.splits.items()}

    first = splits(0)
    train, val, test = (set(first[s]) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {f"sub-{i:02d}" for i in range(10)}
    assert len(first["predict"]) == 11
    assert splits(0) == first
    assert splits(1) != first

    reads.clear()
    dm = ManifestDataModule(manifest, **SMALL)
    dm.setup("fit")
    before, datasets = dm.splits, dict(dm.datasets)
    dm.setup("fit")
    dm.setup("test")
    assert dm.splits == before and all(dm.datasets[k] is v for k, v in datasets.items())
    assert len(reads) == 1  # validated once; the second setup did nothing


def test_a_split_column_fixes_the_split_and_is_validated(cohort):
    folder, rows = cohort(6)
    roles = ["train", "train", "val", "test", "train", "test"]
    manifest = write_manifest(folder / "given.csv", [r | {"split": s} for r, s in zip(rows, roles, strict=True)])
    for seed in (0, 1):  # the seed and the fractions no longer choose
        dm = ManifestDataModule(str(manifest), split={"seed": seed}, **SMALL)
        dm.setup("fit")
        assert {k: sorted(v) for k, v in dm.splits.items() if k != "predict"} == {
            "train": ["sub-00", "sub-01", "sub-04"],
            "val": ["sub-02"],
            "test": ["sub-03", "sub-05"],
        }
    bad = write_manifest(
        folder / "bad.csv", [r | {"split": s} for r, s in zip(rows, [*roles[:5], "holdout"], strict=True)]
    )
    assert "subject_id 'sub-05' (line 7), column 'split': 'holdout' is not one of" in setup_error(bad)
    partial = write_manifest(
        folder / "partial.csv", [r | {"split": s} for r, s in zip(rows, [*roles[:5], ""], strict=True)]
    )
    assert "the split column is empty for 1 labelled subject(s) (sub-05)" in setup_error(partial)


def test_train_size_draws_a_seeded_subset_of_the_training_split_only(cohort):
    folder, rows = cohort(10)
    manifest = str(write_manifest(folder / "m.csv", rows))

    def splits(**kwargs) -> dict[str, list[str]]:
        dm = ManifestDataModule(manifest, split=kwargs, **SMALL)
        dm.setup("fit")
        return {name: sorted(ids) for name, ids in dm.splits.items()}

    full = splits()
    draws = [splits(train_size=3, subset_seed=s) for s in range(4)]
    for draw in draws:
        assert len(draw["train"]) == 3 and set(draw["train"]) <= set(full["train"])
        assert (draw["val"], draw["test"], draw["predict"]) == (full["val"], full["test"], full["predict"])
    assert splits(train_size=3, subset_seed=0) == draws[0]
    assert len({tuple(d["train"]) for d in draws}) > 1  # the study's seeds draw different subsets
    with pytest.raises(ManifestError, match="train_size 7 is not within the 6 subjects of the training split"):
        splits(train_size=7)


def test_scans_are_preprocessed_once_across_runs_and_again_when_a_file_changes(cohort, monkeypatch, tmp_path):
    folder, rows = cohort(6)
    builds = []
    original = ScanCache.build
    monkeypatch.setattr(
        ScanCache, "build", lambda self, source: builds.append(source.image.name) or original(self, source)
    )
    manifest = str(write_manifest(folder / "m.csv", rows))
    settings = {"split": {"val_fraction": 0, "test_fraction": 0}, "cache_dir": str(tmp_path / "cache"), **SMALL}
    epochs = []
    for _ in range(2):  # two runs with the same settings: the second reads the cache only
        dm = ManifestDataModule(manifest, **settings)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        epochs.append({sid: img for b in batches for sid, img in zip(b.subject_ids, b.image, strict=True)})
    assert len(builds) == 6
    assert epochs[0].keys() == epochs[1].keys() and all(torch.equal(epochs[0][k], epochs[1][k]) for k in epochs[0])
    synthetic_row(folder, 3)  # rewrites sub-03's files (new modification time): never served stale
    os.utime(folder / rows[3]["image"], ns=(1, 1))
    ManifestDataModule(manifest, **settings).setup("fit")
    assert builds[6:] == ["sub-03_t1.nii.gz"]
    assert ManifestDataModule(manifest, **(settings | {"spacing": 8.0})).setup("fit") is None and len(builds) == 13


def test_tiny_cohort_has_no_validation_loader(cohort):
    folder, rows = cohort(2)  # 0.2 * 2 rounds to 0
    dm = ManifestDataModule(str(write_manifest(folder / "m.csv", rows)), **SMALL)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    assert sorted(dm.splits["train"]) == ["sub-00", "sub-01"]


def test_relative_paths_resolve_against_the_csv_folder(cohort, tmp_path, monkeypatch):
    folder, rows = cohort(3)
    manifest = write_manifest(folder / "m.csv", rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dm = ManifestDataModule(os.path.relpath(manifest, elsewhere), **SMALL)
    dm.setup("predict")
    assert dm.rows["predict"][0].image == folder / "scans" / "sub-00_t1.nii.gz"
    assert next(iter(dm.predict_dataloader())).image.shape == (2, 1, 6, 6, 4)


# ------------------------------------------------------------------------------------------- errors


def _garbage(folder: Path, row: dict) -> tuple[str, str]:
    (folder / "scans" / "corrupt.nii.gz").write_bytes(os.urandom(4096))
    row["image"] = "scans/corrupt.nii.gz"
    return "image", "could not be read"


def _high_label(folder: Path, row: dict) -> tuple[str, str]:
    labels = slab_labels(GRID)
    labels[labels == 3] = 5  # R = 3
    write_nifti(folder / "scans" / "high.nii.gz", labels)
    row["label_map"] = "scans/high.nii.gz"
    return "label_map", "label 5 > R = 3"


def _other_shape(folder: Path, row: dict) -> tuple[str, str]:
    write_nifti(folder / "scans" / "small.nii.gz", slab_labels((12, 10, 6)))
    row["label_map"] = "scans/small.nii.gz"
    return "label_map", "spatial shape"


def _other_affine(folder: Path, row: dict) -> tuple[str, str]:
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    write_nifti(folder / "scans" / "shifted.nii.gz", slab_labels(GRID), shifted)
    row["label_map"] = "scans/shifted.nii.gz"
    return "label_map", "affine differs"


def _missing_file(folder: Path, row: dict) -> tuple[str, str]:
    row["image"] = "scans/absent.nii.gz"
    return "image", "does not exist"


def _text_covariate(folder: Path, row: dict) -> tuple[str, str]:
    row["age"] = "seventy"
    return "age", "is not a number"


SPOILERS = [_missing_file, _garbage, _high_label, _other_shape, _other_affine, _text_covariate]


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__)
def test_each_bad_row_is_named_with_its_column_and_file(cohort, spoil):
    folder, rows = cohort(3)
    column, what = spoil(folder, rows[1])
    message = setup_error(write_manifest(folder / "m.csv", rows))
    line = next(line for line in message.splitlines() if what in line)
    assert "subject_id 'sub-01' (line 3)" in line and f"column {column!r}" in line
    if column in ("image", "label_map"):
        assert str(folder / rows[1][column]) in line
    assert "sub-00" not in message and "sub-02" not in message


def test_missing_covariate_column_is_named(cohort):
    folder, rows = cohort(3)
    message = setup_error(write_manifest(folder / "m.csv", rows, drop=("horizon",)))
    assert "column 'horizon'" in message and "missing" in message


def test_all_problems_are_reported_together_and_nothing_is_written(cohort, tmp_path):
    folder, rows = cohort(4)
    _missing_file(folder, rows[0])
    _high_label(folder, rows[2])
    _text_covariate(folder, rows[3])
    manifest = write_manifest(folder / "m.csv", rows)
    before = files_under(tmp_path)
    dm = ManifestDataModule(str(manifest), **SMALL)
    with pytest.raises(ManifestError) as info:
        dm.setup("fit")
    assert len(info.value.problems) == 3
    assert all(f"'{sid}'" in str(info.value) for sid in ("sub-00", "sub-02", "sub-03"))
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("tag", ["PatientID", "PatientName"])
def test_subject_id_equal_to_a_dicom_identifier_is_refused_without_echoing_it(tmp_path, tag):
    image, labels = dicom_case(tmp_path, "CT_small.dcm")
    identifier = str(pydicom.dcmread(image / "slice0001.dcm", stop_before_pixels=True)[tag].value)
    assert identifier.casefold() not in str(tmp_path).casefold()
    rows = [scan_row("ct-ok", image, labels), scan_row(identifier, image, labels)]
    message = setup_error(write_manifest(tmp_path / "m.csv", rows), modality="ct")
    assert "pseudonym" in message and "line 3" in message and str(image) in message
    assert identifier.casefold() not in message.casefold()
    assert "'ct-ok'" not in message  # the pseudonymous row is fine


def test_training_batches_are_augmented_reproducibly_and_others_are_not(cohort):
    """A gain and noise per subject on training batches, seeded by split.subset_seed and step; none otherwise."""
    folder, rows = cohort(5)
    dm = ManifestDataModule(str(write_manifest(folder / "manifest.csv", rows)), **SMALL)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    class Trainer:
        training, global_step = True, 7

    dm.trainer = Trainer()
    clean = batch.image.clone()
    first = dm.on_after_batch_transfer(dataclasses.replace(batch, image=clean.clone()), 0).image
    again = dm.on_after_batch_transfer(dataclasses.replace(batch, image=clean.clone()), 0).image
    assert torch.equal(first, again) and not torch.allclose(first, clean)
    ratio = (first / clean)[clean.abs() > 1].std()  # the gain dominates where the noise is small against the image
    assert 0 < float(ratio) < 0.2
    Trainer.training = False
    assert torch.equal(dm.on_after_batch_transfer(dataclasses.replace(batch, image=clean.clone()), 0).image, clean)
    dm.hparams.augment, Trainer.training = False, True
    assert torch.equal(dm.on_after_batch_transfer(dataclasses.replace(batch, image=clean.clone()), 0).image, clean)

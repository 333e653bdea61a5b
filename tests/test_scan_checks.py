"""Damaged and blank scans are refused before training, naming subject, column and file, or skipped and reported."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
import torch
import torchio as tio

from datamodules.freesurfer import freesurfer_labels, label_lookup, relabel, scheme_absent
from datamodules.manifest import BAD_SUBJECTS_FILE, ManifestDataModule, ManifestError, dk84_region_names
from tests.test_manifest import GRID, SMALL, slab_labels, synthetic_row, write_manifest, write_nifti


def _settings(tmp_path: Path, **extra) -> dict:
    return SMALL | {"cache_dir": str(tmp_path / "cache"), "split": {"val_fraction": 0, "test_fraction": 0}} | extra


# ---- one spoiler per class of bad input: (column, expected words) -------------------------------------


def _nan_image(folder: Path, row: dict) -> tuple[str, str]:
    data = np.random.default_rng(0).normal(100, 20, GRID).astype(np.float32)
    data[3, 3, 3] = np.nan
    write_nifti(folder / row["image"], data)
    return "image", "NaN or infinite"


def _blank_image(folder: Path, row: dict) -> tuple[str, str]:
    write_nifti(folder / row["image"], np.zeros(GRID, np.float32))
    return "image", "is constant"


def _half_gzip(folder: Path, row: dict) -> tuple[str, str]:
    """A valid gzip of half the voxels: nibabel would read the rest as zeros."""
    path = folder / row["image"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return "image", "truncated or damaged"


def _cut_gzip(folder: Path, row: dict) -> tuple[str, str]:
    path = folder / row["label_map"]
    path.write_bytes(path.read_bytes()[:-40])
    return "label_map", "truncated or damaged"


def _truncated_nii(folder: Path, row: dict) -> tuple[str, str]:
    path = folder / row["image"]
    plain = path.with_name(path.name.removesuffix(".gz"))
    plain.write_bytes(gzip.decompress(path.read_bytes())[:-500])
    row["image"] = str(plain.relative_to(folder))
    return "image", "truncated or damaged"


def _empty_brain(folder: Path, row: dict) -> tuple[str, str]:
    """Noise outside the brain, nothing inside it: constant over the regions after preprocessing."""
    data = np.random.default_rng(1).normal(100, 20, GRID).astype(np.float32)
    data[slab_labels(GRID) > 0] = 0.0
    write_nifti(folder / row["image"], data)
    return "image", "constant over the brain regions"


SPOILERS = [_nan_image, _blank_image, _half_gzip, _cut_gzip, _truncated_nii, _empty_brain]


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__)
def test_each_bad_scan_is_refused_before_training_naming_subject_column_and_file(tmp_path, spoil):
    folder = tmp_path / "study"
    rows = [synthetic_row(folder, i) for i in range(4)]
    column, what = spoil(folder, rows[2])
    dm = ManifestDataModule(str(write_manifest(folder / "m.csv", rows)), **_settings(tmp_path))
    with pytest.raises(ManifestError) as info:
        dm.setup("fit")
    line = next(line for line in str(info.value).splitlines() if what in line)
    assert (
        "subject_id 'sub-02' (line 4)" in line
        and f"column {column!r}" in line
        and str(folder / rows[2][column]) in line
    )
    assert len(info.value.problems) == 1


def test_bad_subjects_are_skipped_and_reported_without_paths(tmp_path):
    folder = tmp_path / "study"
    rows = [synthetic_row(folder, i) for i in range(5)]
    _blank_image(folder, rows[1])
    _half_gzip(folder, rows[3])
    dm = ManifestDataModule(str(write_manifest(folder / "m.csv", rows)), **_settings(tmp_path, on_bad_subject="skip"))

    class Trainer:  # what the report needs of a trainer
        default_root_dir, is_global_zero = str(tmp_path / "run"), True

    dm.trainer = Trainer()
    with pytest.warns(UserWarning, match="2 subject"):
        dm.setup("fit")
    assert sorted(dm.splits["train"]) == ["sub-00", "sub-02", "sub-04"]
    assert len(list(dm.train_dataloader())) == 2
    report = pd.read_csv(tmp_path / "run" / BAD_SUBJECTS_FILE)
    assert report["subject_id"].tolist() == ["sub-01", "sub-03"] and report["column"].tolist() == ["image", "image"]
    assert report["problem"].str.contains("constant").tolist() == [True, False]
    text = (tmp_path / "run" / BAD_SUBJECTS_FILE).read_text()
    assert "file" not in report.columns and "scans" not in text and str(tmp_path) not in text


def test_a_second_run_reports_a_cached_bad_scan_without_decoding_it(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    rows = [synthetic_row(folder, i) for i in range(3)]
    _blank_image(folder, rows[0])
    manifest = str(write_manifest(folder / "m.csv", rows))
    with pytest.raises(ManifestError, match="is constant"):
        ManifestDataModule(manifest, **_settings(tmp_path)).setup("fit")
    monkeypatch.setattr(tio.ScalarImage, "load", lambda self: pytest.fail("a cached scan was decoded again"))
    with pytest.raises(ManifestError, match="is constant"):
        ManifestDataModule(manifest, **_settings(tmp_path)).setup("fit")


# ---- DICOM series ------------------------------------------------------------------------------------


def _series(folder: Path, slices: int = 5) -> Path:
    """A DICOM series of ``slices`` copies of pydicom's MR_small, 0.8 mm apart along z."""
    source = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    folder.mkdir(parents=True)
    for k in range(slices):
        ds = source.copy()
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 0.8 * k]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = f"{source.SOPInstanceUID}.{k + 1}"
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def _dicom_row(tmp_path: Path, spoil) -> tuple[Path, str]:
    series = _series(tmp_path / "dicom" / "sub-07")
    spoil(series)
    image = tio.ScalarImage(series)
    labels = tmp_path / "labels.nii.gz"
    tio.LabelMap(tensor=torch.as_tensor(slab_labels(image.spatial_shape))[None], affine=image.affine).save(labels)
    row = {
        "subject_id": "sub-07",
        "image": str(series),
        "label_map": str(labels),
        "age": 70,
        "horizon": 2,
        "reg_a": 1.0,
        "reg_b": 2.0,
        "reg_c": 3.0,
    }
    manifest = write_manifest(tmp_path / "m.csv", [row])
    dm = ManifestDataModule(str(manifest), **_settings(tmp_path, shape=(8, 8, 4)))
    with pytest.raises(ManifestError) as info:
        dm.setup("predict")
    return series, str(info.value)


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    series, message = _dicom_row(tmp_path, lambda s: (s / "slice002.dcm").unlink())
    assert "subject_id 'sub-07'" in message and "column 'image'" in message and str(series) in message
    assert "a slice is missing" in message


def test_a_dicom_series_with_a_damaged_slice_is_refused(tmp_path):
    def cut(series: Path) -> None:
        path = series / "slice003.dcm"
        path.write_bytes(path.read_bytes()[:-3000])

    series, message = _dicom_row(tmp_path, cut)
    assert "subject_id 'sub-07'" in message and str(series) in message and "slice003.dcm" in message


# ---- FreeSurfer label maps ---------------------------------------------------------------------------


def test_freesurfer_labels_of_dk84_follow_the_color_lut():
    names = dk84_region_names()
    labels = dict(zip(names, freesurfer_labels(names), strict=True))
    assert labels["Bankssts_L"] == 1001 and labels["Cuneus_L"] == 1005 and labels["Insula_R"] == 2035
    assert labels["Hippocampus_L"] == 17 and labels["Hippocampus_R"] == 53 and labels["Accumbens_area_R"] == 58
    assert labels["Thalamus_Proper_L"] == 10 and labels["Cerebellum_Cortex_R"] == 47
    assert len(set(labels.values())) == 84 and 1004 not in labels.values() and 2004 not in labels.values()


def test_aparc_aseg_maps_to_regions_and_dkt_lacks_six():
    names = dk84_region_names()
    fs = torch.tensor([0, 2, 41, 1001, 1005, 17, 2035, 1004, 24])  # background, WM, WM, DK, DK, aseg, DK, CC, CSF
    regions = relabel(fs, label_lookup("aparc+aseg", names))
    expected = [0, 0, 0, 1, 4, names.index("Hippocampus_L") + 1, names.index("Insula_R") + 1, 0, 0]
    assert regions.tolist() == expected
    dkt_missing = {f"{r}_{h}" for h in "LR" for r in ("Bankssts", "Frontalpole", "Temporalpole")}
    assert set(scheme_absent("aparc.DKTatlas+aseg", names)) == dkt_missing and scheme_absent("aparc+aseg", names) == []
    assert relabel(torch.tensor([1001]), label_lookup("aparc.DKTatlas+aseg", names)).item() == 0


def test_a_manifest_of_freesurfer_label_maps_trains_on_dk84_regions(tmp_path):
    names = dk84_region_names()
    folder = tmp_path / "fs"
    slabs = slab_labels(GRID, num_regions=3)
    fs = np.zeros(GRID, np.int32)
    fs[slabs == 1], fs[slabs == 2], fs[slabs == 3] = 1005, 17, 2  # Cuneus_L, Hippocampus_L, cerebral WM (not DK84)
    rows = []
    for i in range(3):
        rng = np.random.default_rng(i)
        write_nifti(folder / f"t1_{i}.nii.gz", rng.normal(100, 20, GRID).astype(np.float32))
        write_nifti(folder / f"aparc+aseg_{i}.nii.gz", fs)
        rows.append(
            {
                "subject_id": f"sub-{i}",
                "image": f"t1_{i}.nii.gz",
                "label_map": f"aparc+aseg_{i}.nii.gz",
                "label_scheme": "aparc+aseg",
                "age": 70,
                "horizon": 1,
            }
            | {n: 0.1 for n in names}
        )
    dm = ManifestDataModule(
        str(write_manifest(folder / "m.csv", rows)), **(_settings(tmp_path) | {"columns": {"targets": None}})
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    present = set(batch.labels.unique().tolist())
    assert present == {0, names.index("Cuneus_L") + 1, names.index("Hippocampus_L") + 1}
    assert os.path.basename(dm.rows["train"][0].label_map).startswith("aparc+aseg")


# ---- rmr-data check ----------------------------------------------------------------------------------


def test_rmr_data_check_prints_one_line_per_bad_subject_and_exits_nonzero(tmp_path, capsys):
    from rmr_lightning.data_cli import main

    folder = tmp_path / "study"
    rows = [synthetic_row(folder, i) for i in range(5)]
    manifest = write_manifest(folder / "m.csv", rows)
    flags = [
        "--columns.targets",
        "[reg_a, reg_b, reg_c]",
        "--spacing",
        "4",
        "--shape",
        "[6, 6, 4]",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    assert main(["check", str(manifest), *flags]) == 0
    assert "5 rows: 5 usable, 0 with problems" in capsys.readouterr().out
    _blank_image(folder, rows[1])
    _cut_gzip(folder, rows[3])
    report = tmp_path / "problems.csv"
    assert main(["check", str(manifest), *flags, "--report", str(report)]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if "subject_id 'sub-0" in line]
    assert len(bad) == 2 and "sub-01" in bad[0] and str(folder / rows[1]["image"]) in bad[0] and "is constant" in bad[0]
    assert "sub-03" in bad[1] and "column 'label_map'" in bad[1] and "truncated or damaged" in bad[1]
    written = pd.read_csv(report)
    assert written["subject_id"].tolist() == ["sub-01", "sub-03"] and written["file"].tolist() == [
        rows[1]["image"],
        rows[3]["label_map"],
    ]


def test_rmr_data_check_merges_grouped_flags_into_the_configs_groups():
    """``--columns.targets`` and the like change one field of a group the config sets; a mapping merges too."""
    import argparse

    from datamodules.check import _options, add_arguments
    from tests.helpers import REPO

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = str(REPO / "configs" / "natural" / "manifest.yaml")
    flags = ["--columns.targets", "[a, b]", "--split", "{seed: 2}", "--loader.num_workers", "3", "--spacing", "8"]
    options = _options(parser.parse_args(["m.csv", "--config", config, *flags]))
    assert options["columns"] == {"covariates": ["age", "horizon"], "label_scheme": "dk84", "targets": ["a", "b"]}
    assert options["split"] == {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 2}
    assert options["loader"] == {"batch_size": 4, "num_workers": 3} and options["spacing"] == 8
    dm = ManifestDataModule(**(options | {"manifest": "m.csv"}))
    assert dm.region_names == ["a", "b"] and dm.split.seed == 2 and dm.loader.num_workers == 3

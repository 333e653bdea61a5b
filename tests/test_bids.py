"""``rmr-data bids``: a manifest from a longitudinal BIDS dataset with FreeSurfer outputs, checked against
the truth of ``rmr-data phantoms`` (exact with stats, close with voxel counts) and run end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datamodules.bids import excluded_path
from datamodules.freesurfer import DKT_MISSING
from datamodules.manifest import dk84_region_names
from datamodules.phantom_dataset import write_dataset
from rmr_lightning.cli import cli_main
from rmr_lightning.data_cli import main
from tests.helpers import REPO, tiny_model

SUBJECTS, SPACING, SEED = 8, 8, 2
NAMES = dk84_region_names()
VALUES = NAMES + [f"base_{n}" for n in NAMES]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bids") / "phantoms"
    write_dataset(out, SUBJECTS, SPACING, SEED, progress=False)
    return out


@pytest.fixture
def dataset(phantoms: Path, tmp_path: Path) -> Path:
    """A copy of the phantoms for a test to alter."""
    return Path(shutil.copytree(phantoms, tmp_path / "dataset"))


def _build(dataset: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """Manifest and excluded report of ``rmr-data bids``, written in a folder apart from the dataset."""
    out = dataset.parent / "out" / "manifest.csv"
    assert main(["bids", str(dataset), "-o", str(out), *extra]) == 0
    return pd.read_csv(out), pd.read_csv(excluded_path(out), dtype={"session_id": str}), out


def _truth(dataset: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """truth.csv's rows in the manifest's order."""
    truth = pd.read_csv(dataset / "truth.csv")
    row = {subject: i for i, subject in enumerate(truth.subject_id)}
    return truth.iloc[[row[s] for s in manifest.subject_id]].reset_index(drop=True)


def _correlations(manifest: pd.DataFrame, truth: pd.DataFrame, columns: list[str]) -> tuple[list[float], float]:
    """Pearson r per column (over subjects, where the truth varies; 0 where the manifest does not) and pooled
    over all finite cells."""
    a, b = manifest[columns].to_numpy(float), truth[columns].to_numpy(float)
    varies = [c for c in range(a.shape[1]) if np.isfinite(b[:, c]).all() and b[:, c].std() > 0]
    per_column = [np.corrcoef(a[:, c], b[:, c])[0, 1] if np.nanstd(a[:, c]) > 0 else 0.0 for c in varies]
    ok = np.isfinite(a) & np.isfinite(b)
    return per_column, float(np.corrcoef(a[ok], b[ok])[0, 1])


def _set_sessions(dataset: Path, subject: str, **columns: object) -> None:
    path = dataset / subject / f"{subject}_sessions.tsv"
    table = pd.read_csv(path, sep="\t", dtype=str)
    for name, value in columns.items():
        table[name] = value
    path.write_text(table.to_csv(sep="\t", index=False))


def test_manifest_reproduces_the_truth(dataset: Path) -> None:
    """Stats of exact partial volumes: horizon, age and every region's baseline and follow-up value as simulated."""
    manifest, report, out = _build(dataset)
    truth = pd.read_csv(dataset / "truth.csv")
    assert list(manifest.columns) == list(truth.columns) and list(manifest.subject_id) == list(truth.subject_id)
    assert report.empty and set(manifest.label_scheme) == {"aparc+aseg"} and set(manifest.volume_source) == {"stats"}
    assert np.abs(manifest.horizon - truth.horizon).max() < 1e-6  # acq_time to the second (the issue asks 0.05 y)
    np.testing.assert_array_equal(manifest.age, truth.age)
    per_region, pooled = _correlations(manifest, truth, VALUES)
    assert len(per_region) == 2 * 68 and min(per_region) >= 0.99 and pooled >= 0.99
    np.testing.assert_allclose(manifest[VALUES].to_numpy(float), truth[VALUES].to_numpy(float), atol=1e-6)  # NaN alike
    for column in ("image", "label_map"):  # relative to the manifest's folder
        found = [(out.parent / p).resolve() for p in manifest[column]]
        assert found == [(dataset / p).resolve() for p in truth[column]]


def test_excluded_subjects_and_sessions_are_reported_with_the_reason(dataset: Path) -> None:
    shutil.rmtree(dataset / "sub-002" / "ses-02")  # one session left
    shutil.rmtree(dataset / "derivatives" / "freesurfer" / "sub-003_ses-02")  # follow-up never segmented
    anat = dataset / "sub-004" / "ses-03" / "anat"  # a third session, not segmented: ses-02 is the follow-up
    anat.mkdir(parents=True)
    shutil.copy(
        dataset / "sub-004" / "ses-02" / "anat" / "sub-004_ses-02_T1w.nii.gz", anat / "sub-004_ses-03_T1w.nii.gz"
    )
    sessions = pd.read_csv(dataset / "sub-004" / "sub-004_sessions.tsv", sep="\t")
    later = {"session_id": "ses-03", "acq_time": "2030-01-01T00:00:00", "age": sessions.age.max() + 5}
    (dataset / "sub-004" / "sub-004_sessions.tsv").write_text(
        pd.concat([sessions, pd.DataFrame([later])]).to_csv(sep="\t", index=False)
    )
    with (dataset / "participants.tsv").open("a") as f:
        f.write("sub-099\t70.0\tF\n")  # listed, never scanned
    _set_sessions(dataset, "sub-005", age="n/a")  # ages from participants.tsv
    _set_sessions(dataset, "sub-006", acq_time="n/a")  # horizon from the ages (rounded to 0.01 y)

    manifest, report, _ = _build(dataset)
    assert sorted(manifest.subject_id) == ["sub-001", "sub-004", "sub-005", "sub-006", "sub-007", "sub-008"]
    reasons = {
        (r.subject_id, r.session_id if isinstance(r.session_id, str) else "", r.reason, r.subject_kept)
        for r in report.itertuples()
    }
    assert reasons == {
        ("sub-002", "", "one session", False),
        ("sub-003", "ses-02", "no FreeSurfer output", False),
        ("sub-004", "ses-03", "no FreeSurfer output", True),
        ("sub-099", "", "no T1w", False),
    }
    truth = _truth(dataset, manifest)
    assert list(manifest.followup_session) == ["ses-02"] * 6
    assert np.abs(manifest.horizon - truth.horizon).max() < 0.05
    np.testing.assert_allclose(manifest.age, truth.age)
    per_region, pooled = _correlations(manifest, truth, VALUES)
    assert min(per_region) >= 0.99 and pooled >= 0.99


def test_voxel_counts_stand_in_for_missing_stats(dataset: Path) -> None:
    """Without stats, volumes are label-map voxel counts (of segmentations that follow the atrophy); a pair
    never mixes the two."""
    (dataset / "derivatives" / "freesurfer" / "sub-001_ses-02" / "stats" / "lh.aparc.stats").unlink()
    manifest, _, _ = _build(dataset)
    assert list(manifest.volume_source) == ["voxel counts"] + ["stats"] * (SUBJECTS - 1)
    truth = _truth(dataset, manifest)
    np.testing.assert_allclose(
        manifest.loc[1:, VALUES].to_numpy(float), truth.loc[1:, VALUES].to_numpy(float), atol=1e-6
    )

    for stats in (dataset / "derivatives").rglob("*.stats"):
        stats.unlink()
    manifest, _, _ = _build(dataset)
    assert set(manifest.volume_source) == {"voxel counts"}
    values, expected = manifest[VALUES].to_numpy(float), truth[VALUES].to_numpy(float)
    assert (np.isfinite(values) == np.isfinite(expected)).all()
    per_region, pooled = _correlations(manifest, truth, VALUES)
    assert (
        np.median(per_region) >= 0.85 and pooled >= 0.75
    )  # 8 mm voxels: coarse counts (see docs/results/bids_route.md)
    assert np.abs(manifest.horizon - truth.horizon).max() < 1e-6


def test_fastsurfer_dkt_outputs_in_bids_derivatives_layout(dataset: Path) -> None:
    """``sub-X/ses-Y`` folders elsewhere (``--derivatives``), DKT label maps and stats: the six regions the DKT
    protocol lacks are empty, the others still reproduce the truth."""
    fastsurfer = dataset / "derivatives" / "fastsurfer"
    for folder in sorted((dataset / "derivatives" / "freesurfer").glob("sub-*_ses-*")):
        subject, session = folder.name.split("_")
        target = fastsurfer / subject / session
        shutil.move(folder, target)
        (target / "mri" / "aparc+aseg.mgz").rename(target / "mri" / "aparc.DKTatlas+aseg.deep.mgz")
        for hemi in ("lh", "rh"):  # still lists the DK-only regions: they must be dropped
            (target / "stats" / f"{hemi}.aparc.stats").rename(target / "stats" / f"{hemi}.aparc.DKTatlas.mapped.stats")
    shutil.rmtree(dataset / "derivatives" / "freesurfer")
    assert main(["bids", str(dataset), "-o", str(dataset.parent / "x.csv")]) == 2  # no derivatives/freesurfer

    manifest, report, _ = _build(dataset, "--derivatives", str(fastsurfer))
    assert report.empty and len(manifest) == SUBJECTS and set(manifest.label_scheme) == {"aparc.DKTatlas+aseg"}
    absent = [n for n in VALUES if n.removeprefix("base_").rsplit("_", 1)[0] in DKT_MISSING]
    assert len(absent) == 12 and manifest[absent].isna().all().all()
    present = [n for n in VALUES if n not in absent]
    per_region, pooled = _correlations(manifest, _truth(dataset, manifest), present)
    assert len(per_region) == 2 * 62 and min(per_region) >= 0.99 and pooled >= 0.99


def test_scan_on_another_grid_uses_freesurfers_conformed_copy(dataset: Path) -> None:
    """The manifest needs the label map on the image's grid: else FreeSurfer's mri/orig.mgz, else excluded."""
    scan = dataset / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_T1w.nii.gz"
    original = nib.load(scan)
    data = np.pad(np.asarray(original.dataobj), 1)
    affine = original.affine.copy()
    affine[:3, 3] -= original.affine[:3, :3].sum(axis=1)  # one voxel more on every side: same anatomy, another grid
    nib.save(nib.Nifti1Image(data, affine), scan)
    manifest, report, _ = _build(dataset)
    assert "sub-001" not in set(manifest.subject_id)
    assert list(report.reason) == ["label map not on the scan's grid"] and list(report.session_id) == ["ses-01"]

    orig = dataset / "derivatives" / "freesurfer" / "sub-001_ses-01" / "mri" / "orig.mgz"
    nib.save(nib.MGHImage(np.asarray(original.dataobj), original.affine), orig)
    manifest, report, out = _build(dataset)
    assert report.empty and (out.parent / manifest.image[0]).resolve() == orig.resolve()


def test_manifest_passes_check_and_trains_with_the_natural_config(
    dataset: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    """End to end: phantoms -> rmr-data bids -> rmr-data check -> a short ``rmr fit``, with no flag about the
    manifest's layout (label_scheme column, base_<region> columns)."""
    _, _, out = _build(dataset)
    config = str(REPO / "configs" / "natural" / "manifest.yaml")
    assert main(["check", str(out), "--config", config]) == 0
    cli = cli_main(
        [
            "--config",
            config,
            f"--data.init_args.manifest={out}",
            *tiny_model(tiny_artifact),
            "--data.init_args.spacing=8",
            "--data.init_args.shape=[24,28,24]",
            "--data.init_args.loader.batch_size=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=1",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    target = cli.datamodule.rows["train"][0].target  # (R, 2): baseline and follow-up from the manifest
    assert bool(target[:, 0].isfinite().any()) and bool(target[:, 1].isfinite().any())


ASEG_FS6 = """# Title Segmentation Statistics
# generating_program mri_segstats
# Measure BrainSeg, BrainSegVol, Brain Segmentation Volume, 1143521.000000, mm^3
# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated Total Intracranial Volume, 1517932.428710, mm^3
# NRows 45
# NTableCols 10
# ColHeaders  Index SegId NVoxels Volume_mm3 StructName normMean normStdDev normMin normMax normRange
  1   4     7315     7272.1  Left-Lateral-Ventricle            37.3  12.0  13.0  87.0  74.0
  2  10     7640     7593.0  Left-Thalamus-Proper              89.0   9.1  50.0 110.0  60.0
  3  17     4162     4149.5  Left-Hippocampus                  76.0   9.6  40.0 104.0  64.0
  4  53     4290     4275.2  Right-Hippocampus                 77.4   9.4  40.0 107.0  67.0
"""
APARC = """# Table of FreeSurfer cortical parcellation anatomical statistics
# Measure Cortex, NumVert, Number of Vertices, 131016, unitless
# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg ThickStd MeanCurv GausCurv FoldInd CurvInd
bankssts                                 1376    940   2305  2.583 0.497     0.110     0.025       13     1.3
entorhinal                                520    388   2079  3.240 0.780     0.121     0.032        7     0.8
"""


def test_freesurfer_stats_are_read_by_their_column_headers(tmp_path: Path) -> None:
    """aseg.stats (FreeSurfer 6 names) and ?h.aparc.stats as FreeSurfer writes them; a damaged file names itself."""
    from datamodules.fs_stats import StatsError, read_aparc, read_aseg

    (tmp_path / "aseg.stats").write_text(ASEG_FS6)
    (tmp_path / "rh.aparc.stats").write_text(APARC)
    volumes, etiv = read_aseg(tmp_path / "aseg.stats")
    assert (
        volumes == {"Thalamus_Proper_L": 7593.0, "Hippocampus_L": 4149.5, "Hippocampus_R": 4275.2}
        and etiv == 1517932.42871
    )
    assert read_aparc(tmp_path / "rh.aparc.stats", "rh") == {"Bankssts_R": 2305.0, "Entorhinal_R": 2079.0}
    (tmp_path / "bad.stats").write_text(APARC.replace(" 2079 ", " n/a "))
    with pytest.raises(StatsError, match="bad.stats.*entorhinal.*GrayVol"):
        read_aparc(tmp_path / "bad.stats", "rh")

"""``rmr-data phantoms``: the phantoms as a longitudinal BIDS dataset with FreeSurfer-like outputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import datamodules.phantom_dataset as phantom_dataset
from datamodules.bids import COLUMNS
from datamodules.brain_phantom import render_tissues
from datamodules.freesurfer import label_lookup, relabel
from datamodules.fs_stats import read_aparc, read_aseg, read_table
from datamodules.manifest import dk84_region_names
from datamodules.phantom_dataset import SESSIONS, segment, simulate_cohort, write_dataset
from rmr_lightning.data.anatomy import load_anatomy
from rmr_lightning.data_cli import main

SUBJECTS, SPACING, SEED = 6, 8, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "bids"
    assert (
        main(["phantoms", str(out), "--subjects", str(SUBJECTS), "--spacing", str(SPACING), "--seed", str(SEED)]) == 0
    )
    return out


def _fs(dataset, subject: str, session: str):
    return dataset / "derivatives" / "freesurfer" / f"{subject}_{session}"


def _volumes(dataset, subject: str, session: str) -> dict[str, float]:
    stats = _fs(dataset, subject, session) / "stats"
    return (
        read_aseg(stats / "aseg.stats")[0]
        | read_aparc(stats / "lh.aparc.stats", "lh")
        | read_aparc(stats / "rh.aparc.stats", "rh")
    )


def test_bids_layout_and_tables(dataset):
    assert json.loads((dataset / "dataset_description.json").read_text())["BIDSVersion"]
    participants = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "split"]
    assert list(participants.participant_id) == [f"sub-{i:03d}" for i in range(1, SUBJECTS + 1)]
    for subject in participants.participant_id:
        sessions = pd.read_csv(dataset / subject / f"{subject}_sessions.tsv", sep="\t")
        assert list(sessions.session_id) == list(SESSIONS)
        dates = pd.to_datetime(sessions.acq_time, format="ISO8601")
        assert dates.iloc[1] > dates.iloc[0] and sessions.age.iloc[1] > sessions.age.iloc[0]
        for session in SESSIONS:
            image = nib.load(dataset / subject / session / "anat" / f"{subject}_{session}_T1w.nii.gz")
            labels = nib.load(_fs(dataset, subject, session) / "mri" / "aparc+aseg.mgz")
            assert isinstance(labels, nib.MGHImage) and image.shape == labels.shape
            assert np.allclose(image.affine, labels.affine) and np.allclose(image.header.get_zooms(), SPACING)
            values = set(np.unique(np.asarray(labels.dataobj)).tolist()) - {0, 2, 41, 24}  # white matter, CSF
            assert len(values) > 50 and all(1001 <= v <= 1035 or 2001 <= v <= 2035 for v in values)  # cortical only
    truth = pd.read_csv(dataset / "truth.csv")
    assert list(truth.columns) == [*COLUMNS, "split"] + [f"base_{n}" for n in dk84_region_names()] + dk84_region_names()
    for column in ("image", "label_map"):
        assert all((dataset / path).is_file() for path in truth[column])


def test_stats_format(dataset):
    stats = _fs(dataset, "sub-001", "ses-01") / "stats"
    measures, rows = read_table(stats / "aseg.stats")
    assert measures["EstimatedTotalIntraCranialVol"] > 1e6 and rows == []  # the atlas has no subcortical labels
    text = (stats / "lh.aparc.stats").read_text()
    assert "# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg" in text
    _, rows = read_table(stats / "rh.aparc.stats")
    assert len(rows) == 34 and {"StructName", "GrayVol", "NumVert"} <= set(rows[0])


def _labels(dataset, subject: str, session: str) -> torch.Tensor:
    """A session's aparc+aseg.mgz as DK84 region numbers."""
    fs_labels = np.asarray(nib.load(_fs(dataset, subject, session) / "mri" / "aparc+aseg.mgz").dataobj).astype(np.int64)
    return relabel(torch.from_numpy(fs_labels), label_lookup("aparc+aseg", dk84_region_names()))


def test_stats_hold_exact_partial_volumes_and_truth_the_atrophy(dataset):
    """GrayVol = sum over the atlas region of each voxel's GM fraction after the simulated atrophy x voxel
    volume; truth.csv is that atrophy, subcortical regions empty."""
    anatomy = load_anatomy(SPACING)
    cohort = simulate_cohort(SUBJECTS, SEED, "mri", anatomy)
    names = dk84_region_names()
    truth = pd.read_csv(dataset / "truth.csv")
    for i, subject in enumerate(truth.subject_id):
        for k, session in enumerate(SESSIONS):
            atrophy = cohort["atrophy"][k][i].double()
            gm = anatomy.gm.double() * (1 - torch.cat([atrophy.new_zeros(1), atrophy])[anatomy.labels])
            expected = torch.bincount(anatomy.labels.ravel(), weights=gm.ravel(), minlength=85)[1:] * SPACING**3
            stats = _volumes(dataset, subject, session)
            present = [r for r, n in enumerate(names) if n in stats]
            assert len(present) == 68
            np.testing.assert_allclose([stats[names[r]] for r in present], expected[present].numpy(), atol=1e-3)
            columns = [f"base_{n}" if k == 0 else n for n in names]
            np.testing.assert_allclose(
                truth.loc[i, [columns[r] for r in present]].to_numpy(float), atrophy[present].numpy(), atol=1e-6
            )
            assert truth.loc[i, columns].isna().sum() == 16


def test_follow_up_has_less_grey_matter_and_a_smaller_labelled_cortex(dataset):
    """Where atrophy rose, the follow-up's stats volume is lower; the labelled cortex never grows and shrinks
    somewhere (the label maps segment each session's tissue)."""
    truth = pd.read_csv(dataset / "truth.csv")
    names = dk84_region_names()
    checked, shrunk = 0, 0
    for i, subject in enumerate(truth.subject_id):
        base, follow = _volumes(dataset, subject, "ses-01"), _volumes(dataset, subject, "ses-02")
        counts = [torch.bincount(_labels(dataset, subject, s).ravel(), minlength=85)[1:] for s in SESSIONS]
        for r, name in enumerate(names):
            if name in base and truth.loc[i, name] > truth.loc[i, f"base_{name}"] + 1e-4:
                assert follow[name] < base[name], (subject, name)
                assert counts[1][r] <= counts[0][r], (subject, name)
                checked, shrunk = checked + 1, shrunk + int(counts[1][r] < counts[0][r])
    assert checked > 100 and shrunk > 0


def test_each_session_is_rendered_and_segmented_from_its_own_atrophy(tmp_path, monkeypatch):
    """Without scanner effects, follow-up minus baseline is exactly (CSF - GM contrast) x GM lost, and each
    label map is the segmentation of its session's tissue."""
    monkeypatch.setattr(phantom_dataset, "scanner_effects", lambda modality: (None, lambda subject: subject))
    write_dataset(tmp_path, 2, SPACING, seed=SEED, progress=False)
    anatomy = load_anatomy(SPACING)
    cohort = simulate_cohort(2, SEED, "mri", anatomy)
    names = dk84_region_names()
    left = phantom_dataset.left_hemisphere(tuple(anatomy.gm.shape), anatomy.affine)
    for i, subject in enumerate(("sub-001", "sub-002")):
        images = [
            np.asarray(nib.load(tmp_path / subject / s / "anat" / f"{subject}_{s}_T1w.nii.gz").dataobj)
            for s in SESSIONS
        ]
        change = (cohort["atrophy"][1][i] - cohort["atrophy"][0][i]).double()
        lost = anatomy.gm.double() * torch.cat([change.new_zeros(1), change])[anatomy.labels]
        contrast = cohort["contrast"][i].double()
        np.testing.assert_allclose(images[1] - images[0], ((contrast[2] - contrast[0]) * lost).numpy(), atol=1e-5)
        for k, session in enumerate(SESSIONS):
            tissues = render_tissues(anatomy.gm, anatomy.wm, anatomy.csf, anatomy.labels, cohort["atrophy"][k][i])
            written = np.asarray(nib.load(_fs(tmp_path, subject, session) / "mri" / "aparc+aseg.mgz").dataobj)
            np.testing.assert_array_equal(written, segment(tissues, anatomy.labels, left, names))


def test_deterministic_given_seed(tmp_path):
    a = write_dataset(tmp_path / "a", 2, SPACING, seed=5, progress=False)
    b = write_dataset(tmp_path / "b", 2, SPACING, seed=5, progress=False)
    c = write_dataset(tmp_path / "c", 2, SPACING, seed=6, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    scan = "sub-002/ses-02/anat/sub-002_ses-02_T1w.nii.gz"
    assert (tmp_path / "a" / scan).read_bytes() == (tmp_path / "b" / scan).read_bytes()


def test_ct_and_bad_arguments(tmp_path, capsys):
    write_dataset(tmp_path / "ct", 1, SPACING, modality="ct", progress=False)
    image = np.asarray(nib.load(tmp_path / "ct" / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_ct.nii.gz").dataobj)
    assert 20 < image[image > 15].mean() < 45  # Hounsfield units of brain tissue
    assert main(["phantoms", str(tmp_path / "x"), "--subjects", "0", "--spacing", "8"]) == 2
    assert "--subjects" in capsys.readouterr().out


def test_the_dataset_is_the_phantom_routes_cohort_in_the_same_roles(tmp_path):
    """10 subjects = BrainPhantomDataModule(train_pool=4, num_val=2, num_test=4): same baseline scans, same
    targets and covariates, and participants.tsv's split keeps each subject's role."""
    from datamodules.brain_phantom import BrainPhantomDataModule

    truth = write_dataset(tmp_path / "bids", 10, SPACING, seed=SEED, progress=False)
    route = BrainPhantomDataModule(
        spacing=SPACING, split={"train_pool": 4, "num_val": 2, "num_test": 4}, seed=SEED, cache_dir=str(tmp_path / "c")
    )
    cohort, _ = route._load_or_generate()
    participants = pd.read_csv(tmp_path / "bids" / "participants.tsv", sep="\t")
    assert participants.split.tolist() == ["train"] * 4 + ["val"] * 2 + ["test"] * 4 == truth.split.tolist()
    names = dk84_region_names()
    for i, subject in enumerate(truth.subject_id):
        scan = np.asarray(
            nib.load(tmp_path / "bids" / subject / "ses-01" / "anat" / f"{subject}_ses-01_T1w.nii.gz").dataobj
        )
        assert np.array_equal(scan, cohort["image"][i, 0].numpy()), subject
        expected = cohort["target"][i].double().numpy()  # (R, 2), NaN where unobserved
        row = truth.iloc[i]
        np.testing.assert_allclose(row[[f"base_{n}" for n in names]].to_numpy(float), expected[:, 0], rtol=0, atol=1e-7)
        np.testing.assert_allclose(row[names].to_numpy(float), expected[:, 1], rtol=0, atol=1e-7)
        assert row.horizon == pytest.approx(float(cohort["covariates"][i, 1]), abs=1e-6)

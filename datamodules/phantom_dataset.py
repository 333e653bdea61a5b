"""Write brain phantoms as a longitudinal BIDS dataset with FreeSurfer-like outputs and the truth.

    rmr-data phantoms OUT --subjects N --spacing MM [--seed S] [--modality mri|ct]

The cohort is the phantom route's (``datamodules.brain_phantom``: same anatomy, disease simulation,
contrast and scanner effects, with ``BrainPhantomDataModule``'s default settings), drawn as that
datamodule draws its training pool, validation and test cohorts (40 / 20 / 40 %): 160 subjects are the
demo's cohort subject for subject, baseline scans included, and participants.tsv's ``split`` column keeps
their roles, so a study through the BIDS route sees the same subjects in the same roles. Each subject gets a
baseline session ``ses-01`` and a follow-up ``ses-02`` ``horizon`` years later, each rendered from the
same anatomy and contrast with grey matter thinned by the atrophy at that time (fresh scanner noise).

    OUT/dataset_description.json, participants.tsv (participant_id, age at baseline, sex, split)
    OUT/sub-001/sub-001_sessions.tsv (session_id, acq_time, age)
    OUT/sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz (CT: ``_ct``, in Hounsfield units)
    OUT/derivatives/freesurfer/sub-001_ses-01/mri/aparc+aseg.mgz (FreeSurfer numbering)
    OUT/derivatives/freesurfer/sub-001_ses-01/stats/aseg.stats, lh.aparc.stats, rh.aparc.stats
    OUT/truth.csv (the columns of ``rmr-data bids``'s manifest, paths relative to OUT, the true values)

Each session's ``aparc+aseg.mgz`` is a hard segmentation of that session's tissue, as FreeSurfer's is: a
voxel of a DK region keeps the region's label where grey matter is its largest tissue fraction
(``datamodules.bids.gm_majority``), else it is white matter (2/41) or CSF (24); so atrophy shrinks the
labelled cortex and voxel counts follow it. The stats hold each region's exact partial-volume grey
matter (its voxels' GM fraction after atrophy times the voxel volume, over the atlas region at the
rendering grid) and eTIV (the sum of all tissue fractions, which atrophy leaves unchanged). truth.csv
holds the simulated regional atrophy, which ``rmr-data bids``'s measure recovers exactly from those
stats (see ``datamodules.bids``). The shipped atlas labels the 68 cortical regions only: the 16
subcortical regions are absent from the label maps and stats, and empty in truth.csv. Deterministic
given ``--seed``.
"""

from __future__ import annotations

import argparse
import gzip
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torchio as tio
from torch import Tensor

from datamodules.bids import COLUMNS, DAYS_PER_YEAR, gm_majority
from datamodules.brain_phantom import (
    BrainPhantomDataModule,
    regional_atrophy,
    render_tissues,
    scanner_effects,
    simulate_disease,
    subject_anatomy,
    tissue_contrast,
)
from datamodules.freesurfer import freesurfer_labels
from datamodules.fs_stats import write_aparc, write_aseg
from rmr_lightning.data.anatomy import Anatomy, load_anatomy
from rmr_lightning.files import atomic_write, atomic_write_csv, atomic_write_json, atomic_write_text

SESSIONS = ("ses-01", "ses-02")
FIRST_SCAN = datetime(2008, 1, 1)
#: aseg labels of the tissue outside the DK regions: cerebral white matter (left, right) and CSF.
WHITE_MATTER, CSF = (2, 41), 24
#: Follow-up scans take their scanner effects from the baseline's seed plus this (fresh noise, no collision).
FOLLOW_UP_SEED = 50_001


#: The demo's proportions: 64 training, 32 validation and 64 test subjects of 160.
def split_sizes(count: int) -> list[tuple[str, int]]:
    """(split, subjects) of a cohort of ``count``: test and validation rounded, training the rest."""
    test, val = round(count * 0.4), round(count * 0.2)
    return [("train", count - val - test), ("val", val), ("test", test)]


def simulate_cohort(count: int, seed: int, modality: str, anatomy: Anatomy) -> dict:
    """Disease, atrophy at both sessions, contrast, render seeds, split, dates and sexes of ``count`` subjects.

    Drawn as ``BrainPhantomDataModule`` draws its cohort (training pool, validation and test cohorts each
    from its own seeded generator, contrast and baseline scanner effects likewise), so 160 subjects at seed
    S are the demo's cohort (``train_pool=64``, ``num_val=32``, ``num_test=64``, seed S) subject for
    subject, with the same baseline scans, and the ``split`` keeps their roles.
    """
    settings = BrainPhantomDataModule(modality=modality, spacing=int(anatomy.spacing), seed=seed)
    hp, observed = settings.disease, anatomy.region_voxels_1mm > 0
    parts, splits, render_seeds = [], [], []
    for offset, (name, n) in enumerate(split_sizes(count)):
        if n == 0:
            continue
        part_seed = seed * 1000 + offset  # BrainPhantomDataModule._generate's
        rng = np.random.default_rng(part_seed)
        disease = simulate_disease(
            n, rng, settings.algorithm, settings.cohort_params, observed, hp.stage, hp.horizon, hp.age
        )
        disease["contrast"] = tissue_contrast(modality, n, np.random.default_rng(part_seed))  # as render_cohort
        parts.append(disease)
        splits += [name] * n
        render_seeds += [part_seed * 100_003 + j for j in range(n)]  # the baseline scan's, as _RenderJob's
    disease = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    age, horizon = disease["age"], disease["horizon"]
    rng = np.random.default_rng([seed, 3])  # dates and sexes, which the phantom route does not draw
    return {
        "age": age.double().numpy(),
        "horizon": horizon.double().numpy(),
        "atrophy": (
            regional_atrophy(disease["x_baseline"], age, hp.atrophy_scale, hp.ageing_rate),
            regional_atrophy(disease["x_followup"], age + horizon, hp.atrophy_scale, hp.ageing_rate),
        ),
        "contrast": disease["contrast"],
        "render_seeds": (render_seeds, [s + FOLLOW_UP_SEED for s in render_seeds]),
        "split": splits,
        "first_scan": rng.uniform(0, 7 * DAYS_PER_YEAR * 86400, size=count),  # seconds after FIRST_SCAN
        "sex": rng.choice(["F", "M"], size=count),
    }


def session_times(first: float, horizon: float) -> tuple[datetime, datetime]:
    """Baseline and follow-up acquisition times (to the second), ``horizon`` years apart."""
    base = FIRST_SCAN + timedelta(seconds=round(first))
    return base, base + timedelta(seconds=round(horizon * DAYS_PER_YEAR * 86400))


def gm_volumes(gm: Tensor, labels: Tensor, atrophy: Tensor, spacing: float) -> np.ndarray:
    """Exact partial-volume grey matter (mm^3) per DK84 region after ``atrophy`` (R,), in float64. (R,)"""
    keep = 1.0 - torch.cat([atrophy.new_zeros(1), atrophy]).double()[labels]  # 1 outside the regions
    regions = len(atrophy)
    sums = torch.bincount(labels.ravel(), weights=(gm.double() * keep).ravel(), minlength=regions + 1)
    return sums[1 : regions + 1].numpy() * spacing**3


def segment(tissues: tuple[Tensor, Tensor, Tensor], labels: Tensor, left: np.ndarray, names: list[str]) -> np.ndarray:
    """A FreeSurfer-numbered hard segmentation of one session's tissue (GM, WM, CSF): region voxels where
    grey matter is the largest fraction keep the region's aparc+aseg label, the rest of the head is
    white matter (2 left, 41 right) or CSF (24) by the largest fraction, 0 outside. (X, Y, Z) int32"""
    gm, wm, csf = (t.double().numpy() for t in tissues)
    to_fs = np.array([0, *freesurfer_labels(names)], dtype=np.int32)
    out = np.zeros(gm.shape, dtype=np.int32)
    head = gm + wm + csf > 0
    out[head & (wm >= csf)] = np.where(left, WHITE_MATTER[0], WHITE_MATTER[1])[head & (wm >= csf)]
    out[head & (csf > wm)] = CSF
    cortex = gm_majority(gm, wm, csf) & (labels.numpy() > 0)
    out[cortex] = to_fs[labels.numpy()[cortex]]
    return out


def left_hemisphere(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Voxels on the left of the midline (world x < 0 in MNI/RAS space). (X, Y, Z) bool"""
    ijk = np.indices(shape, dtype=np.float64)
    return np.tensordot(affine[0, :3], ijk, axes=1) + affine[0, 3] < 0


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, mgh: bool = False) -> None:
    """A NIfTI (.nii.gz) or FreeSurfer (.mgz) volume, gzip-compressed, written atomically."""
    image = nib.MGHImage(data, affine) if mgh else nib.Nifti1Image(data, affine)
    if not mgh:
        image.header.set_xyzt_units("mm", "sec")
    atomic_write(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)), binary=True)


def render_session(
    tissues: tuple[Tensor, Tensor, Tensor], contrast: Tensor, affine: np.ndarray, modality: str
) -> np.ndarray:
    """One scan of a session's tissue (GM, WM, CSF): the subject's tissue contrast, then scanner effects."""
    gm, wm, csf = tissues
    image = contrast[0] * gm + contrast[1] * wm + contrast[2] * csf
    _, effects = scanner_effects(modality)
    subject = effects(tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=affine)))
    return subject["image"].data[0].float().numpy()


def write_freesurfer(
    folder: Path, fs_labels: np.ndarray, affine: np.ndarray, volumes: np.ndarray, etiv: float, names: list[str]
) -> None:
    """``mri/aparc+aseg.mgz`` and ``stats/{aseg,lh.aparc,rh.aparc}.stats`` of one session."""
    write_volume(folder / "mri" / "aparc+aseg.mgz", fs_labels, affine, mgh=True)
    present = {n: float(v) for n, v in zip(names, volumes, strict=True) if np.isfinite(v)}
    voxels = np.bincount(fs_labels.ravel(), minlength=2036)
    counts = {n: int(voxels[label]) for n, label in zip(names, freesurfer_labels(names), strict=True)}
    write_aseg(folder / "stats" / "aseg.stats", present, counts, etiv, folder.name)  # its subcortical regions only
    for hemi in ("lh", "rh"):
        write_aparc(folder / "stats" / f"{hemi}.aparc.stats", hemi, present, counts, folder.name)


def write_sessions_tsv(out: Path, subject: str, age: float, horizon: float, first: float) -> None:
    """``sub-X_sessions.tsv``: each session's acquisition time and age."""
    times = session_times(first, horizon)
    sessions = pd.DataFrame(
        {"session_id": SESSIONS, "acq_time": [t.isoformat() for t in times], "age": [age, round(age + horizon, 2)]}
    )
    atomic_write_text(out / subject / f"{subject}_sessions.tsv", sessions.to_csv(sep="\t", index=False))


def write_subject(out: Path, i: int, cohort: dict, anatomy: Anatomy, modality: str) -> dict:
    """Both sessions of subject ``i`` (scans, FreeSurfer outputs, sessions.tsv); returns its truth.csv row."""
    subject, names, spacing = f"sub-{i + 1:03d}", anatomy.region_names, anatomy.spacing
    gm, wm, csf, labels = subject_anatomy(anatomy, None)  # subjects in template space (spatial_jitter 0)
    present = np.bincount(labels.numpy().ravel(), minlength=len(names) + 1)[1:] > 0
    etiv = float((gm.double() + wm.double() + csf.double()).sum()) * spacing**3  # atrophy moves GM to CSF: unchanged
    left, suffix = left_hemisphere(tuple(gm.shape), anatomy.affine), "T1w" if modality == "mri" else "ct"
    for k, session in enumerate(SESSIONS):
        atrophy = cohort["atrophy"][k][i]
        tissues = render_tissues(gm, wm, csf, labels, atrophy)
        torch.manual_seed(cohort["render_seeds"][k][i])  # TorchIO samples from torch's global generator
        image = render_session(tissues, cohort["contrast"][i], anatomy.affine, modality)
        write_volume(out / subject / session / "anat" / f"{subject}_{session}_{suffix}.nii.gz", image, anatomy.affine)
        volumes = np.where(present, gm_volumes(gm, labels, atrophy, spacing), np.nan)
        fs_dir = out / "derivatives" / "freesurfer" / f"{subject}_{session}"
        write_freesurfer(fs_dir, segment(tissues, labels, left, names), anatomy.affine, volumes, etiv, names)
    age, horizon = round(float(cohort["age"][i]), 2), float(cohort["horizon"][i])
    write_sessions_tsv(out, subject, age, horizon, cohort["first_scan"][i])
    truth = [np.where(present, cohort["atrophy"][k][i].double().numpy(), np.nan) for k in range(2)]
    image = f"{subject}/{SESSIONS[0]}/anat/{subject}_{SESSIONS[0]}_{suffix}.nii.gz"
    label_map = f"derivatives/freesurfer/{subject}_{SESSIONS[0]}/mri/aparc+aseg.mgz"
    row = dict(
        zip(COLUMNS, [subject, image, label_map, "aparc+aseg", age, horizon, *SESSIONS, "simulated"], strict=True)
    ) | {"split": cohort["split"][i]}
    return (
        row | dict(zip([f"base_{n}" for n in names], truth[0], strict=True)) | dict(zip(names, truth[1], strict=True))
    )


def write_dataset(
    out: Path, subjects: int, spacing: int, seed: int = 0, modality: str = "mri", progress: bool = True
) -> pd.DataFrame:
    """The whole dataset under ``out``; returns the truth table (also written to ``out/truth.csv``)."""
    from rich.progress import track

    anatomy = load_anatomy(spacing)
    cohort = simulate_cohort(subjects, seed, modality, anatomy)
    indices = track(range(subjects), description=f"phantoms -> {out}") if progress else range(subjects)
    rows = [write_subject(out, i, cohort, anatomy, modality) for i in indices]
    common = {"BIDSVersion": "1.9.0", "GeneratedBy": [{"Name": "rmr-data phantoms"}]}
    name = f"rmr_lightning brain phantoms (seed {seed}, {spacing} mm, {modality})"
    atomic_write_json(out / "dataset_description.json", {"Name": name, "DatasetType": "raw"} | common)
    fs_description = {
        "Name": "FreeSurfer-like outputs of the phantoms (exact partial volumes)",
        "DatasetType": "derivative",
    }
    atomic_write_json(out / "derivatives" / "freesurfer" / "dataset_description.json", fs_description | common)
    participants = pd.DataFrame(
        {
            "participant_id": [r["subject_id"] for r in rows],
            "age": [r["age"] for r in rows],
            "sex": cohort["sex"],
            "split": cohort["split"],
        }
    )
    atomic_write_text(out / "participants.tsv", participants.to_csv(sep="\t", index=False))
    truth = pd.DataFrame(rows)
    atomic_write_csv(out / "truth.csv", truth)
    return truth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder of the BIDS dataset to write")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--spacing", type=int, required=True, help="isotropic voxel size in mm (1..8; 4 on a laptop)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a function of it (default 0)")
    parser.add_argument(
        "--modality", choices=("mri", "ct"), default="mri", help="T1-weighted MRI (default) or CT in HU"
    )


def run(args: argparse.Namespace) -> int:
    """Write the dataset; 2 on bad arguments."""
    if args.subjects < 1:
        print(f"rmr-data phantoms: --subjects must be at least 1, got {args.subjects}")
        return 2
    if not 1 <= args.spacing <= 8:
        print(f"rmr-data phantoms: --spacing must be 1..8 mm, got {args.spacing}")
        return 2
    write_dataset(args.out, args.subjects, args.spacing, args.seed, args.modality)
    print(f"{args.subjects} subjects x {len(SESSIONS)} sessions -> {args.out} (truth: {args.out / 'truth.csv'})")
    return 0

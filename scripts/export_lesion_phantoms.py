"""Write lesion CT phantoms as NIfTI files plus a manifest: the format of your own nodule scans.

Each subject gets its baseline chest-CT volume in Hounsfield units and its region of interest (label 1
around the nodule, 0 elsewhere), and one manifest row: ``subject_id, image, label_map, horizon,
lesion_baseline, lesion`` (volumes in mL). ``configs/natural/lesion_manifest.yaml`` fine-tunes on such
a manifest exactly as on real scans, so this checks the file path of the lesion task end to end.
Usage: python scripts/export_lesion_phantoms.py OUT_DIR [--subjects 112] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from rich.progress import track

from datamodules.lesion_ct import LesionCTDataModule
from rmr_lightning.files import atomic_write, atomic_write_csv


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """``image`` as ``.nii.gz``, written whole or not at all."""
    atomic_write(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)), binary=True)


def export(out_dir: Path, subjects: int, seed: int = 0, cache_dir: str | None = None) -> Path:
    """Render (or load the cached) cohort of ``subjects`` nodules and write its files; returns the manifest."""
    dm = LesionCTDataModule(split={"train_pool": subjects, "num_val": 0, "num_test": 0}, seed=seed, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup()
    cohort = dm.cohort
    affine = cohort["affine"].numpy()
    scans = out_dir / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in track(range(subjects), description="writing NIfTI"):
        sid = f"nodule-{i:04d}"
        save_nifti(nib.Nifti1Image(cohort["image"][i, 0].numpy().astype(np.int16), affine), scans / f"{sid}_ct.nii.gz")
        save_nifti(nib.Nifti1Image(cohort["roi"][i, 0].numpy().astype(np.uint8), affine), scans / f"{sid}_roi.nii.gz")
        baseline, followup = cohort["target"][i, 0].tolist()
        rows.append(
            {
                "subject_id": sid,
                "image": f"scans/{sid}_ct.nii.gz",
                "label_map": f"scans/{sid}_roi.nii.gz",
                "horizon": round(float(cohort["covariates"][i, 0]), 6),
                "lesion_baseline": round(baseline, 6),
                "lesion": round(followup, 6),
            }
        )
    manifest = out_dir / "manifest.csv"
    atomic_write_csv(manifest, pd.DataFrame(rows))  # last: a manifest only names scans already written whole
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--subjects", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(export(args.out_dir, args.subjects, args.seed))


if __name__ == "__main__":
    main()

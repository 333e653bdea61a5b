"""Build a volumetric Desikan-Killiany (DK84 numbering) atlas in MNI152 2009c-sym space.

Everything comes from files shipped inside the installed nilearn package (no download):
the ICBM152 2009 symmetric T1/GM/WM templates at 1 mm, the fsaverage5 pial/white surfaces and
a FreeSurfer DK annotation of the left fsaverage5 hemisphere (nilearn's test data).

Method: every voxel with grey-matter probability >= GM_THRESHOLD takes the DK label of the
nearest vertex of its own hemisphere's mid-cortical surface ((pial + white) / 2), if that vertex
lies within MAX_DISTANCE_MM and is not 'unknown' / 'corpuscallosum'. The right hemisphere's labels
are copied from the nearest left vertex after mirroring (x -> -x). Label values follow
``rmr_lightning/data/connectome_dk84/regions.csv`` (value = 1 + row index; 0 = background).
Subcortical and cerebellar regions are not placed (no honest source among these files).

Run once and commit the outputs:   python scripts/build_dk_atlas.py
Verify the shipped outputs:        python scripts/build_dk_atlas.py --check   (exit 1 on mismatch)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial import cKDTree

from rmr_lightning.files import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ATLAS_DIR = REPO / "rmr_lightning" / "data" / "atlas"
REGIONS_CSV = REPO / "rmr_lightning" / "data" / "connectome_dk84" / "regions.csv"
ATLAS_NAME = "dk84_mni152_1mm.nii.gz"
COUNTS_NAME = "region_voxels_1mm.json"
PROVENANCE_NAME = "PROVENANCE.md"

# GM probability at or above which a voxel is labelled. 0.25 keeps the blurred partial-volume rim
# of the group-average cortex (sulcal banks of the symmetric template rarely reach 0.5) while
# leaving voxels that are mostly CSF or WM unlabelled; only ~5% of the template's GM mass lies below it.
GM_THRESHOLD = 0.25
# Nearest mid-surface vertex must lie within this distance (mm): half a cortical thickness (~1.3 mm)
# + fsaverage5 vertex spacing (median 2.2 mm, 99th pct 3.4 mm) + fsaverage-to-ICBM152 misfit (~2 mm).
# Farther GM voxels are mostly deep grey matter or cerebellum, which must stay unlabelled.
MAX_DISTANCE_MM = 6.0
EXCLUDED_ANNOT = ("unknown", "corpuscallosum")


@dataclass(frozen=True)
class Inputs:
    """Paths of the nilearn-shipped input files."""

    nilearn_dir: Path

    @property
    def templates(self) -> dict[str, Path]:
        data = self.nilearn_dir / "datasets" / "data"
        return {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}

    def surface(self, kind: str, hemi: str) -> Path:
        return self.nilearn_dir / "datasets" / "data" / "fsaverage5" / f"{kind}_{hemi}.gii.gz"

    @property
    def annot(self) -> Path:
        return self.nilearn_dir / "surface" / "tests" / "data" / "test.annot"

    def all_files(self) -> list[Path]:
        surfs = [self.surface(k, h) for k in ("pial", "white") for h in ("left", "right")]
        return [*self.templates.values(), *surfs, self.annot, REGIONS_CSV]


def default_inputs() -> Inputs:
    import nilearn

    return Inputs(Path(nilearn.__file__).resolve().parent)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def region_names() -> list[str]:
    """The 84 DK84 names in connectome (label) order."""
    names = REGIONS_CSV.read_text().split()
    assert names[0] == "region_name" and len(names) == 85, "unexpected regions.csv layout"
    return names[1:]


def mid_surface(inputs: Inputs, hemi: str) -> np.ndarray:
    """(V, 3) float64 mid-cortical vertex positions in mm: mean of pial and white."""
    pial, white = (nib.load(inputs.surface(k, hemi)).darrays[0].data.astype(np.float64) for k in ("pial", "white"))
    return (pial + white) / 2.0


def vertex_labels(
    inputs: Inputs, names: list[str], mid_left: np.ndarray, mid_right: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-vertex DK84 label values (0 = none) for each hemisphere; right copied from the mirrored left."""
    annot, _, annot_names = nib.freesurfer.read_annot(str(inputs.annot))
    annot_names = [n.decode() for n in annot_names]
    if annot.shape[0] != mid_left.shape[0]:
        raise ValueError(f"annotation has {annot.shape[0]} vertices, left surface {mid_left.shape[0]}")
    lookup = {n.lower(): i + 1 for i, n in enumerate(names)}
    out = {}
    for hemi, suffix in (("left", "_l"), ("right", "_r")):
        values = np.zeros(len(annot_names), np.int64)
        for k, n in enumerate(annot_names):
            if n in EXCLUDED_ANNOT:
                continue
            if n + suffix not in lookup:
                raise KeyError(f"annotation name {n!r} has no region {n + suffix!r} in regions.csv")
            values[k] = lookup[n + suffix]
        per_vertex = np.where(annot >= 0, values[np.clip(annot, 0, None)], 0)
        out[hemi] = per_vertex
    # Right hemisphere: label of the nearest left vertex to the mirrored right vertex.
    _, nearest = cKDTree(mid_left).query(mid_right * np.array([-1.0, 1.0, 1.0]))
    out["right"] = out["right"][nearest]
    return out


def label_volume(inputs: Inputs, names: list[str]) -> tuple[np.ndarray, nib.Nifti1Image]:
    """(X, Y, Z) uint8 label volume on the 1 mm template grid, and the GM template image."""
    gm_img = nib.load(inputs.templates["gm"])
    gm = np.asanyarray(gm_img.dataobj).astype(np.float64) / 255.0  # (X, Y, Z) probability
    mids = {h: mid_surface(inputs, h) for h in ("left", "right")}
    vlabels = vertex_labels(inputs, names, mids["left"], mids["right"])
    ijk = np.argwhere(gm >= GM_THRESHOLD)  # (N, 3) voxel indices
    xyz = ijk @ gm_img.affine[:3, :3].T + gm_img.affine[:3, 3]  # (N, 3) MNI mm
    labels = np.zeros(gm.shape, np.uint8)
    # The x = 0 plane is left unlabelled: it belongs to neither hemisphere in a symmetric template.
    for hemi, sel in (("left", xyz[:, 0] < 0), ("right", xyz[:, 0] > 0)):
        dist, idx = cKDTree(mids[hemi]).query(xyz[sel], distance_upper_bound=MAX_DISTANCE_MM)
        found = np.isfinite(dist)
        values = np.zeros(len(dist), np.uint8)
        values[found] = vlabels[hemi][idx[found]]
        labels[tuple(ijk[sel].T)] = values
    return labels, gm_img


def atlas_image(labels: np.ndarray, gm_img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI label image with the template's geometry."""
    header = gm_img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_intent("label")
    header["descrip"] = b"DK84 labels, MNI152 2009c sym 1mm (scripts/build_dk_atlas.py)"
    img = nib.Nifti1Image(labels, gm_img.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def gzip_bytes(img: nib.Nifti1Image) -> bytes:
    """Deterministic .nii.gz bytes (no timestamp, no file name in the gzip header)."""
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def voxel_counts(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=len(names) + 1)
    return {n: int(counts[i + 1]) for i, n in enumerate(names)}


def counts_json(counts: dict[str, int]) -> str:
    return json.dumps(counts, indent=1) + "\n"


def provenance(inputs: Inputs, counts: dict[str, int], atlas_sha: str) -> str:
    """PROVENANCE.md text; deterministic (no dates)."""
    import nilearn

    present = {n: c for n, c in counts.items() if c > 0}
    absent = [n for n, c in counts.items() if c == 0]
    ranked = sorted(present.items(), key=lambda kv: (kv[1], kv[0]))
    rows = "\n".join(f"| {i + 1} | {n} | {c} |" for i, (n, c) in enumerate(counts.items()))
    hashes = "\n".join(
        f"| `{p.relative_to(inputs.nilearn_dir) if inputs.nilearn_dir in p.parents else p.relative_to(REPO)}` "
        f"| `{sha256(p)}` |"
        for p in inputs.all_files()
    )
    median = int(np.median(list(present.values())))
    smallest = ", ".join(f"{n} {c}" for n, c in ranked[:3])
    largest = ", ".join(f"{n} {c}" for n, c in ranked[-3:])
    return f"""# DK84 volumetric atlas in MNI152 space (`{ATLAS_NAME}`)

## What
A 1 mm label volume of the 68 cortical Desikan-Killiany regions, on the grid of nilearn's ICBM152
2009 symmetric template (197 x 233 x 189, affine diag(1, 1, 1), origin (-98, -134, -72) mm), uint8.
Value = 1 + row index of the region in `rmr_lightning/data/connectome_dk84/regions.csv`
(so 1..84, the DK84 connectome order); 0 = background / unlabelled. `{COUNTS_NAME}` gives the voxel
count of every one of the 84 regions (0 where absent). Loaded at run time by `rmr_lightning.data.anatomy`.

## How (`scripts/build_dk_atlas.py`, deterministic; `--check` rebuilds and compares)
1. Mid-cortical surface of fsaverage5 per hemisphere: (pial + white) / 2 per vertex (10242 vertices).
2. Left labels: FreeSurfer annotation `nilearn/surface/tests/data/test.annot` (DK, left fsaverage5).
   Right labels: each right mid-surface vertex is mirrored (x -> -x) and copies the label of the
   nearest left mid-surface vertex. **Approximation**: assumes left/right symmetric parcellations.
3. Every voxel with GM probability >= {GM_THRESHOLD} (template `gm` / 255) takes the label of the nearest
   mid-surface vertex of its own hemisphere (x < 0 left, x > 0 right, MNI mm), found with
   `scipy.spatial.cKDTree`, if that vertex is within {MAX_DISTANCE_MM} mm and is not `unknown` /
   `corpuscallosum` (medial wall); otherwise 0. The x = 0 mm plane stays 0 (it belongs to neither
   hemisphere of the symmetric template).
4. Annotation names match region names case-insensitively with `_L` / `_R` appended
   (`bankssts` -> `Bankssts_L`).

Threshold {GM_THRESHOLD}: keeps the blurred partial-volume rim of the group-average cortex (sulcal banks
rarely reach 0.5 in the template) while leaving mostly-CSF/WM voxels out; ~5% of the template's GM
mass is below it. Distance {MAX_DISTANCE_MM} mm: half a cortical thickness (~1.3 mm) + fsaverage5 vertex
spacing (median 2.2 mm) + fsaverage-to-ICBM152 misfit; GM farther away is mostly deep GM or cerebellum.

Software: nilearn {nilearn.__version__}, nibabel {nib.__version__}, numpy {np.__version__}.
Output sha256 (`{ATLAS_NAME}`, gzip level 9, mtime 0): `{atlas_sha}`.

### Input files (sha256)
| file | sha256 |
|---|---|
{hashes}

## Result
{len(present)} regions present, {len(absent)} absent. Voxel counts of present regions: {ranked[0][1]} to
{ranked[-1][1]} (median {median}). Smallest: {smallest}.
Largest: {largest}. Labelled voxels in total: {sum(present.values())}.

Absent (no voxels): {", ".join(absent)}.

| label | region | voxels (1 mm) |
|---|---|---|
{rows}

## Limitations
- Subcortical regions (thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens) and
  the cerebellar cortex are NOT in the volume: none of these files delineates them, so they would
  have to be guessed. Their labels have 0 voxels.
- fsaverage5 is close to, but not registered to, the ICBM152 2009c template: boundaries are
  approximate at the scale of a few mm, and GM within {MAX_DISTANCE_MM} mm of the cortical surface (e.g.
  parts of hippocampus, claustrum, the superior cerebellar surface) can carry a neighbouring cortical
  label.
- Right-hemisphere labels are a mirrored copy of the left annotation (see step 2).
- Coarse surface (fsaverage5, ~2 mm vertex spacing) with nearest-vertex assignment: region borders
  are Voronoi-like, not anatomically traced.
- The annotation is nilearn's test file, assumed to be the standard DK parcellation of fsaverage5.
"""


def build(inputs: Inputs | None = None) -> dict[str, bytes | str | np.ndarray]:
    """Build all outputs in memory: labels array, .nii.gz bytes, counts JSON, provenance text."""
    inputs = inputs or default_inputs()
    names = region_names()
    labels, gm_img = label_volume(inputs, names)
    nii = gzip_bytes(atlas_image(labels, gm_img))
    counts = voxel_counts(labels, names)
    return {
        "labels": labels,
        ATLAS_NAME: nii,
        COUNTS_NAME: counts_json(counts),
        PROVENANCE_NAME: provenance(inputs, counts, hashlib.sha256(nii).hexdigest()),
    }


def write(outputs: dict, out_dir: Path = ATLAS_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / ATLAS_NAME, lambda f: f.write(outputs[ATLAS_NAME]), binary=True)
    atomic_write_text(out_dir / COUNTS_NAME, outputs[COUNTS_NAME])
    atomic_write_text(out_dir / PROVENANCE_NAME, outputs[PROVENANCE_NAME])


def check(outputs: dict, out_dir: Path = ATLAS_DIR) -> list[str]:
    """Problems found comparing the shipped outputs with a fresh build (empty list = identical).

    The volume is compared voxel by voxel with its affine and dtype (robust to zlib versions);
    the counts JSON byte for byte.
    """
    problems = []
    path = out_dir / ATLAS_NAME
    if not path.is_file():
        return [f"missing {path}"]
    shipped = nib.load(path)
    if shipped.get_data_dtype() != np.uint8:
        problems.append(f"{ATLAS_NAME}: dtype {shipped.get_data_dtype()} != uint8")
    ref = nib.Nifti1Image.from_bytes(gzip.decompress(outputs[ATLAS_NAME]))
    if not np.array_equal(shipped.affine, ref.affine):
        problems.append(f"{ATLAS_NAME}: affine differs")
    data = np.asanyarray(shipped.dataobj)
    if data.shape != outputs["labels"].shape or not np.array_equal(data, outputs["labels"]):
        problems.append(f"{ATLAS_NAME}: labels differ")
    counts = out_dir / COUNTS_NAME
    if not counts.is_file() or counts.read_text() != outputs[COUNTS_NAME]:
        problems.append(f"{COUNTS_NAME}: missing or differs")
    return problems


def provenance_is_current(outputs: dict, out_dir: Path = ATLAS_DIR) -> bool:
    """Whether PROVENANCE.md matches (it also records software versions, so a mismatch is only a warning)."""
    path = out_dir / PROVENANCE_NAME
    return path.is_file() and path.read_text() == outputs[PROVENANCE_NAME]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild in memory and compare with the shipped files")
    parser.add_argument("--out-dir", type=Path, default=ATLAS_DIR)
    args = parser.parse_args(argv)
    outputs = build()
    if args.check:
        problems = check(outputs, args.out_dir)
        for p in problems:
            print(f"MISMATCH: {p}", file=sys.stderr)
        if not provenance_is_current(outputs, args.out_dir):
            print(f"WARNING: {PROVENANCE_NAME} differs from a fresh build (versions or hashes)", file=sys.stderr)
        if not problems:
            print(f"OK: {args.out_dir / ATLAS_NAME} matches a fresh build")
        return 1 if problems else 0
    write(outputs, args.out_dir)
    counts = json.loads(outputs[COUNTS_NAME])
    present = sorted(c for c in counts.values() if c > 0)
    print(
        f"wrote {args.out_dir / ATLAS_NAME} ({len(outputs[ATLAS_NAME])} bytes): "
        f"{len(present)} regions, {present[0]}..{present[-1]} voxels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

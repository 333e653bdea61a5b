"""Brain anatomy in MNI152 space at a chosen isotropic resolution, for the brain phantom renderer.

Sources, all local (nothing is downloaded): nilearn's ICBM152 2009 symmetric T1 / GM / WM templates
(1 mm, shipped inside the nilearn package) and the DK84 cortical label volume shipped with this
package (``rmr_lightning/data/atlas/dk84_mni152_1mm.nii.gz``, built by ``scripts/build_dk_atlas.py``).
Coarser grids are exact block averages of the 1 mm maps, so partial volumes are preserved.
Results are cached per spacing as plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from rmr_lightning.files import atomic_torch_save

__all__ = ["Anatomy", "load_anatomy", "ATLAS_PATH"]

ATLAS_PATH = Path(__file__).parent / "atlas" / "dk84_mni152_1mm.nii.gz"
REGIONS_CSV = Path(__file__).parent / "connectome_dk84" / "regions.csv"
# Bump when the computation or the cache layout changes: it is part of the cache key.
CODE_VERSION = "anatomy-v1"
MAX_SPACING = 8
BOX_THRESHOLD = 0.05  # GM + WM probability that defines the brain bounding box


@dataclass
class Anatomy:
    """Tissue maps and DK84 labels on a cropped isotropic MNI152 grid (arrays indexed [x, y, z])."""

    spacing: float  # mm, isotropic
    affine: np.ndarray  # (4, 4) voxel -> MNI mm of the cropped grid
    t1: torch.Tensor  # (D, H, W) float32 template T1 in [0, 1]
    gm: torch.Tensor  # (D, H, W) float32 grey-matter fraction
    wm: torch.Tensor  # (D, H, W) float32 white-matter fraction
    csf: torch.Tensor  # (D, H, W) float32 1 - gm - wm clipped to [0, 1] inside brain_mask, 0 outside
    brain_mask: torch.Tensor  # (D, H, W) bool
    labels: torch.Tensor  # (D, H, W) int64 majority DK84 label of the block's labelled 1 mm voxels, 0 if none
    gm_by_region: torch.Tensor  # (R + 1, D, H, W) float32 GM fraction per region; row 0 = unlabelled GM
    region_names: list[str]  # (R,) DK84 names in connectome order; label r is region_names[r - 1]
    region_voxels_1mm: torch.Tensor  # (R,) int64 labelled voxel count at 1 mm


def load_anatomy(spacing: int = 4, margin_mm: int = 8, cache_dir: str | None = None) -> Anatomy:
    """Anatomy at ``spacing`` mm (integer 1..8), cropped to the brain box plus ``margin_mm``.

    Computed once from the 1 mm maps and cached in ``cache_dir`` (default ``$RMR_CACHE`` or
    ``~/.cache/rmr_lightning``) under a key covering the input bytes and CODE_VERSION.
    Memory grows as spacing**-3: ``gm_by_region`` alone is ~3.7 MB at 8 mm, ~29 MB at 4 mm,
    ~0.23 GB at 2 mm and ~1.9 GB at 1 mm (float32).
    """
    spacing = _check_spacing(spacing)
    if isinstance(margin_mm, bool) or not isinstance(margin_mm, int) or margin_mm < 0:
        raise ValueError(f"margin_mm must be a non-negative integer, got {margin_mm!r}")
    inputs = _input_paths()
    path = _cache_dir(cache_dir) / f"anatomy_{spacing}mm_{_cache_key(inputs, spacing, margin_mm)}.pt"
    payload = _read_cache(path)
    if payload is None:
        payload = _compute(inputs, spacing, margin_mm)
        _atomic_save(payload, path)
    return _from_payload(payload)


# ----------------------------------------------------------------------------------------- inputs


def _check_spacing(spacing: object) -> int:
    """Spacing as an int in 1..MAX_SPACING; block averaging needs an integer factor of 1 mm."""
    ok = isinstance(spacing, (int, float, np.integer, np.floating)) and not isinstance(spacing, bool)
    if not ok or not float(spacing).is_integer() or not 1 <= spacing <= MAX_SPACING:
        raise ValueError(f"spacing must be an integer number of mm in 1..{MAX_SPACING}, got {spacing!r}")
    return int(spacing)


def _input_paths() -> dict[str, Path]:
    """Paths of the 1 mm inputs: nilearn templates (located without importing nilearn) and the atlas."""
    if not ATLAS_PATH.is_file():
        raise FileNotFoundError(f"{ATLAS_PATH} is missing: run `python scripts/build_dk_atlas.py` to build it")
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: its MNI152 templates are needed")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    paths |= {"atlas": ATLAS_PATH, "regions": REGIONS_CSV}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"anatomy input {p} is missing")
    return paths


def _cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("RMR_CACHE") or Path.home() / ".cache" / "rmr_lightning")


def _cache_key(inputs: dict[str, Path], spacing: int, margin_mm: int) -> str:
    """Hash of the code version, the parameters and every input file's bytes."""
    h = hashlib.sha256(f"{CODE_VERSION}|{spacing}|{margin_mm}".encode())
    for name in sorted(inputs):
        h.update(name.encode())
        h.update(inputs[name].read_bytes())
    return h.hexdigest()[:16]


def _read_volumes(inputs: dict[str, Path]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """1 mm uint8 volumes {t1, gm, wm, atlas} (X, Y, Z) and their common (4, 4) affine."""
    images = {k: nib.load(inputs[k]) for k in ("t1", "gm", "wm", "atlas")}
    affine = images["t1"].affine
    vols = {}
    for k, img in images.items():
        if not np.allclose(img.affine, affine) or img.shape != images["t1"].shape:
            raise ValueError(f"{inputs[k]} is not on the MNI152 template grid")
        vols[k] = np.asarray(img.dataobj, dtype=np.uint8)
    return vols, affine


def _region_names() -> list[str]:
    return REGIONS_CSV.read_text().split()[1:]


# ------------------------------------------------------------------------------------ computation


def _crop_box(gm: np.ndarray, wm: np.ndarray, margin: int, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Start index (3,) and size (3,) of the 1 mm crop: brain box + margin, size a multiple of spacing."""
    inside = np.argwhere(gm + wm > BOX_THRESHOLD)  # (N, 3)
    start = inside.min(0) - margin
    size = inside.max(0) + margin + 1 - start
    extra = -size % spacing
    return start - extra // 2, size + extra


def _crop(volume: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(size) sub-volume starting at ``start``; zeros where it leaves the volume."""
    out = np.zeros(tuple(size), volume.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, volume.shape)
    src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    out[dst] = volume[src]
    return out


def _block_mean(x: np.ndarray, s: int) -> np.ndarray:
    """(X, Y, Z) -> (X/s, Y/s, Z/s) mean over s**3 blocks, in float64."""
    d, h, w = (n // s for n in x.shape)
    return x.reshape(d, s, h, s, w, s).mean(axis=(1, 3, 5), dtype=np.float64)


def _block_index(shape: tuple[int, ...], s: int) -> np.ndarray:
    """(X, Y, Z) int64 flat index of each 1 mm voxel's block in the (X/s, Y/s, Z/s) grid."""
    d, h, w = (n // s for n in shape)
    i, j, k = (np.arange(n) // s for n in shape)
    return (i[:, None, None] * h + j[None, :, None]) * w + k[None, None, :]


def _majority_labels(labels: np.ndarray, blocks: np.ndarray, n_blocks: int) -> np.ndarray:
    """(n_blocks,) uint8 most frequent non-zero label per block (ties: smallest label), 0 if none."""
    sel = labels > 0
    key = blocks[sel] * 256 + labels[sel]
    uniq, counts = np.unique(key, return_counts=True)
    blk, lab = uniq // 256, uniq % 256
    order = np.lexsort((lab, -counts, blk))
    first = np.unique(blk[order], return_index=True)[1]
    out = np.zeros(n_blocks, np.uint8)
    out[blk[order][first]] = lab[order][first]
    return out


def _gm_by_region_sparse(gm: np.ndarray, labels: np.ndarray, blocks: np.ndarray, s: int, n_blocks: int):
    """Sparse (R+1, n_blocks) block-average of GM split by label: flat indices (nnz,) int64, values (nnz,) float32."""
    sel = gm > 0
    key = labels[sel].astype(np.int64) * n_blocks + blocks[sel]
    uniq, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=gm[sel], minlength=len(uniq))
    return uniq, (sums / s**3).astype(np.float32)


def _compute(inputs: dict[str, Path], spacing: int, margin: int) -> dict:
    """Cache payload (plain tensors, lists, floats) for one spacing and margin."""
    vols, template_affine = _read_volumes(inputs)
    gm1, wm1 = vols["gm"] / 255.0, vols["wm"] / 255.0  # (X, Y, Z) float64 probabilities
    start, size = _crop_box(gm1, wm1, margin, spacing)
    gm1, wm1 = _crop(gm1, start, size), _crop(wm1, start, size)
    t1 = _crop(vols["t1"], start, size)
    atlas = _crop(vols["atlas"], start, size)
    grid = tuple(int(n) // spacing for n in size)
    n_blocks = int(np.prod(grid))
    blocks = _block_index(gm1.shape, spacing)

    gm, wm = _block_mean(gm1, spacing), _block_mean(wm1, spacing)
    brain_1mm = (t1 > 0) | (gm1 + wm1 > 0.5)
    brain_mask = (_block_mean(brain_1mm, spacing) > 0.5) | (gm + wm > 0.5)
    csf = np.where(brain_mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
    gbr_index, gbr_values = _gm_by_region_sparse(gm1, atlas, blocks, spacing, n_blocks)

    centre = start + (spacing - 1) / 2.0  # template voxel index of block (0, 0, 0)'s centre
    to_template = np.diag([spacing, spacing, spacing, 1.0])
    to_template[:3, 3] = centre
    n_regions = len(_region_names())
    return {
        "code_version": CODE_VERSION,
        "spacing": float(spacing),
        "affine": torch.from_numpy(template_affine @ to_template),
        "t1": _f32(_block_mean(t1, spacing) / 255.0),
        "gm": _f32(gm),
        "wm": _f32(wm),
        "csf": _f32(csf),
        "brain_mask": torch.from_numpy(brain_mask),
        "labels": torch.from_numpy(_majority_labels(atlas, blocks, n_blocks).reshape(grid)),
        "gbr_index": torch.from_numpy(gbr_index),
        "gbr_values": torch.from_numpy(gbr_values),
        "region_names": _region_names(),
        "region_voxels_1mm": torch.from_numpy(np.bincount(vols["atlas"].ravel(), minlength=n_regions + 1)[1:]),
    }


def _f32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _from_payload(p: dict) -> Anatomy:
    """Anatomy from a cache payload; expands the sparse gm_by_region to (R + 1, D, H, W)."""
    grid = tuple(p["gm"].shape)
    n_rows = len(p["region_names"]) + 1
    gm_by_region = torch.zeros(n_rows * int(np.prod(grid)), dtype=torch.float32)
    gm_by_region[p["gbr_index"]] = p["gbr_values"]
    return Anatomy(
        spacing=float(p["spacing"]),
        affine=p["affine"].numpy().copy(),
        t1=p["t1"],
        gm=p["gm"],
        wm=p["wm"],
        csf=p["csf"],
        brain_mask=p["brain_mask"],
        labels=p["labels"].to(torch.int64),
        gm_by_region=gm_by_region.reshape(n_rows, *grid),
        region_names=list(p["region_names"]),
        region_voxels_1mm=p["region_voxels_1mm"].to(torch.int64),
    )


# ------------------------------------------------------------------------------------------ cache


def _read_cache(path: Path) -> dict | None:
    """Cached payload, or None when absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable anatomy cache {path}: {err}", stacklevel=3)
        return None
    return payload if isinstance(payload, dict) and payload.get("code_version") == CODE_VERSION else None


def _atomic_save(payload: dict, path: Path) -> None:
    """Write the cache atomically; warn (no raise) if the folder is not writable: it is only a cache."""
    try:
        atomic_torch_save(payload, path)
    except OSError as err:
        warnings.warn(f"anatomy cache not written ({err})", stacklevel=3)

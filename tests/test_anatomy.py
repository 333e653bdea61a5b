"""DK84 MNI152 atlas (scripts/build_dk_atlas.py) and the anatomy loader (rmr_lightning.data.anatomy)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rmr_lightning.data import anatomy
from rmr_lightning.data.anatomy import ATLAS_PATH, load_anatomy

REPO = Path(__file__).resolve().parents[1]
NON_CORTICAL = ("Cerebellum", "Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala", "Accumbens")
MARGIN = 8


def _names() -> list[str]:
    return (REPO / "rmr_lightning" / "data" / "connectome_dk84" / "regions.csv").read_text().split()[1:]


def _cortical(name: str) -> bool:
    return not name.startswith(NON_CORTICAL)


@pytest.fixture(scope="module")
def atlas() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(ATLAS_PATH)
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def counts_1mm(atlas) -> np.ndarray:
    return np.bincount(atlas[0].ravel(), minlength=85)


@pytest.fixture(scope="module")
def templates() -> dict[str, np.ndarray]:
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    return {
        k: np.asarray(nib.load(data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz").dataobj) / 255.0
        for k in ("gm", "wm")
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("anatomy_cache")


@pytest.fixture(scope="module")
def anat4(cache) -> anatomy.Anatomy:
    return load_anatomy(4, margin_mm=MARGIN, cache_dir=str(cache))


# ------------------------------------------------------------------------------ 1 mm atlas


def test_atlas_file_geometry(atlas):
    labels, affine = atlas
    assert labels.dtype == np.uint8 and labels.shape == (197, 233, 189)
    np.testing.assert_array_equal(affine[:3, :3], np.eye(3))
    np.testing.assert_array_equal(affine[:3, 3], [-98, -134, -72])
    assert ATLAS_PATH.stat().st_size < 1_000_000
    assert labels.max() <= 84


def test_all_cortical_regions_present(counts_1mm):
    names = _names()
    cortical = [i for i, n in enumerate(names) if _cortical(n)]
    assert len(cortical) == 68
    for i in cortical:
        assert 1000 <= counts_1mm[i + 1] <= 60000, (names[i], counts_1mm[i + 1])


def test_non_cortical_regions_absent(counts_1mm):
    absent = [i for i, n in enumerate(_names()) if not _cortical(n)]
    assert len(absent) == 16
    assert all(counts_1mm[i + 1] == 0 for i in absent)


def test_counts_json_matches_volume(counts_1mm):
    shipped = json.loads((ATLAS_PATH.parent / "region_voxels_1mm.json").read_text())
    assert list(shipped) == _names()
    assert [shipped[n] for n in _names()] == counts_1mm[1:].tolist()


def test_hemispheres(atlas):
    labels, affine = atlas
    ijk = np.argwhere(labels > 0)
    x = ijk @ affine[0, :3] + affine[0, 3]  # (N,) MNI x in mm
    values = labels[tuple(ijk.T)]
    for i, name in enumerate(_names()):
        xs = x[values == i + 1]
        if xs.size:
            assert (xs < 0).all() if name.endswith("_L") else (xs > 0).all(), name


def test_left_right_balance(counts_1mm):
    names = _names()
    for i, name in enumerate(names):
        if name.endswith("_L") and _cortical(name):
            left, right = counts_1mm[i + 1], counts_1mm[names.index(name[:-2] + "_R") + 1]
            assert max(left, right) / min(left, right) <= 2.5, (name, left, right)


def test_shipped_atlas_matches_fresh_build(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_dk_atlas", REPO / "scripts" / "build_dk_atlas.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_dk_atlas", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


# --------------------------------------------------------------------------- loader at 4 mm


def test_shapes_and_types(anat4):
    grid = tuple(anat4.gm.shape)
    assert anat4.spacing == 4.0 and len(grid) == 3
    for t in (anat4.t1, anat4.gm, anat4.wm, anat4.csf):
        assert t.shape == grid and t.dtype == torch.float32
        assert t.min() >= 0 and t.max() <= 1 + 1e-6
    assert anat4.brain_mask.shape == grid and anat4.brain_mask.dtype == torch.bool
    assert anat4.labels.shape == grid and anat4.labels.dtype == torch.int64
    assert anat4.gm_by_region.shape == (85, *grid) and anat4.gm_by_region.dtype == torch.float32
    assert len(anat4.region_names) == 84 and anat4.region_names == _names()
    assert anat4.region_voxels_1mm.shape == (84,) and anat4.region_voxels_1mm.dtype == torch.int64


def test_gm_by_region_partitions_gm(anat4):
    assert (anat4.gm_by_region >= 0).all()
    torch.testing.assert_close(anat4.gm_by_region.sum(0), anat4.gm, atol=1e-6, rtol=1e-5)


def test_gm_by_region_conserves_region_mass(anat4, atlas, templates):
    labels, _ = atlas
    gm = templates["gm"]
    block = anat4.spacing**3
    mass_1mm = np.bincount(labels.ravel(), weights=gm.ravel(), minlength=85)
    mass_4mm = anat4.gm_by_region.double().sum((1, 2, 3)).numpy() * block
    np.testing.assert_allclose(mass_4mm, mass_1mm, rtol=1e-5, atol=1e-3)


def test_labels(anat4, counts_1mm):
    assert anat4.labels.min() >= 0 and anat4.labels.max() <= 84
    present = set(anat4.labels.unique().tolist()) - {0}
    assert present == set(np.flatnonzero(counts_1mm[1:]) + 1)
    labelled = anat4.labels > 0
    own = anat4.gm_by_region.gather(0, anat4.labels[None])[0]  # (D, H, W) GM of the block's own label
    assert (own[labelled] > 0).all()
    assert torch.equal(anat4.region_voxels_1mm, torch.from_numpy(counts_1mm[1:]))


def test_csf_and_mask(anat4):
    outside = ~anat4.brain_mask
    assert (anat4.csf[outside] == 0).all()
    inside = anat4.brain_mask
    total = anat4.gm + anat4.wm + anat4.csf
    assert (total[inside] > 0.5).all()
    assert 0.1 < inside.float().mean() < 0.9


def test_affine_reflects_crop(anat4, templates):
    s = 4
    affine = anat4.affine
    np.testing.assert_array_equal(affine[:3, :3], np.diag([s, s, s]))
    brain = np.argwhere(templates["gm"] + templates["wm"] > 0.05)
    lo, hi = brain.min(0) - MARGIN, brain.max(0) + MARGIN  # 1 mm template indices, inclusive
    size = hi - lo + 1
    start = lo - (-size % s) // 2
    origin = np.array([-98.0, -134.0, -72.0])  # MNI mm of template voxel (0, 0, 0)
    expected = origin + start + (s - 1) / 2
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*expected, 1])
    # The grid covers the brain box plus the margin, with less than one block of extra padding.
    grid = np.array(anat4.gm.shape)
    first = affine[:3, 3] - (s - 1) / 2  # MNI of the first 1 mm voxel centre
    last = first + grid * s - 1
    brain_lo, brain_hi = origin + brain.min(0), origin + brain.max(0)
    assert (first <= brain_lo - MARGIN).all() and (last >= brain_hi + MARGIN).all()
    assert ((last - first + 1) - (brain_hi - brain_lo + 1 + 2 * MARGIN) < s).all()


def test_cache_round_trip(anat4, cache, monkeypatch):
    files = list(cache.glob("anatomy_4mm_*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_compute(*args, **kwargs):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(anatomy, "_compute", no_compute)
    again = load_anatomy(4, margin_mm=MARGIN, cache_dir=str(cache))
    for field in ("t1", "gm", "wm", "csf", "brain_mask", "labels", "gm_by_region", "region_voxels_1mm"):
        a, b = getattr(anat4, field), getattr(again, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    np.testing.assert_array_equal(anat4.affine, again.affine)
    assert again.region_names == anat4.region_names and again.spacing == anat4.spacing


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RMR_CACHE", str(tmp_path))
    a = load_anatomy(8, margin_mm=0)
    assert len(list(tmp_path.glob("anatomy_8mm_*.pt"))) == 1
    torch.testing.assert_close(a.gm_by_region.sum(0), a.gm, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spacing", [2.5, 0, 9, -4, True, "4"])
def test_bad_spacing(spacing, tmp_path):
    with pytest.raises(ValueError, match="spacing"):
        load_anatomy(spacing, cache_dir=str(tmp_path))


def test_missing_atlas(tmp_path, monkeypatch):
    monkeypatch.setattr(anatomy, "ATLAS_PATH", tmp_path / "absent.nii.gz")
    with pytest.raises(FileNotFoundError, match="build_dk_atlas.py"):
        load_anatomy(4, cache_dir=str(tmp_path))

"""The phantom cohort: rendering is a function of the seed alone, whatever the number of processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.brain_phantom import render_cohort, simulate_disease
from rmr_lightning.algorithms import NetworkDiffusion
from rmr_lightning.data.anatomy import load_anatomy


@pytest.fixture(scope="module")
def cohort_inputs():
    anatomy = load_anatomy(8)
    observed = anatomy.region_voxels_1mm > 0
    disease = simulate_disease(
        3, np.random.default_rng(0), NetworkDiffusion(), {"gamma": 0.15}, observed, (1.0, 8.0), (1.0, 4.0), (60.0, 85.0)
    )
    return anatomy, disease


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_parallel_rendering_equals_serial(cohort_inputs, modality: str) -> None:
    anatomy, disease = cohort_inputs
    serial = render_cohort(anatomy, disease, modality, 1.0, 0.004, seed=5, spatial_jitter=1.0, workers=1)
    forked = render_cohort(anatomy, disease, modality, 1.0, 0.004, seed=5, spatial_jitter=1.0, workers=2)
    for key in serial:
        assert torch.equal(serial[key].nan_to_num(-1.0), forked[key].nan_to_num(-1.0)), key
    other = render_cohort(anatomy, disease, modality, 1.0, 0.004, seed=6, spatial_jitter=1.0, workers=2)
    assert not torch.equal(serial["image"], other["image"])  # the seed, not the process, drives the draws


def test_atrophy_replaces_grey_matter_with_csf(cohort_inputs) -> None:
    """Only the atrophy differs between two renders: MRI signal falls where grey matter became CSF (GM > CSF in T1)."""
    anatomy, disease = cohort_inputs
    healthy = {**disease, "x_baseline": torch.zeros_like(disease["x_baseline"])}
    sick = {**disease, "x_baseline": torch.full_like(disease["x_baseline"], 0.3)}
    a = render_cohort(anatomy, healthy, "mri", 1.0, 0.0, seed=1)["image"]
    b = render_cohort(anatomy, sick, "mri", 1.0, 0.0, seed=1)["image"]
    grey = anatomy.gm[None, None] > 0.5
    assert (b - a)[grey.expand_as(a)].mean() < -0.05


def test_cached_preprocessing_equals_preprocessing_each_subject(tmp_path) -> None:
    """Runs read preprocessed images from the cache; they must be what the shared preprocessing gives."""
    import torchio as tio

    from datamodules.brain_phantom import BrainPhantomDataModule
    from datamodules.scans import preprocessing

    dm = BrainPhantomDataModule(
        modality="ct", spacing=8, split={"train_pool": 3, "num_val": 1, "num_test": 1}, cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    assert len(list(tmp_path.glob("phantom_ct_8mm_*_prep_*.pt"))) == 1
    cohort = dm.cohort
    affine = cohort["affine"].numpy()
    transform = preprocessing(8, tuple(cohort["image"].shape[-3:]), "ct")
    for i in (0, 3):  # a training and the validation subject
        raw = tio.Subject(
            image=tio.ScalarImage(tensor=cohort["image"][i].clone(), affine=affine),
            label_map=tio.LabelMap(tensor=cohort["labels"][i].long(), affine=affine),
        )
        expected = transform(raw)
        got = dm.datasets["train" if i < 3 else "val"][i if i < 3 else 0]
        assert torch.equal(got["image"].data, expected["image"].data)
        assert torch.equal(got["label_map"].data, expected["label_map"].data)
        assert np.allclose(got["image"].affine, expected["image"].affine)
    again = BrainPhantomDataModule(
        modality="ct", spacing=8, split={"train_pool": 3, "num_val": 1, "num_test": 1}, cache_dir=str(tmp_path)
    )
    again.setup("fit")  # from both caches
    assert torch.equal(again.datasets["val"][0]["image"].data, dm.datasets["val"][0]["image"].data)


def test_preprocessing_cache_key_ignores_memory_addresses() -> None:
    """The key names the transform's settings, not where its function arguments sit in memory: those move
    from process to process, and a key with them made every run preprocess the cohort into a new file."""
    import torchio as tio

    from datamodules.scans import preprocessing, transform_key

    def mask_maker():
        def foreground(x):
            return x > x.mean()

        return foreground

    a, b = mask_maker(), mask_maker()  # equal functions at two addresses, as in two processes
    assert repr(tio.ZNormalization(masking_method=a)) != repr(tio.ZNormalization(masking_method=b))
    assert transform_key(tio.ZNormalization(masking_method=a)) == transform_key(tio.ZNormalization(masking_method=b))
    assert transform_key(preprocessing(4, (45, 54, 45), "mri")) != transform_key(preprocessing(6, (45, 54, 45), "mri"))
    assert transform_key(preprocessing(4, (45, 54, 45), "mri")) != transform_key(preprocessing(4, (45, 54, 45), "ct"))
    assert transform_key(preprocessing(4, (45, 54, 45), "ct")) != transform_key(
        preprocessing(4, (45, 54, 45), "ct", (-20.0, 100.0))
    )


def test_grouped_arguments_keep_the_cache_keys_of_the_flat_ones() -> None:
    """Grouping the datamodules' arguments (split, disease, nodules, loader) renamed no cache file: the keys
    are those the flat arguments gave (values from the code before the grouping), so the same settings find
    the same rendered cohort, and settings that do not change the data (training subset, loader) stay out."""
    from datamodules.brain_phantom import BrainPhantomDataModule
    from datamodules.lesion_ct import LesionCTDataModule

    phantoms = BrainPhantomDataModule(
        spacing=6,
        modality="ct",
        split={"train_pool": 64, "train_size": 8, "subset_seed": 3},
        disease={"stage": (2.0, 6.0)},
        loader={"batch_size": 2},
    )
    assert phantoms._key("abc") == "c6cfee037f81297e"
    lesions = LesionCTDataModule(
        split={"train_pool": 16, "num_val": 4, "num_test": 4, "train_size": 3},
        nodules={"rho": 0.2},
        loader={"batch_size": 2},
        cache_dir="/x",
    )
    assert lesions._cache_path().name == "lesion_ct_149aa77722ce1643.pt"

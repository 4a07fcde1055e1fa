"""The per-paper recipes of recipes.yaml: each loads, is distinct, and gives its documented grid and intensities.

Synthetic volumes with a known affine pin the numbers (spacing, window edges, z-score moments, crops); the real CT
in tests/data shows that the HDSSL CT recipe gives sensible output on anatomy.
"""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ssl3d.data.dataset import load_nifti
from ssl3d.data.recipes import apply_recipe, builtin_recipes, get_recipe, recipe_transform

from conftest import SHARED_CT

PAPER_RECIPES = ("hybridmim_pretrain_paper", "hybridmim_pretrain_code", "hybridmim_btcv", "hybridmim_msd_liver",
                 "hybridmim_msd_spleen", "hybridmim_brats2020", "pgl_ct", "hdssl_ct", "hdssl_mri")
CT_SPACING = (2.0, 2.0, 3.0)
CT_AFFINE = np.diag([*CT_SPACING, 1.0])
MR_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def synthetic_ct() -> np.ndarray:
    """Air at -1000 HU around an ellipsoidal body of soft tissue (-200..300 HU) with a bone block at 1500 HU."""
    shape = (48, 40, 24)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = ((grid / np.array([0.7, 0.6, 0.8])[:, None, None, None]) ** 2).sum(axis=0) <= 1
    rng = np.random.default_rng(0)
    ct = np.full(shape, -1000.0)
    ct[body] = rng.uniform(-200, 300, body.sum())
    ct[22:26, 18:22, 10:14] = 1500.0
    return ct.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_mr() -> np.ndarray:
    """Skull-stripped-like MRI: zero background, a dim rim (100..200) around a bright core (500..1000), one outlier."""
    shape = (40, 40, 30)
    radius2 = (np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")) ** 2).sum(axis=0)
    rng = np.random.default_rng(1)
    mr = np.zeros(shape, dtype=np.float32)
    mr[radius2 <= 0.5] = rng.uniform(100, 200, (radius2 <= 0.5).sum())
    mr[radius2 <= 0.2] = rng.uniform(500, 1000, (radius2 <= 0.2).sum())
    mr[20, 20, 15] = 50000.0
    return mr


def test_paper_recipes_load_by_name_with_distinct_hashes():
    known = builtin_recipes()
    assert set(PAPER_RECIPES) <= set(known)
    hashes = {get_recipe(name).hash for name in known}
    assert len(hashes) == len(known)
    for name in PAPER_RECIPES:
        assert get_recipe(name).description


@pytest.mark.parametrize("name, spacing", [
    ("hybridmim_pretrain_paper", (1.5, 1.5, 2.0)),
    ("hybridmim_pretrain_code", CT_SPACING),
])
def test_hybridmim_pretraining_maps_hu_onto_0001_to_1(synthetic_ct, name, spacing):
    out = apply_recipe(synthetic_ct, CT_AFFINE, get_recipe(name))
    np.testing.assert_allclose(out["spacing"], spacing, atol=1e-6)
    # air (-1000 HU) lands on b_min, bone (1500 HU, clipped at 1000) on b_max
    assert out["image"].min() == pytest.approx(0.001)
    assert out["image"].max() == pytest.approx(1.0)


def test_hybridmim_code_recipe_keeps_the_native_grid(synthetic_ct):
    out = apply_recipe(synthetic_ct, CT_AFFINE, get_recipe("hybridmim_pretrain_code"))
    assert out["image"].shape == synthetic_ct.shape
    np.testing.assert_allclose(out["image"], (np.clip(synthetic_ct, -1000, 1000) + 1000) / 2000 * 0.999 + 0.001,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["hybridmim_btcv", "hybridmim_msd_liver", "hybridmim_msd_spleen"])
def test_hybridmim_downstream_recipes_are_the_swinunetr_window(synthetic_ct, name):
    recipe = get_recipe(name)
    assert recipe.window == (-175.0, 250.0) and recipe.spacing == (1.5, 1.5, 2.0)
    out = apply_recipe(synthetic_ct, CT_AFFINE, recipe)
    np.testing.assert_allclose(out["spacing"], [1.5, 1.5, 2.0], atol=1e-6)
    assert 0.0 <= out["image"].min() and out["image"].max() == pytest.approx(1.0)
    # cropped to the body: the resampled field of view is larger than the cached grid
    fov = np.array(synthetic_ct.shape) * CT_SPACING / np.array([1.5, 1.5, 2.0])
    assert all(out["image"].shape < np.floor(fov))


def test_pgl_is_clip_then_per_volume_zscore(synthetic_ct):
    out = apply_recipe(synthetic_ct, CT_AFFINE, get_recipe("pgl_ct"))
    np.testing.assert_allclose(out["spacing"], CT_SPACING, atol=1e-6)
    image = out["image"]
    assert image.mean() == pytest.approx(0.0, abs=1e-4) and image.std() == pytest.approx(1.0, abs=1e-4)
    clipped = np.clip(synthetic_ct, -1024, 325)
    np.testing.assert_allclose(image, (clipped - clipped.mean()) / clipped.std(), atol=1e-4)


def test_hdssl_ct_crops_at_minus_500_hu_and_windows_to_0_1(synthetic_ct):
    out = apply_recipe(synthetic_ct, CT_AFFINE, get_recipe("hdssl_ct"))
    np.testing.assert_allclose(out["spacing"], [1.0, 1.0, 2.0], atol=1e-6)
    image = out["image"]
    # bone at 1500 HU is above the window's top (1000 HU): clipped to 1
    assert 0.0 <= image.min() and image.max() == pytest.approx(1.0)
    # the crop is the body's bounding box: every face of the grid touches tissue (scaled value >= that of -500 HU)
    body = image >= (-500 + 1350) / 2350 - 1e-3
    for axis in range(3):
        faces = np.moveaxis(body, axis, 0)
        assert faces[0].any() and faces[-1].any()


def test_hdssl_mri_clips_percentiles_and_crops_after_scaling(synthetic_mr):
    recipe = get_recipe("hdssl_mri")
    assert recipe.percentiles == (0.01, 99.9) and recipe.crop_after_intensity
    out = apply_recipe(synthetic_mr, MR_AFFINE, recipe)
    np.testing.assert_allclose(out["spacing"], [1.5, 1.5, 1.5], atol=1e-6)
    image = out["image"]
    assert image.min() == pytest.approx(0.0, abs=1e-3) and image.max() == pytest.approx(1.0)
    # the outlier is clipped at the 99.9th percentile instead of squeezing the core (500..1000) towards 0
    bright = image >= 0.3
    assert np.median(image[bright]) > 0.5
    # cropped after scaling to the bounding box of values >= 0.3: the bright core, without the dim rim (< 0.3)
    for axis in range(3):
        faces = np.moveaxis(bright, axis, 0)
        assert faces[0].any() and faces[-1].any()
    brain_mm = np.ptp(np.argwhere(synthetic_mr > 0), axis=0) + 1
    assert all(out["image"].shape < brain_mm / 1.5 - 3)


def test_brats_recipe_zscores_non_zero_voxels_per_channel(synthetic_mr):
    recipe = get_recipe("hybridmim_brats2020")
    out = apply_recipe(synthetic_mr, MR_AFFINE, recipe)
    np.testing.assert_allclose(out["spacing"], [1.0, 1.0, 1.0], atol=1e-6)
    brain = synthetic_mr != 0
    assert (out["image"][~brain] == 0).all()
    assert out["image"][brain].mean() == pytest.approx(0.0, abs=1e-4)
    assert out["image"][brain].std() == pytest.approx(1.0, abs=1e-4)
    # the recipe is ready for BraTS's four channels, each normalised on its own (the cache loads one channel today)
    four = np.stack([synthetic_mr * (c + 1) + 10 * c * (synthetic_mr != 0) for c in range(4)])
    data = {"image": MetaTensor(torch.as_tensor(four), affine=torch.as_tensor(MR_AFFINE))}
    normalised = recipe_transform(recipe, labelled=False)(data)["image"].numpy()
    for channel in normalised:
        assert channel[brain].mean() == pytest.approx(0.0, abs=1e-4)
        assert channel[brain].std() == pytest.approx(1.0, abs=1e-4)
        assert (channel[~brain] == 0).all()


@pytest.mark.parametrize("fields, message", [
    ({"window": [0, 1], "percentiles": [1, 99]}, "window and percentiles"),
    ({"zscore": "dataset"}, "zscore 'dataset'"),
    ({"crop_after_intensity": True}, "needs crop_foreground_above"),
])
def test_contradictory_recipes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        get_recipe({"name": "bad", **fields})


def test_real_ct_through_the_hdssl_ct_recipe():
    image, affine = load_nifti(SHARED_CT / "example_ct_sm.nii.gz")
    label, _ = load_nifti(SHARED_CT / "example_seg.nii.gz")
    out = apply_recipe(image, affine, get_recipe("hdssl_ct"), label, {5: 1})  # TotalSegmentator 5 = liver
    np.testing.assert_allclose(out["spacing"], [1.0, 1.0, 2.0], atol=1e-6)
    # 3 mm isotropic slab (366 x 303 x 90 mm) on a 1 x 1 x 2 mm grid, cropped to the body: at most 366 x 303 x 45
    assert out["image"].shape == out["label"].shape
    assert all(200 < n <= m for n, m in zip(out["image"].shape[:2], (366, 303))) and 40 <= out["image"].shape[2] <= 45
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    # liver (about 50-70 HU) sits at (HU + 1350) / 2350 ~ 0.6 of the vox2vec window
    assert np.median(out["image"][out["label"] == 1]) == pytest.approx(0.595, abs=0.02)

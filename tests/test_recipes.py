"""Recipes on the phantom and on the real CT in tests/data (TotalSegmentator example, Apache-2.0 / CC BY 4.0)."""

import nibabel as nib
import numpy as np
import pytest

from ssl3d.data.cache import load_cached_case, read_index
from ssl3d.data.dataset import load_nifti
from ssl3d.data.recipes import apply_recipe, builtin_recipes, get_recipe, remap_labels
from ssl3d.evaluate.metrics import case_metrics

from conftest import SHARED_CT

# TotalSegmentator v2 "total" label numbers -> BTCV's 13 organ classes.
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}
BTCV = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
        7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_vein", 11: "pancreas",
        12: "adrenal_gland_right", 13: "adrenal_gland_left"}


def test_builtin_recipes_all_load():
    for name in builtin_recipes():
        assert get_recipe(name).name == name


def test_unknown_recipe_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"preprocess.recipe: unknown recipe 'nope'; known: .*demo_ct"):
        get_recipe("nope")


def test_recipe_hash_follows_content():
    assert get_recipe("demo_ct").hash == get_recipe("demo_ct").hash
    assert get_recipe({"name": "a", "window": [0, 1]}).hash != get_recipe({"name": "a", "window": [0, 2]}).hash


def test_phantom_cache_is_ras_resampled_windowed_and_cropped(tiny_index, phantom_root):
    index = read_index(tiny_index)
    case = load_cached_case(index["dir"] / index["cases"]["phantom_000"]["file"])
    assert nib.aff2axcodes(case["affine"]) == ("R", "A", "S")
    np.testing.assert_allclose(case["spacing"], [4.0, 4.0, 4.0])
    assert 0.0 <= case["image"].min() and case["image"].max() <= 1.0
    assert set(np.unique(case["label"])) == set(range(7))
    # the body crop removed the air around the body: the cached grid is smaller than the resampled field of view
    raw = nib.load(phantom_root / "imagesTr" / "phantom_000.nii.gz")
    fov = np.array(raw.shape) * np.array(raw.header.get_zooms())
    assert case["image"].shape[1] < fov[0] / 4.0 and case["image"].shape[2] < fov[1] / 4.0
    assert index["classes"]["4"] == "liver" and "0" not in index["classes"]


def test_remap_labels_drops_unlisted_values():
    label = np.array([0, 1, 5, 52, 99, 15])
    np.testing.assert_array_equal(remap_labels(label, TOTALSEG_TO_BTCV), [0, 1, 6, 8, 0, 5])


@pytest.fixture(scope="module")
def real_ct():
    image, affine = load_nifti(SHARED_CT / "example_ct_sm.nii.gz")
    label, _ = load_nifti(SHARED_CT / "example_seg.nii.gz")
    return image, label, affine


def test_real_ct_through_the_btcv_recipe(real_ct):
    image, label, affine = real_ct
    assert image.dtype == np.int16 and image.shape == (122, 101, 30)
    out = apply_recipe(image, affine, get_recipe("btcv_swinunetr"), label, TOTALSEG_TO_BTCV)
    np.testing.assert_allclose(out["spacing"], [1.5, 1.5, 2.0], atol=1e-6)
    assert nib.aff2axcodes(out["affine"]) == ("R", "A", "S")
    assert out["image"].shape == out["label"].shape
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    # 12 of the 13 BTCV organs are in this slab (esophagus is not)
    assert set(np.unique(out["label"])) == set(range(14)) - {5}
    # resampling keeps organ volumes: liver in mL before (3 mm isotropic) and after (1.5 x 1.5 x 2 mm)
    before = (label == 5).sum() * 27.0 / 1000
    after = (out["label"] == 6).sum() * 1.5 * 1.5 * 2.0 / 1000
    assert after == pytest.approx(before, rel=0.03)
    # anatomy in RAS: the liver (patient's right) lies at larger axis-0 coordinates than the spleen
    liver_x = np.argwhere(out["label"] == 6)[:, 0].mean()
    spleen_x = np.argwhere(out["label"] == 1)[:, 0].mean()
    assert liver_x > spleen_x


def test_metrics_on_real_anatomy(real_ct):
    image, label, affine = real_ct
    out = apply_recipe(image, affine, get_recipe("btcv_swinunetr"), label, TOTALSEG_TO_BTCV)
    ref = out["label"]
    pred = np.zeros_like(ref)
    pred[:, :, 2:] = ref[:, :, :-2]  # every organ shifted 2 slices (4 mm) up, without wrapping around
    classes = {k: v for k, v in BTCV.items() if k in (1, 6, 8)}
    rows = {(r["target"], r["metric"]): r["value"]
            for r in case_metrics(pred, ref, classes, tuple(out["spacing"]), nsd_tolerance_mm=2.0)}
    same = {(r["target"], r["metric"]): r["value"]
            for r in case_metrics(ref, ref, classes, tuple(out["spacing"]), nsd_tolerance_mm=2.0)}
    for organ in classes.values():
        assert same[(organ, "dice")] == 1.0 and same[(organ, "hd95")] == 0.0 and same[(organ, "nsd")] == 1.0
        # a 4 mm shift: no surface point moves further than 4 mm, and a large organ keeps most of its overlap
        assert 0.0 < rows[(organ, "hd95")] <= 4.0 + 1e-6
        assert rows[(organ, "nsd")] < 1.0
    assert rows[("liver", "dice")] > 0.85

"""The procedural CT phantom: determinism, anatomy, intensities, orientation and the MSD dataset layout."""

import json
import math
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ssl3d.data.phantom import LABELS, MIN_SHAPE, case_seed, make_phantom, write_phantom_dataset

SMALL = (64, 64, 32)
SPACING = (1.6, 1.6, 3.0)
# Nominal contrast-CT values (HU) from the phantom's specification; the stomach mixes wall (~40) and content (~10).
NOMINAL_HU = {"spleen": 50, "kidney_right": 150, "kidney_left": 150, "liver": 60, "stomach": 25, "aorta": 200}
ID = {name: label_id for label_id, name in LABELS.items()}


@pytest.fixture(scope="module")
def default_cases():
    return [make_phantom(seed) for seed in range(3)]


def canonical(array, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asanyarray(img.dataobj), img.affine


def test_same_seed_same_case_other_seed_other_case():
    image, label, affine = make_phantom(3, SMALL)
    again = make_phantom(3, SMALL)
    other = make_phantom(4, SMALL)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    np.testing.assert_array_equal(affine, again[2])
    assert not np.array_equal(image, other[0])
    assert not np.array_equal(label, other[1])


def test_types_shapes_and_value_range(default_cases):
    for image, label, affine in default_cases:
        assert image.dtype == np.int16 and label.dtype == np.uint8 and affine.dtype == np.float64
        assert image.shape == label.shape == (96, 96, 48) and affine.shape == (4, 4)
        assert -1024 <= image.min() and image.max() <= 3071
        assert set(np.unique(label)) <= set(LABELS)


def test_every_organ_present_inside_and_liver_largest(default_cases):
    for image, label, _ in default_cases:
        counts = np.bincount(label.ravel(), minlength=len(LABELS))
        assert (counts[1:] >= 200).all(), dict(zip(LABELS.values(), counts))
        assert counts[1:].argmax() + 1 == ID["liver"]
        border = np.ones(label.shape, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not label[border].any(), "an organ touches the volume border"
        # organs lie inside the body: everything within 2 voxels of an organ is tissue, not outside air
        around = ndimage.binary_dilation(label > 0, iterations=2)
        outside = ndimage.binary_fill_holes(image > -500) == 0
        assert not (around & outside).any()


def test_every_organ_present_at_the_smallest_shape():
    for seed in range(5):
        _, label, _ = make_phantom(seed, MIN_SHAPE)
        assert set(np.unique(label)) == set(LABELS)


def test_mean_hu_of_each_organ_is_near_its_nominal_value(default_cases):
    for image, label, _ in default_cases:
        gas = ndimage.binary_dilation(image < -300, iterations=2)  # the stomach's gas pocket and its blurred rim
        for name, nominal in NOMINAL_HU.items():
            interior = ndimage.binary_erosion(label == ID[name]) & ~gas  # away from partial-volume edges
            assert interior.sum() > 50
            assert abs(image[interior].mean() - nominal) < 25, (name, image[interior].mean())
        assert abs(image[:4, :4].mean() - (-1000)) < 25  # air in the corners, outside the body


def test_on_disk_lps_and_canonical_ras_anatomy(default_cases):
    for image, label, affine in default_cases:
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
        ras_image, ras_affine = canonical(image, affine)
        ras_label, _ = canonical(label, affine)
        assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
        np.testing.assert_array_equal(ras_label, label[::-1, ::-1])  # a pure flip, no resampling
        np.testing.assert_array_equal(ras_image, image[::-1, ::-1])

        def centroid(mask):
            return np.array(np.nonzero(mask)).mean(axis=1)

        liver, spleen = centroid(ras_label == ID["liver"]), centroid(ras_label == ID["spleen"])
        kidney_r, kidney_l = centroid(ras_label == ID["kidney_right"]), centroid(ras_label == ID["kidney_left"])
        stomach, aorta = centroid(ras_label == ID["stomach"]), centroid(ras_label == ID["aorta"])
        bone = centroid(ras_image > 300)
        assert liver[0] > spleen[0] and kidney_r[0] > kidney_l[0]  # patient's right = larger axis 0 in RAS
        assert stomach[1] > aorta[1] > bone[1] and spleen[1] < stomach[1]  # anterior = larger axis 1
        assert liver[2] > (kidney_r[2] + kidney_l[2]) / 2  # superior = larger axis 2


def test_default_case_generation_time():
    make_phantom(0)
    start = time.perf_counter()
    for seed in range(3):
        make_phantom(seed)
    print(f"\nmake_phantom at the default shape: {(time.perf_counter() - start) / 3:.3f} s per case")


def _read(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def test_dataset_layout_headers_and_dataset_json(tmp_path):
    out = tmp_path / "phantom"
    spacing = (1.5, 1.25, 2.5)
    dataset_json = write_phantom_dataset(out, n_labelled=2, n_unlabelled=2, seed=11, shape=MIN_SHAPE, spacing=spacing)
    assert dataset_json == out / "dataset.json"
    meta = json.loads(dataset_json.read_text())

    assert meta["name"] == "phantom" and meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["reference"] == "ssl3d procedural CT phantom" and meta["licence"] == "CC0-1.0 (synthetic)"
    assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
    assert meta["numTraining"] == 2 and meta["numTest"] == 2
    assert meta["training"] == [
        {"image": f"./imagesTr/phantom_00{k}.nii.gz", "label": f"./labelsTr/phantom_00{k}.nii.gz"} for k in (0, 1)
    ]
    assert meta["test"] == ["./imagesTs/phantom_002.nii.gz", "./imagesTs/phantom_003.nii.gz"]
    assert meta["generator"] == {"seed": 11, "shape": list(MIN_SHAPE), "spacing": list(spacing)}

    listed = {e["image"] for e in meta["training"]} | {e["label"] for e in meta["training"]} | set(meta["test"])
    on_disk = {f"./{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file()} - {"./dataset.json"}
    assert listed == on_disk
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert dataset_json.stat().st_mtime_ns >= max((out / rel).stat().st_mtime_ns for rel in listed)

    for entry in meta["training"]:
        image, image_img = _read(out / entry["image"])
        label, label_img = _read(out / entry["label"])
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape == MIN_SHAPE
        np.testing.assert_array_equal(image_img.affine, label_img.affine)
        for img in (image_img, label_img):
            assert np.allclose(img.header.get_zooms(), spacing)
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            assert img.header.get_xyzt_units()[0] == "mm"
        assert set(np.unique(label)) == set(LABELS)
    image, _ = _read(out / meta["test"][0])
    assert image.dtype == np.int16 and image.shape == MIN_SHAPE


def test_case_k_does_not_depend_on_the_number_of_cases(tmp_path):
    small = write_phantom_dataset(tmp_path / "small", 2, 0, seed=5, shape=MIN_SHAPE).parent
    large = write_phantom_dataset(tmp_path / "large", 4, 1, seed=5, shape=MIN_SHAPE).parent
    for k in (0, 1):
        name = f"phantom_00{k}.nii.gz"
        for folder in ("imagesTr", "labelsTr"):
            np.testing.assert_array_equal(_read(small / folder / name)[0], _read(large / folder / name)[0])
        expected_image, _, _ = make_phantom(case_seed(5, k), MIN_SHAPE)
        np.testing.assert_array_equal(_read(small / "imagesTr" / name)[0], expected_image)
    assert not np.array_equal(_read(large / "imagesTr/phantom_000.nii.gz")[0],
                              _read(large / "imagesTr/phantom_001.nii.gz")[0])


@pytest.mark.parametrize("kwargs, argument", [
    ({"seed": -1}, "seed"),
    ({"shape": (40, 96, 48)}, "shape"),
    ({"shape": (96, 96)}, "shape"),
    ({"shape": (96, 96, 47.5)}, "shape"),
    ({"spacing": (1.6, 0.0, 3.0)}, "spacing"),
    ({"spacing": (1.6, -1.6, 3.0)}, "spacing"),
    ({"spacing": (1.6, math.nan, 3.0)}, "spacing"),
])
def test_make_phantom_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_phantom(**{"seed": 0, **kwargs})


@pytest.mark.parametrize("kwargs, argument", [
    ({"n_labelled": -1}, "n_labelled"),
    ({"n_unlabelled": -2}, "n_unlabelled"),
    ({"n_labelled": 1.5}, "n_labelled"),
    ({"n_labelled": 0, "n_unlabelled": 0}, "n_labelled"),
    ({"seed": -3}, "seed"),
    ({"shape": (48, 48, 8)}, "shape"),
    ({"spacing": (1.0, 1.0)}, "spacing"),
])
def test_write_phantom_dataset_rejects_bad_arguments_before_writing(tmp_path, kwargs, argument):
    out = tmp_path / "phantom"
    with pytest.raises(ValueError, match=argument):
        write_phantom_dataset(out, **{"n_labelled": 1, "n_unlabelled": 1, "seed": 0, **kwargs})
    assert not out.exists()

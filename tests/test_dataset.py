"""Bad input fails with the file's name and what is wrong, and leaves nothing half-written."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ssl3d.data.cache import preprocess_dataset
from ssl3d.data.dataset import DataError, read_dataset, validate_case
from ssl3d.data.recipes import get_recipe
from ssl3d.io import beside

from conftest import TINY_RECIPE


@pytest.fixture
def dataset_copy(phantom_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    return root


def test_reads_cases_from_dataset_json_and_skips_appledouble(dataset_copy):
    meta = json.loads((dataset_copy / "dataset.json").read_text())
    shutil.copy(dataset_copy / meta["training"][0]["image"], dataset_copy / "imagesTr" / "._phantom_000.nii.gz")
    meta["training"].append({"image": "./imagesTr/._phantom_000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"})
    (dataset_copy / "dataset.json").write_text(json.dumps(meta))
    dataset = read_dataset(dataset_copy)
    assert [c.case_id for c in dataset.labelled] == [f"phantom_{i:03d}" for i in range(5)]
    assert [c.case_id for c in dataset.unlabelled] == ["phantom_005"]
    assert dataset.labels[4] == "liver"


def test_missing_listed_file_is_named(dataset_copy):
    (dataset_copy / "labelsTr" / "phantom_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/phantom_002\.nii\.gz: listed in .*dataset\.json but missing"):
        read_dataset(dataset_copy)


def test_truncated_file_is_named(dataset_copy):
    path = dataset_copy / "imagesTr" / "phantom_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    case = read_dataset(dataset_copy).case("phantom_001")
    with pytest.raises(DataError, match=r"phantom_001\.nii\.gz: cannot be read as NIfTI .*corrupt or truncated"):
        validate_case(case)


def test_corrupt_file_is_named(dataset_copy):
    path = dataset_copy / "labelsTr" / "phantom_003.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 40))
    with pytest.raises(DataError, match=r"labelsTr/phantom_003\.nii\.gz: cannot be read as NIfTI"):
        validate_case(read_dataset(dataset_copy).case("phantom_003"))


def _rewrite_label(path, array=None, affine=None):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if array is None else array,
                             img.affine if affine is None else affine), path)


def test_shape_mismatch_names_both_files(dataset_copy):
    path = dataset_copy / "labelsTr" / "phantom_000.nii.gz"
    _rewrite_label(path, array=np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(DataError, match=r"phantom_000\.nii\.gz: label shape \(10, 10, 10\) differs from image shape "
                                        r"\(64, 64, 32\) of .*imagesTr/phantom_000\.nii\.gz"):
        validate_case(read_dataset(dataset_copy).case("phantom_000"))


def test_affine_mismatch_is_named(dataset_copy):
    path = dataset_copy / "labelsTr" / "phantom_000.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    _rewrite_label(path, affine=affine)
    with pytest.raises(DataError, match=r"labelsTr/phantom_000\.nii\.gz: label affine differs .*5 mm"):
        validate_case(read_dataset(dataset_copy).case("phantom_000"))


def test_preprocess_stops_on_a_bad_case_and_leaves_no_partial_output(dataset_copy, tmp_path):
    path = dataset_copy / "imagesTr" / "phantom_003.nii.gz"
    path.write_bytes(path.read_bytes()[:500])
    out = tmp_path / "cache"
    with pytest.raises(DataError, match="phantom_003"):
        preprocess_dataset(dataset_copy, get_recipe(TINY_RECIPE), out)
    assert not out.exists()  # the folder appears only complete; the cases made so far wait for the rerun
    assert sorted(p.name for p in beside(out, "cases").iterdir()) == [f"phantom_{i:03d}.npz" for i in range(3)]


def test_preprocess_resumes_and_rebuilds_when_the_recipe_changes(dataset_copy, tmp_path):
    out = tmp_path / "cache"
    recipe = get_recipe(TINY_RECIPE)
    preprocess_dataset(dataset_copy, recipe, out)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    preprocess_dataset(dataset_copy, recipe, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == first
    preprocess_dataset(dataset_copy, get_recipe({**TINY_RECIPE, "window": [-100, 200]}), out)
    assert all(p.stat().st_mtime_ns != first[p.name] for p in out.glob("*.npz"))

"""Bad real-world data: never a silent wrong result, never a stale one. Non-finite and empty volumes, label values
the dataset does not declare and empty label maps are caught where every voxel is read (preprocessing); a source
file changed in place rebuilds its cached case; a bring-your-own folder's files are part of the runs' identity."""

import copy
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

from ssl3d.data.cache import load_cached_case, preprocess_dataset
from ssl3d.data.dataset import DataError
from ssl3d.data.files import folder_cases
from ssl3d.data.recipes import get_recipe
from ssl3d.plan import finetune_runs, stage_settings

from conftest import REPO, TINY_RECIPE, rewrite

RECIPE = get_recipe(TINY_RECIPE)


@pytest.fixture
def dataset_copy(phantom_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    return root


def cases(index) -> dict:
    return json.loads(index.read_text())["cases"]


def test_a_source_file_changed_in_place_rebuilds_its_cached_case_only(dataset_copy, tmp_path):
    out = tmp_path / "cache"
    preprocess_dataset(dataset_copy, RECIPE, out)
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.npz")}
    rewrite(dataset_copy / "labelsTr" / "phantom_002.nii.gz", lambda label: np.zeros_like(label))
    index = preprocess_dataset(dataset_copy, RECIPE, out)
    after = {path.name: path.stat().st_mtime_ns for path in out.glob("*.npz")}
    assert [name for name in before if after[name] != before[name]] == ["phantom_002.npz"]
    assert not load_cached_case(out / "phantom_002.npz")["label"].any()
    assert cases(index)["phantom_002"]["empty_label"] is True  # reported, not silently scored NaN
    assert "empty_label" not in cases(index)["phantom_001"]


@pytest.mark.parametrize("where", ["slab", "everywhere"])
def test_non_finite_voxels_are_an_error_naming_the_file_and_the_count_or_replaced_when_asked(dataset_copy, tmp_path,
                                                                                           where):
    def poison(image):
        image = image.astype(np.float32)
        image[:, :, slice(2, 4) if where == "slab" else slice(None)] = np.nan
        return image

    path = dataset_copy / "imagesTr" / "phantom_001.nii.gz"
    rewrite(path, poison)
    bad = int(np.isnan(np.asarray(nib.load(path).dataobj)).sum())
    with pytest.raises(DataError, match=rf"phantom_001\.nii\.gz: {bad} of \d+ voxels are NaN or infinite"):
        preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache")
    assert not (tmp_path / "cache" / "index.json").exists()
    if where == "everywhere":  # replaced by air, nothing is left after the body crop: an error too
        with pytest.raises(DataError, match=r"phantom_001\.nii\.gz: nothing is left after recipe 'tiny_ct' crops"):
            preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache", nonfinite=-1024)
        return
    index = preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache", nonfinite=-1024)
    assert cases(index)["phantom_001"]["nonfinite_replaced"] == bad
    assert json.loads(index.read_text())["options"] == {"nonfinite": -1024, "undeclared_labels": "error"}
    assert np.isfinite(load_cached_case(tmp_path / "cache" / "phantom_001.npz")["image"]).all()


def test_an_all_air_volume_is_an_error_not_a_zero_voxel_case(dataset_copy, tmp_path):
    rewrite(dataset_copy / "imagesTs" / "phantom_005.nii.gz", lambda image: np.full_like(image, -1000))
    with pytest.raises(DataError, match=r"phantom_005\.nii\.gz: nothing is left .* the volume is empty"):
        preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache")


def test_label_values_the_dataset_does_not_declare_are_named_or_set_to_background_when_asked(dataset_copy,
                                                                                            tmp_path):
    def add_nine(label):
        label[0, 0, :3] = 9
        return label

    rewrite(dataset_copy / "labelsTr" / "phantom_004.nii.gz", add_nine)
    with pytest.raises(DataError, match=r"phantom_004\.nii\.gz: label values \[9\] are not declared"):
        preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache")
    index = preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache", undeclared_labels="background")
    assert cases(index)["phantom_004"]["undeclared_to_background"] == {"9": 3}
    assert load_cached_case(tmp_path / "cache" / "phantom_004.npz")["label"].max() < 9
    assert "undeclared_to_background" not in cases(index)["phantom_003"]


@pytest.mark.parametrize("value", [np.nan, 0.6], ids=["nan", "fraction"])
def test_label_values_that_are_not_whole_numbers_are_an_error_naming_the_file(dataset_copy, tmp_path, value):
    """Not a NaN crash without a file name, nor a 0.6 silently cast to class 0."""
    def smudge(label):
        label = label.astype(np.float32)
        label[0, 0, :2] = value
        return label

    rewrite(dataset_copy / "labelsTr" / "phantom_002.nii.gz", smudge)
    with pytest.raises(DataError, match=r"phantom_002\.nii\.gz: 2 voxels hold label values that are not whole"):
        preprocess_dataset(dataset_copy, RECIPE, tmp_path / "cache")


def test_a_folder_in_nnunet_naming_pairs_case_0000_images_with_case_labels(tmp_path):
    for name in ("liver_001_0000.nii.gz", "liver_002_0000.nii.gz", "liver_003_0000.nii.gz"):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    (tmp_path / "labelsTr").mkdir()
    for name in ("liver_001.nii.gz", "liver_002.nii.gz"):
        (tmp_path / "labelsTr" / name).write_bytes(b"")
    found = [(case_id, image.name, label and label.name)
             for case_id, image, label in folder_cases(tmp_path / "imagesTr", tmp_path / "labelsTr")]
    assert found == [("liver_001", "liver_001_0000.nii.gz", "liver_001.nii.gz"),
                     ("liver_002", "liver_002_0000.nii.gz", "liver_002.nii.gz"),
                     ("liver_003", "liver_003_0000.nii.gz", None)]  # unlabelled, named as the others
    (tmp_path / "imagesTr" / "liver_001_0001.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="nnU-Net images of several channels"):
        folder_cases(tmp_path / "imagesTr", tmp_path / "labelsTr")


def demo_on_a_folder(images, labels) -> dict:
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["datasets"] = {"phantom": {"source": "folder", "images": str(images), "labels": str(labels)}}
    return config


def test_a_folder_datasets_files_are_part_of_every_run_identity(dataset_copy):
    config = demo_on_a_folder(dataset_copy / "imagesTr", dataset_copy / "labelsTr")
    names = set(finetune_runs(config))
    assert set(finetune_runs(config)) == names
    rewrite(dataset_copy / "labelsTr" / "phantom_002.nii.gz", lambda label: label)  # rewritten: a new mtime
    edited = set(finetune_runs(config))
    assert not edited & names
    shutil.copy(dataset_copy / "imagesTs" / "phantom_005.nii.gz", dataset_copy / "imagesTr" / "extra.nii.gz")
    assert not set(finetune_runs(config)) & (names | edited)


def test_each_data_stage_sees_only_its_keys_canonically(dataset_copy):
    config = demo_on_a_folder(dataset_copy / "imagesTr", dataset_copy / "labelsTr")
    before = {stage: stage_settings(config, "phantom", stage) for stage in ("fetch", "prepare", "preprocess")}
    entry = config["datasets"]["phantom"]
    config["datasets"]["phantom"] = {"label_fractions": [0.2, 1.0], **dict(reversed(entry.items()))}
    assert {stage: stage_settings(config, "phantom", stage) for stage in before} == before
    config["datasets"]["phantom"]["nonfinite"] = -1024
    assert stage_settings(config, "phantom", "preprocess") == '{"nonfinite": -1024}'

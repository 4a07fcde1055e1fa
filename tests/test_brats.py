"""BraTS end to end on tiny synthetic cases: four modalities converted to one 4-channel image, cached as
(4, X, Y, Z) with the labels 0/1/2/4 renumbered, a network with four inputs trained from scratch or from a
four-channel pre-training, and the test cases scored on the TC / WT / ET regions."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ssl3d.data.cache import load_cached_case, preprocess_dataset, read_index
from ssl3d.data.convert import convert
from ssl3d.data.recipes import get_recipe
from ssl3d.data.splits import make_splits
from ssl3d.evaluate.metrics import EmptyPolicy
from ssl3d.evaluate.run import evaluate_run, target_metrics
from ssl3d.finetune.train import finetune
from ssl3d.io import read_json, write_json
from ssl3d.pretrain.loop import pretrain

from conftest import run_config

SHAPE = (24, 24, 16)
REGIONS = {"TC": [1, 3], "WT": [1, 2, 3], "ET": [3]}  # BraTS's 1+4, 1+2+4 and 4 after 4 became class 3


def tumour(centre, shift=0) -> np.ndarray:
    """Nested spheres: edema (2) around the core (1) around the enhancing tumour (4)."""
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    distance = np.linalg.norm(grid - np.array(centre) - shift, axis=-1)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[distance < 7], seg[distance < 5], seg[distance < 2.5] = 2, 1, 4
    return seg


def write_case(root, n, rng):
    case = root / f"BraTS20_Training_{n:03d}"
    case.mkdir(parents=True)
    seg = tumour((12, 12, 8), shift=rng.integers(-2, 3, 3))
    brain = np.zeros(SHAPE, dtype=np.float32)
    brain[2:-2, 2:-2, 2:-2] = 1
    for k, suffix in enumerate(("flair", "t1", "t1ce", "t2")):  # each modality shows one part of the tumour
        image = brain * (100 + 10 * k + (seg == (1, 2, 4, 2)[k]) * 80 + rng.normal(0, 3, SHAPE))
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), case / f"{case.name}_{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(seg, np.eye(4)), case / f"{case.name}_seg.nii.gz")


@pytest.fixture(scope="module")
def brats_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    rng = np.random.default_rng(0)
    for n in range(1, 6):
        write_case(root / "source" / "MICCAI_BraTS2020_TrainingData", n, rng)
    convert("brats2020", root / "source", root / "raw")
    return preprocess_dataset(root / "raw", get_recipe("hybridmim_brats2020"), root / "cache"), root


def test_the_cache_holds_four_channels_and_contiguous_classes_with_the_regions(brats_cache):
    index_path, _ = brats_cache
    index = read_index(index_path)
    assert index["channels"] == 4 and {case["channels"] for case in index["cases"].values()} == {4}
    assert index["classes"] == {"1": "necrotic_and_non_enhancing_tumour_core", "2": "peritumoral_edema",
                                "3": "enhancing_tumour"}
    assert index["regions"] == REGIONS
    case = load_cached_case(index["dir"] / index["cases"]["BraTS20_Training_001"]["file"])
    assert case["image"].shape == (4, *SHAPE) and case["label"].shape == (1, *SHAPE)
    assert set(np.unique(case["label"])) == {0, 1, 2, 3}
    brain = case["image"][:, 2:-2, 2:-2, 2:-2]  # z-scored per channel over the non-zero (brain) voxels
    np.testing.assert_allclose(brain.reshape(4, -1).mean(axis=1), 0, atol=1e-4)
    assert (case["image"][:, 0] == 0).all()  # background stays zero


def test_a_four_input_network_trains_and_is_scored_on_the_regions(brats_cache, tmp_path):
    index_path, root = brats_cache
    ids = sorted(read_index(index_path)["cases"])
    splits = tmp_path / "splits.json"
    write_json(splits, make_splits(ids, seed=0, n_validation=1, n_test=2, label_fractions=[1.0], n_subsets=1))
    config = run_config(tmp_path / "config.json", index_path, splits, dataset="brats2020", steps=4, val_every=2,
                        checkpoint_every=2, patch_size=[16, 16, 16],
                        inference={"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 2})
    model = finetune(config, tmp_path / "run")
    assert torch.load(model, weights_only=False)["in_channels"] == 4
    table = pd.read_csv(evaluate_run(config, model, tmp_path / "per_case.csv", 1.0, EmptyPolicy()))
    assert sorted(table["target"].unique()) == ["ET", "TC", "WT"] and table["case_id"].nunique() == 2
    assert table["value"].notna().all()


def test_region_metrics_join_the_classes_of_each_region():
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[4:8, 4:8, 4:8], ref[8:12, 4:8, 4:8], ref[12:16, 4:8, 4:8] = 1, 2, 3
    pred = ref.copy()
    pred[12:16, 4:8, 4:8] = 1  # the enhancing tumour called core: TC and WT still right, ET missed
    rows = target_metrics(pred, ref, {1: "ncr", 2: "ed", 3: "et"}, REGIONS, (1.0, 1.0, 1.0), 1.0, EmptyPolicy())
    dice = {row["target"]: row["value"] for row in rows if row["metric"] == "dice"}
    assert dice == {"TC": 1.0, "WT": 1.0, "ET": 0.0}
    classes = target_metrics(pred, ref, {1: "ncr", 2: "ed", 3: "et"}, {}, (1.0, 1.0, 1.0), 1.0, EmptyPolicy())
    ncr = next(row["value"] for row in classes if row["target"] == "ncr" and row["metric"] == "dice")
    assert ncr == pytest.approx(2 * 64 / (128 + 64))  # without regions: per class, as before


def test_hybridmim_pre_trains_on_four_channels_and_initialises_a_four_input_network(brats_cache, tmp_path):
    """HybridMIM's task-specific rows (HybridMIM*, Tables 3-4) pre-train on BraTS's four modalities."""
    index_path, _ = brats_cache
    spec = {"method": "hybridmim", "backbone": {"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]},
            "method_config": {"patch_size": [32, 32, 32], "batch_size": 2, "mask_patch": 8, "reconstruction_size": 16},
            "seed": 0, "steps": 2, "checkpoint_every": 5,
            "pool": [{"dataset": "brats2020", "data": {"pretrain_cases": "all"}}]}
    write_json(tmp_path / "pre.json", {"run_id": "pre", "spec": spec, "inputs": {"caches": [str(index_path)]}})
    pretrained = pretrain(tmp_path / "pre.json", tmp_path / "pre")
    assert torch.load(pretrained, weights_only=False)["state_dict"]["network.conv_0.conv_0.conv.weight"].shape[1] == 4
    ids = sorted(read_index(index_path)["cases"])
    splits = tmp_path / "splits.json"
    write_json(splits, make_splits(ids, seed=0, n_validation=1, n_test=2, label_fractions=[1.0], n_subsets=1))
    config = run_config(tmp_path / "config.json", index_path, splits, dataset="brats2020", init="hybridmim",
                        backbone=spec["backbone"], steps=2, val_every=2, checkpoint_every=2, patch_size=[16, 16, 16],
                        inference={"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 2})
    write_json(config, {**read_json(config), "inputs": {**read_json(config)["inputs"], "pretrained": str(pretrained)}})
    manifest = read_json(finetune(config, tmp_path / "run").parent / "manifest.json")
    assert manifest["transfer"]["fractions"]["encoder"] == 1.0

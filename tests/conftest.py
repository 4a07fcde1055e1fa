"""Shared fixtures: a tiny phantom dataset, preprocessed and split, built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ssl3d.data.cache import preprocess_dataset
from ssl3d.data.phantom import write_phantom_dataset
from ssl3d.data.recipes import get_recipe
from ssl3d.data.splits import make_splits
from ssl3d.io import write_json

REPO = Path(__file__).resolve().parents[1]
# The real CT fixture lives outside the repository (../shared/data beside the checkout, or $SSL3D_SHARED_DATA).
SHARED_CT = Path(os.environ.get("SSL3D_SHARED_DATA", REPO.parent / "shared" / "data")) / "totalsegmentator-example"
TINY_SHAPE = (64, 64, 32)
TINY_RECIPE = {"name": "tiny_ct", "spacing": [4.0, 4.0, 4.0], "crop_foreground_above": -500, "window": [-175, 250]}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_labelled=5, n_unlabelled=1, seed=0, shape=TINY_SHAPE, spacing=(2.0, 2.0, 3.0))
    return root


@pytest.fixture(scope="session")
def tiny_index(phantom_root, tmp_path_factory) -> Path:
    return preprocess_dataset(phantom_root, get_recipe(TINY_RECIPE), tmp_path_factory.mktemp("cache") / "phantom")


@pytest.fixture(scope="session")
def tiny_splits(tiny_index) -> Path:
    cases = [case_id for case_id, case in json.loads(tiny_index.read_text())["cases"].items() if case["labelled"]]
    path = tiny_index.parent / "splits.json"
    write_json(path, make_splits(cases, seed=0, n_validation=1, n_test=1, label_fractions=[0.5, 1.0], n_subsets=1))
    return path


def run_config(path: Path, index: Path, splits: Path, run_id: str = "test", **overrides) -> Path:
    """A run config as the workflow writes it, for a few steps of a very small UNet."""
    spec = {
        "dataset": "phantom", "protocol": "finetune", "init": "scratch", "label_fraction": 1.0, "subset": 0,
        "seed": 0, "backbone": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0}, "steps": 12, "batch_size": 2,
        "patch_size": [24, 24, 16], "pos_neg_ratio": [1, 1], "val_every": 6, "checkpoint_every": 4,
        "inference": {"roi_size": [24, 24, 16], "overlap": 0.25, "sw_batch_size": 2},
        **overrides,
    }
    write_json(path, {"run_id": run_id, "spec": spec, "inputs": {"cache_index": str(index), "splits": str(splits)}})
    return path

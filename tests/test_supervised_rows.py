"""The supervised rows of the papers' tables: ``scratch`` fine-tuning and evaluation on every segmentation
backbone, through the same run code as the demo's UNet."""

import pandas as pd
import pytest

from ssl3d.evaluate.metrics import EmptyPolicy
from ssl3d.evaluate.run import evaluate_run
from ssl3d.finetune.train import finetune
from ssl3d.io import read_json

from conftest import run_config

PATCH = [32, 32, 16]
BACKBONES = {
    "segresnet": {"name": "segresnet", "init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1],
                  "norm": ["GROUP", {"num_groups": 2}]},
    "unetr": {"name": "unetr", "img_size": PATCH, "feature_size": 4, "hidden_size": 32, "mlp_dim": 64,
              "num_heads": 2},
    "basicunet": {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]},
    "hybridmim_unet": {"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]},
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_scratch_trains_and_evaluates_on_each_backbone(backbone, tiny_index, tiny_splits, tmp_path):
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, backbone=BACKBONES[backbone], steps=2,
                        val_every=2, patch_size=PATCH,
                        inference={"roi_size": PATCH, "overlap": 0.25, "sw_batch_size": 2})
    model = finetune(config, tmp_path / "run")
    assert read_json(tmp_path / "run" / "manifest.json")["config"]["backbone"]["name"] == backbone
    table = pd.read_csv(evaluate_run(config, model, tmp_path / "per_case.csv", 2.0, EmptyPolicy()))
    assert set(table["backbone"]) == {backbone} and set(table["init"]) == {"scratch"}
    assert table.loc[table["metric"] == "dice", "value"].between(0, 1).all()

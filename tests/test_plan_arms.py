"""The fine-tuning grid's protocol axis and per-arm settings: what they add to run identities, and what they leave
alone (the identities of arms they do not touch)."""

import copy

import pytest
import yaml

from ssl3d.plan import finetune_runs
from ssl3d.validate import config_problems

from conftest import REPO

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def with_finetune(**settings) -> dict:
    config = copy.deepcopy(DEMO)
    config["finetune"].update(settings)
    return config


def test_an_explicit_finetune_protocol_changes_no_identity():
    assert finetune_runs(with_finetune(protocols={"finetune": None})) == finetune_runs(DEMO)


def test_each_protocol_is_a_grid_axis_named_after_the_init_and_part_of_the_identity():
    runs = finetune_runs(with_finetune(protocols={
        "finetune": None, "probe": {"features": "encoder", "optimizer": {"lr": 0.1}},
        "frozen_then_finetune": {"frozen_steps": 50, "ramp_steps": 100}}))
    base = finetune_runs(DEMO)
    assert len(runs) == 3 * len(base) and all(runs[name] == run for name, run in base.items())
    probes = {name: run for name, run in runs.items() if run["spec"]["protocol"] == "probe"}
    assert len(probes) == len(base) and all("_probe_" in name for name in probes)
    spec = next(run["spec"] for name, run in probes.items() if name.startswith("phantom_byol_probe_unet_"))
    assert spec["protocol_settings"] == {"features": "encoder"}
    assert spec["optimizer"] == {**DEMO["finetune"]["optimizer"], "lr": 0.1}  # one field overridden
    frozen = [run["spec"] for run in runs.values() if run["spec"]["protocol"] == "frozen_then_finetune"]
    assert {str(s["protocol_settings"]) for s in frozen} == {str({"frozen_steps": 50, "ramp_steps": 100})}
    assert len({run["run_id"] for run in runs.values()}) == len(runs)


def two_backbones(**settings) -> dict:
    """The demo with a second network in the grid: HybridMIM's UNet, trained from scratch."""
    return with_finetune(backbones=[*DEMO["finetune"]["backbones"], {"name": "hybridmim_unet"}], **settings)


@pytest.mark.parametrize("key, arm", [("per_backbone", "hybridmim_unet"), ("per_init", "byol")])
def test_a_per_arm_override_makes_new_runs_for_that_arm_only(key, arm):
    runs = finetune_runs(two_backbones(**{key: {arm: {"steps": 400, "augmentation": "pgl"}}}))
    base = finetune_runs(two_backbones())
    assert runs.keys() != base.keys() and len(runs) == len(base)
    field = "backbone" if key == "per_backbone" else "init"
    for name, run in runs.items():
        touched = (run["spec"]["backbone"]["name"] if field == "backbone" else run["spec"]["init"]) == arm
        assert (name not in base) == touched
        if touched:
            assert run["spec"]["steps"] == 400 and run["spec"]["augmentation"] == "pgl"


def test_per_init_settings_apply_after_per_backbone_settings():
    runs = finetune_runs(two_backbones(per_backbone={"unet": {"steps": 300, "val_every": 25}},
                                       per_init={"hybridmim": {"steps": 500}}))
    specs = {(run["spec"]["init"], run["spec"]["backbone"]["name"]): run["spec"] for run in runs.values()}
    assert specs[("hybridmim", "unet")]["steps"] == 500
    assert specs[("hybridmim", "unet")]["val_every"] == 25
    assert specs[("scratch", "unet")]["steps"] == 300
    assert specs[("scratch", "hybridmim_unet")]["steps"] == DEMO["finetune"]["steps"]


def test_a_dataset_fine_tunes_on_its_own_label_fractions():
    config = copy.deepcopy(DEMO)
    config["datasets"]["phantom"]["label_fractions"] = [1.0]
    runs = finetune_runs(config)
    assert runs and {run["spec"]["label_fraction"] for run in runs.values()} == {1.0}
    assert len(runs) == sum(run["spec"]["label_fraction"] == 1.0 for run in finetune_runs(DEMO).values())


def test_a_dataset_label_fraction_outside_the_grid_is_a_config_problem():
    config = copy.deepcopy(DEMO)
    config["datasets"]["phantom"]["label_fractions"] = [0.5, 1.0]
    assert config_problems(config) == ["datasets.phantom.label_fractions: [0.5] not in splits.label_fractions "
                                       "[0.2, 1.0] (a dataset fine-tunes on some of them)"]

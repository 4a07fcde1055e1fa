"""The fine-tuning grid's protocol axis and per-arm settings: what they add to run identities, and what they leave
alone (the identities of arms they do not touch)."""

import copy

import pytest

from ssl3d.plan import finetune_runs
from ssl3d.validate import config_problems

from conftest import DEMO


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


def test_per_dataset_settings_make_new_runs_on_that_dataset_only_and_apply_first():
    config = with_finetune(per_dataset={"other": {"steps": 400, "val_every": 40}}, per_init={"byol": {"steps": 50}})
    config["datasets"]["other"] = dict(DEMO["datasets"]["phantom"], seed=5)
    config["finetune"]["datasets"] = ["phantom", "other"]
    runs = finetune_runs(config)
    unchanged = finetune_runs(with_finetune(per_init={"byol": {"steps": 50}}))
    assert {name: run for name, run in runs.items() if run["spec"]["dataset"] == "phantom"} == unchanged
    other = {run["spec"]["init"]: run["spec"] for run in runs.values() if run["spec"]["dataset"] == "other"}
    assert other["scratch"]["steps"] == 400 and other["byol"]["steps"] == 50  # per_init overrides per_dataset
    assert other["byol"]["val_every"] == 40
    config["finetune"]["per_dataset"]["btcv"] = {"steps": 10}
    assert config_problems(config) == ["finetune.per_dataset.btcv: not one of finetune.datasets (phantom, other)"]


def test_a_dataset_fine_tunes_on_its_own_label_fractions():
    config = copy.deepcopy(DEMO)
    config["datasets"]["phantom"]["label_fractions"] = [1.0]
    runs = finetune_runs(config)
    assert runs and {run["spec"]["label_fraction"] for run in runs.values()} == {1.0}
    assert len(runs) == sum(run["spec"]["label_fraction"] == 1.0 for run in finetune_runs(DEMO).values())


def test_a_protocol_or_an_init_narrows_the_grid_without_changing_an_identity():
    """As HDSSL's tables read it: the pre-trained inits probed at full labels, scratch only fine-tuned whole, and an
    init fine-tuned at some fractions only; every run kept is the run the full grid has."""
    full = finetune_runs(with_finetune(protocols={"finetune": None, "probe": {"features": "encoder"}}))
    runs = finetune_runs(with_finetune(
        protocols={"finetune": {"inits": ["scratch", "byol"]},
                   "probe": {"features": "encoder", "inits": ["byol", "pgl"], "label_fractions": [1.0]}},
        per_init={"byol": {"label_fractions": [1.0]}}))
    assert all(full[name] == run for name, run in runs.items())
    cells = {(run["spec"]["init"], run["spec"]["protocol"], run["spec"]["label_fraction"]) for run in runs.values()}
    assert cells == {("scratch", "finetune", 0.2), ("scratch", "finetune", 1.0), ("byol", "finetune", 1.0),
                     ("byol", "probe", 1.0), ("pgl", "probe", 1.0)}


@pytest.mark.parametrize("where, edit", [
    ("datasets.phantom", lambda c: c["datasets"]["phantom"].update(label_fractions=[0.5, 1.0])),
    ("finetune.per_init.byol", lambda c: c["finetune"].update(per_init={"byol": {"label_fractions": [0.5]}})),
    ("finetune.protocols.probe", lambda c: c["finetune"].update(protocols={"probe": {"label_fractions": [0.5]}}))])
def test_a_label_fraction_outside_the_grid_is_a_config_problem(where, edit):
    config = copy.deepcopy(DEMO)
    edit(config)
    assert config_problems(config) == [f"{where}.label_fractions: [0.5] not in splits.label_fractions [0.2, 1.0]"]


def test_a_protocol_init_outside_the_grid_is_a_config_problem():
    config = with_finetune(protocols={"probe": {"inits": ["byol", "simclr"]}})
    assert config_problems(config) == [f"finetune.protocols.probe.inits: ['simclr'] not in finetune.inits "
                                       f"({', '.join(DEMO['finetune']['inits'])})"]

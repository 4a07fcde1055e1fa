"""The paper experiment configs (config/experiments/{hybridmim,pgl,hdssl,mini}.yaml): each names real datasets the
way the registry expects, builds its supervised rows, and plans with no data present (manual arms skipped,
automatic ones fetched) and again with a placed manual copy (its arm joins the grid).

The job count of each plan is printed (``pytest -s tests/test_experiment_configs.py`` shows them)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl3d.data.files import manual_copy
from ssl3d.data.paper_splits import load_paper_split
from ssl3d.data.recipes import get_recipe
from ssl3d.data.registry import get_entry
from ssl3d.nets import build_network
from ssl3d.plan import dataset_folds, dataset_recipe, finetune_runs, pretrain_entries

from conftest import REPO

CONFIGS = ["hybridmim", "hybridmim_brats", "pgl", "hdssl", "mini"]
_PLANS: dict[tuple[str, bool], subprocess.CompletedProcess] = {}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / "experiments" / f"{name}.yaml").read_text())


def manual(config: dict) -> dict[str, dict]:
    return {name: settings for name, settings in config["datasets"].items() if settings.get("missing") == "skip"}


def plan(name: str, tmp_path_factory, placed: bool) -> subprocess.CompletedProcess:
    """`snakemake -n` of the config in a fresh working directory, with (placed) or without a dummy copy of every
    manual dataset at its `path`; run once per (config, placed) for the module."""
    if (name, placed) not in _PLANS:
        workdir = tmp_path_factory.mktemp(f"{name}_{'placed' if placed else 'bare'}")
        if placed:
            for dataset, settings in manual(load(name)).items():
                copy = workdir / manual_copy(dataset, settings)
                copy.mkdir(parents=True)
                (copy / "placeholder.txt").write_text("a stand-in for the user's copy\n")
        _PLANS[name, placed] = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--configfile", str(REPO / "config" / "experiments" / f"{name}.yaml"), "-n"],
            capture_output=True, text=True)
    return _PLANS[name, placed]


def job_counts(stdout: str) -> dict[str, int]:
    """Rule -> number of jobs, from the first "Job stats" table of a dry run (with its `total`)."""
    table = stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def fetched(stdout: str) -> set[str]:
    return set(re.findall(r"^rule fetch:\n\s+output: data/sources/([\w-]+)$", stdout, re.M))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_names_its_datasets_as_the_registry_expects(name):
    config = load(name)
    assert config["experiment"] == name
    used = set(config["finetune"]["datasets"]) | set(config.get("pretrain", {}).get("datasets", []))
    assert used == set(config["datasets"]), "a dataset that no arm uses is fetched for nothing"
    for dataset, settings in config["datasets"].items():
        assert settings["source"] == "registry", dataset
        entry = get_entry(settings.get("entry", dataset))
        assert entry.access in ("automatic", "manual"), f"{dataset}: {entry.access} cannot be obtained"
        if entry.access == "manual":  # never downloaded: the user's copy where `ssl3d datasets` says
            assert settings.get("missing") == "skip" and "path" not in settings, dataset
            assert manual_copy(dataset, settings) == Path("data") / "manual" / dataset
        else:
            assert "path" not in settings and "missing" not in settings, dataset
        get_recipe(dataset_recipe(config, dataset))
        if "split" in settings:
            split = load_paper_split(settings["split"])
            folds = settings.get("folds", range(len(split.get("folds", [None]))))  # every fold, unless it says which
            assert len(dataset_folds(config, dataset)) == len(folds), dataset
    # every pre-trained entry is fine-tuned (none pre-trained for nothing)
    assert set(pretrain_entries(config)) <= set(config["finetune"]["inits"])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_scratch_backbone_builds(name):
    """The supervised rows are built only when their fine-tuning starts: a wrong field fails here instead."""
    config = load(name)
    for backbone in config["finetune"]["backbones"]:
        build_network(backbone, in_channels=1, out_channels=2)
        if backbone["name"] == "unetr":  # its position embedding fixes the input size
            assert backbone["img_size"] == config["finetune"]["patch_size"] == config["inference"]["roi_size"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_plans_with_no_data_present(name, tmp_path_factory, monkeypatch):
    config = load(name)
    result = plan(name, tmp_path_factory, placed=False)
    for dataset, settings in manual(config).items():
        assert f"skipping dataset {dataset}: no copy at {manual_copy(dataset, settings)} (missing: skip)" in result.stderr
    if set(config["finetune"]["datasets"]) <= set(manual(config)):  # nothing left to run: one line says why
        assert result.returncode != 0 and f"experiment {name}: no fine-tuning runs to make; dataset" in result.stdout
        return
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"results/{name}/summary.md" in result.stdout
    if "btcv" in config["datasets"]:
        assert "skipping dataset btcv" in result.stderr
    assert fetched(result.stdout) == set(config["datasets"]) - set(manual(config))
    counts = job_counts(result.stdout)
    monkeypatch.setenv("SSL3D_DATA", str(tmp_path_factory.mktemp("no_data")))  # the plan's view: no copies
    runs = finetune_runs(config)
    # every pre-training that a fine-tuning run starts from, and no other (an entry's pool per dataset and fold)
    assert counts["pretrain"] == len({run["pretrain_run"] for run in runs.values() if "pretrain_run" in run})
    assert counts["finetune"] == len(runs) > 0 and "evaluate" not in counts  # evaluated in the fine-tuning job
    assert f"experiment {name}: {counts['pretrain']} pre-training and {len(runs)} fine-tuning runs" in result.stderr
    print(f"\n{name}: {counts['total']} jobs with no data present ({counts})")


@pytest.mark.parametrize("name", [name for name in CONFIGS if manual(load(name))])
def test_a_placed_manual_copy_brings_its_arm_back(name, tmp_path_factory):
    config = load(name)
    bare, placed = plan(name, tmp_path_factory, placed=False), plan(name, tmp_path_factory, placed=True)
    assert placed.returncode == 0, placed.stdout[-3000:] + placed.stderr[-3000:]
    assert "skipping dataset" not in placed.stderr
    assert fetched(placed.stdout) == set(config["datasets"])
    bare_counts, placed_counts = job_counts(bare.stdout) if bare.returncode == 0 else {}, job_counts(placed.stdout)
    assert placed_counts["finetune"] > bare_counts.get("finetune", 0)
    print(f"\n{name}: {placed_counts['total']} jobs with every manual copy placed ({placed_counts})")

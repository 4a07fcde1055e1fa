"""Run identities, manifests and the aggregation of the per-case table."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ssl3d.analysis.aggregate import summarise, summary_markdown
from ssl3d.evaluate.columns import PER_CASE_COLUMNS
from ssl3d.manifest import run_manifest
from ssl3d.plan import canonical_hash, finetune_runs, pretrain_runs

from conftest import REPO


@pytest.fixture
def demo_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_canonical_hash_ignores_key_order_but_not_values():
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": 1}) != canonical_hash({"a": 2})


def test_runs_cover_the_grid_with_unique_identities(demo_config):
    demo_config["splits"]["label_fractions"] = [0.2, 0.5]
    runs = finetune_runs(demo_config)
    n = ((len(demo_config["finetune"]["inits"]) - 1 + len(demo_config["finetune"]["backbones"])) * 2
         * demo_config["splits"]["subsets"]
         * len(demo_config["finetune"]["seeds"]))
    assert len(runs) == n and len({r["run_id"] for r in runs.values()}) == n
    for name, run in runs.items():
        assert name.endswith("_" + run["run_id"]) and run["run_id"] == canonical_hash(run["spec"])


def test_full_label_fraction_is_trained_once_per_seed(demo_config):
    demo_config["splits"].update(label_fractions=[0.5, 1.0], subsets=3)
    demo_config["finetune"].update(seeds=[0, 1], inits=["scratch"], backbones=demo_config["finetune"]["backbones"][:1])
    runs = [run["spec"] for run in finetune_runs(demo_config).values()]
    assert sorted((s["label_fraction"], s["subset"], s["seed"]) for s in runs) == [
        (0.5, 0, 0), (0.5, 0, 1), (0.5, 1, 0), (0.5, 1, 1), (0.5, 2, 0), (0.5, 2, 1), (1.0, 0, 0), (1.0, 0, 1)]


def test_pretrained_inits_chain_the_identity_of_their_pretraining_run(demo_config):
    pretrain = pretrain_runs(demo_config)
    assert {run["spec"]["variant"] for run in pretrain.values()} == set(demo_config["pretrain"]["methods"])
    runs = finetune_runs(demo_config)
    for run in runs.values():
        if run["spec"]["init"] == "scratch":
            assert "pretrained" not in run["spec"]
        else:
            assert pretrain[run["pretrain_run"]]["run_id"] == run["spec"]["pretrained"]
            assert pretrain[run["pretrain_run"]]["spec"]["variant"] == run["spec"]["init"]
            assert pretrain[run["pretrain_run"]]["spec"]["backbone"] == run["spec"]["backbone"]
    demo_config["pretrain"]["steps"] += 1
    changed = finetune_runs(demo_config)
    assert {n for n in runs if "_scratch_" in n} == {n for n in changed if "_scratch_" in n}
    assert not {n for n in runs if "_scratch_" not in n} & set(changed)


def test_an_init_without_a_pretraining_method_is_named(demo_config):
    demo_config["finetune"]["inits"] = ["scratch", "simclr"]
    with pytest.raises(ValueError, match="finetune.inits: 'simclr' is not 'scratch', an entry of pretrain.methods or "
                                         "a released checkpoint"):
        finetune_runs(demo_config)


def test_method_variants_and_per_entry_backbones(demo_config):
    """One method under several settings (an ablation) and a method on its own backbone are entries of
    pretrain.methods; scratch trains every listed backbone and a pre-trained init the one it was pre-trained on."""
    own = {"name": "hybridmim_unet", "features": [8, 8, 16, 32, 64]}
    demo_config["pretrain"]["methods"] = {
        "hybridmim": {"backbone": own},
        "hybridmim_rec_only": {"method": "hybridmim", "backbone": own, "loss_weights": {"reconstruction": 1.0}},
        "byol": None,
    }
    demo_config["finetune"].update(inits=["scratch", "hybridmim", "hybridmim_rec_only", "byol"],
                                   backbones=[demo_config["pretrain"]["backbone"], own])
    pretrain = {run["spec"]["variant"]: run["spec"] for run in pretrain_runs(demo_config).values()}
    assert pretrain["hybridmim_rec_only"]["method"] == "hybridmim"
    assert pretrain["hybridmim_rec_only"]["method_config"] == {"loss_weights": {"reconstruction": 1.0}}
    assert pretrain["byol"]["backbone"] == demo_config["pretrain"]["backbone"]
    rows = {(s["init"], s["backbone"]["name"]) for s in (r["spec"] for r in finetune_runs(demo_config).values())}
    assert rows == {("scratch", "unet"), ("scratch", "hybridmim_unet"), ("hybridmim", "hybridmim_unet"),
                    ("hybridmim_rec_only", "hybridmim_unet"), ("byol", "unet")}
    del demo_config["pretrain"]["backbone"]
    with pytest.raises(ValueError, match="pretrain.methods.byol: no backbone"):
        pretrain_runs(demo_config)


def test_training_settings_change_identity_and_evaluation_settings_do_not(demo_config):
    before = set(finetune_runs(demo_config))
    demo_config["evaluation"]["nsd_tolerance_mm"] = 5.0
    assert set(finetune_runs(demo_config)) == before
    demo_config["finetune"]["steps"] += 1
    assert not set(finetune_runs(demo_config)) & before


def test_manifest_records_provenance(demo_config):
    run = next(iter(finetune_runs(demo_config).values()))
    manifest = run_manifest(run["spec"], run["run_id"], torch.device("cpu"), wall_seconds=1.5)
    assert manifest["config_hash"] == run["run_id"] and manifest["seed"] == run["spec"]["seed"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", manifest["git_commit"])
    assert manifest["packages"]["torch"].startswith("2.13.0") and manifest["packages"]["monai"].startswith("1.6")
    assert manifest["device"].startswith("cpu") and manifest["peak_memory_mb"] > 0
    assert manifest["wall_seconds"] == 1.5


def per_case_table():
    """Two seeds x two cases x two targets for one fraction, with values chosen to make the means easy."""
    rows = []
    values = {(0, "c1", "liver"): 0.8, (0, "c2", "liver"): 0.6, (0, "c1", "aorta"): 0.4, (0, "c2", "aorta"): np.nan,
              (1, "c1", "liver"): 0.9, (1, "c2", "liver"): 0.9, (1, "c1", "aorta"): 0.5, (1, "c2", "aorta"): 0.3}
    for (seed, case, target), value in values.items():
        rows.append({"dataset": "phantom", "case_id": case, "target": target, "metric": "dice", "value": value,
                     "init": "scratch", "backbone": "unet", "protocol": "finetune", "label_fraction": 0.5,
                     "subset": 0, "seed": seed, "run_id": f"r{seed}", "empty_reference": False,
                     "empty_prediction": False, "empty_policy": "both_empty=nan;one_empty_distance=max"})
    return pd.DataFrame(rows, columns=PER_CASE_COLUMNS)


def test_summary_averages_cases_within_a_run_then_runs():
    summary = summarise(per_case_table()).set_index("target")
    # liver: run means 0.7 and 0.9 -> mean 0.8, sd (ddof=1) = sqrt(0.02) = 0.1414
    assert summary.loc["liver", "mean"] == pytest.approx(0.8)
    assert summary.loc["liver", "sd"] == pytest.approx(np.sqrt(0.02))
    # aorta: seed 0 has one finite case (0.4; NaN = both empty does not count), seed 1 has 0.4 -> sd 0
    assert summary.loc["aorta", "mean"] == pytest.approx(0.4) and summary.loc["aorta", "sd"] == pytest.approx(0.0)
    # mean target: per run (0.7 + 0.4) / 2 = 0.55 and (0.9 + 0.4) / 2 = 0.65
    assert summary.loc["mean", "mean"] == pytest.approx(0.6)
    assert (summary["n_seeds"] == 2).all() and list(summary.index) == ["liver", "aorta", "mean"]


def test_summary_markdown_shows_mean_and_sd_per_fraction():
    text = summary_markdown(summarise(per_case_table()), "both_empty=nan;one_empty_distance=max")
    assert "| scratch | liver    | 0.800 ± 0.141 |" in text
    assert "both_empty=nan" in text and "2 seed(s)" in text


def test_pooled_pretraining_per_dataset_recipes_and_skipped_arms(demo_config, tmp_path):
    """Pre-training pools several datasets; each dataset may have its own recipe; a manual dataset whose copy is
    absent is left out (with its reason) where the config says `missing: skip`."""
    from ssl3d.plan import skipped_datasets

    demo_config["datasets"].update(
        btcv={"source": "registry", "path": str(tmp_path / "absent"), "missing": "skip"},
        luna16={"source": "registry", "recipe": "btcv_swinunetr"})
    demo_config["pretrain"]["datasets"] = ["phantom", "luna16", "btcv"]
    demo_config["finetune"]["datasets"] = ["phantom", "btcv"]
    assert set(skipped_datasets(demo_config)) == {"btcv"}
    pools = [run["spec"]["pool"] for run in pretrain_runs(demo_config).values()]
    assert all([(m["dataset"], m["recipe"]) for m in pool] == [("phantom", "demo_ct"), ("luna16", "btcv_swinunetr")]
               for pool in pools)
    assert {run["spec"]["dataset"] for run in finetune_runs(demo_config).values()} == {"phantom"}
    (tmp_path / "absent").mkdir()
    assert not skipped_datasets(demo_config)
    assert {run["spec"]["dataset"] for run in finetune_runs(demo_config).values()} == {"phantom", "btcv"}


def test_a_k_fold_split_makes_each_fold_a_run_and_leaves_single_split_runs_as_they_were(demo_config):
    from ssl3d.plan import dataset_folds

    single = finetune_runs(demo_config)
    demo_config["datasets"]["phantom"]["split"] = "hdssl_btcv_3fold"
    folded = finetune_runs(demo_config)
    assert dataset_folds(demo_config, "phantom") == [0, 1, 2] and len(folded) == 3 * len(single)
    assert {run["spec"]["fold"] for run in folded.values()} == {0, 1, 2}
    assert all(name.startswith(f"phantom_fold{run['spec']['fold']}_") for name, run in folded.items())
    demo_config["datasets"]["phantom"]["folds"] = [2]
    assert {run["spec"]["fold"] for run in finetune_runs(demo_config).values()} == {2}
    demo_config["datasets"]["phantom"]["folds"] = [3]
    with pytest.raises(ValueError, match=r"datasets.phantom.folds: \[3\] not folds of hdssl_btcv_3fold \(0..2\)"):
        finetune_runs(demo_config)
    demo_config["datasets"]["phantom"]["split"] = "btcv_dataset_0"
    with pytest.raises(ValueError, match="a single split, not k-fold; remove folds"):
        finetune_runs(demo_config)
    del demo_config["datasets"]["phantom"]["split"], demo_config["datasets"]["phantom"]["folds"]
    assert finetune_runs(demo_config) == single and all("fold" not in run["spec"] for run in single.values())


def test_per_case_tables_written_before_folds_read_as_fold_0(tmp_path):
    from ssl3d.analysis.aggregate import read_per_case

    old = pd.DataFrame([dict.fromkeys(PER_CASE_COLUMNS, 0)]).drop(columns="fold")
    old.to_csv(tmp_path / "per_case.csv", index=False)
    assert read_per_case(tmp_path / "per_case.csv")["fold"].tolist() == [0]


def test_names_that_look_like_numbers_are_collected_as_written(tmp_path):
    """One run's table holds one run hash: "30966813e3" (a hash the workflow made) was read as 3.0966813e10, and the
    report then found no manifest for run 30966813000.0; case ids keep their leading zeros."""
    from ssl3d.analysis.aggregate import collect

    row = {**dict.fromkeys(PER_CASE_COLUMNS, 0), "run_id": "30966813e3", "case_id": "0012", "value": 0.5}
    pd.DataFrame([row]).to_csv(tmp_path / "run.csv", index=False)
    collect([tmp_path / "run.csv"], tmp_path / "per_case.csv")
    table = pd.read_csv(tmp_path / "per_case.csv", dtype=str)
    assert table.loc[0, "run_id"] == "30966813e3" and table.loc[0, "case_id"] == "0012"

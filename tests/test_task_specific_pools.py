"""Task-specific pre-training (``pool: downstream``, HybridMIM's starred rows): one pre-training run per downstream
dataset and fold on the images of its split's training cases, fine-tuned on that dataset and fold only."""

import copy

import numpy as np

from ssl3d.data.cache import write_case
from ssl3d.data.splits import make_splits
from ssl3d.io import write_json
from ssl3d.plan import finetune_runs, pretrain_runs, run_files
from ssl3d.pretrain.loop import pool_cases, pretraining_pool
from ssl3d.validate import config_problems

from conftest import DEMO


def with_downstream_byol(**datasets) -> dict:
    """The demo with a second pre-training entry of BYOL on each downstream dataset, and ``datasets`` added to the
    fine-tuning grid."""
    config = copy.deepcopy(DEMO)
    config["pretrain"]["methods"]["byol_task"] = {**config["pretrain"]["methods"]["byol"], "method": "byol",
                                                  "pool": "downstream"}
    config["datasets"].update(datasets)
    config["finetune"]["datasets"] += list(datasets)
    config["finetune"]["inits"].append("byol_task")
    return config


def test_each_downstream_dataset_and_fold_gets_its_own_run_and_the_shared_runs_keep_their_identities():
    brats = {"source": "registry", "split": "brats2020_5fold", "folds": [0, 3]}
    config = with_downstream_byol(other=dict(DEMO["datasets"]["phantom"], seed=5), brats2020=brats)
    runs = pretrain_runs(config)
    shared = pretrain_runs(DEMO)
    assert {name: run for name, run in runs.items() if name in shared} == shared  # unchanged identities
    task = {name: run["spec"] for name, run in runs.items() if run["spec"]["variant"] == "byol_task"}
    assert sorted(name.rsplit("_", 1)[0] for name in task) == [
        "byol_task_unet_brats2020_fold0_seed0", "byol_task_unet_brats2020_fold3_seed0",
        "byol_task_unet_other_seed0", "byol_task_unet_phantom_seed0"]
    for name, spec in task.items():
        (member,) = spec["pool"]
        assert spec["pool_split"]["splits"] == DEMO["splits"]
        assert ("fold" in spec["pool_split"]) == (member["dataset"] == "brats2020")
        files = run_files(runs[name], "pretrain", "results/demo", "data")
        assert files["splits"] == f"results/demo/splits/{member['dataset']}.json"
        assert files["caches"] == [f"data/preprocessed/{member['recipe']}/{member['dataset']}"]

    finetuned = finetune_runs(config)
    used = {run["spec"]["dataset"] + str(run["spec"].get("fold")): run["pretrain_run"]
            for run in finetuned.values() if run["spec"]["init"] == "byol_task"}
    assert used == {"phantomNone": next(name for name in task if "_phantom_" in name),
                    "otherNone": next(name for name in task if "_other_" in name),
                    "brats20200": next(name for name in task if "_fold0_" in name),
                    "brats20203": next(name for name in task if "_fold3_" in name)}
    assert {name: run for name, run in finetuned.items() if run["spec"]["init"] != "byol_task"
            and run["spec"]["dataset"] == "phantom"} == finetune_runs(DEMO)  # the other arms are untouched


def test_a_downstream_pool_holds_the_images_of_the_splits_training_and_validation_cases_only(tmp_path):
    ids = [f"case_{i}" for i in range(8)]
    cases = {}
    for case_id in ids:
        write_case(tmp_path / f"{case_id}.npz", {"image": np.zeros((4, 4, 4), np.float32),
                                                  "label": np.zeros((4, 4, 4), np.uint8)}, "key", {})
        cases[case_id] = {"file": f"{case_id}.npz", "labelled": True}
    write_json(tmp_path / "index.json", {"cases": cases, "channels": 1})
    split = make_splits(ids, seed=0, n_validation=2, n_test=3, label_fractions=[1.0], n_subsets=1)
    write_json(tmp_path / "splits.json", {"folds": [split, {**split, "test": split["train"][:3]}]})
    spec = {"pool": [{"dataset": "mine", "data": {}}], "pool_split": {"splits": {}, "fold": 0}}

    which = pool_cases(spec, {"splits": str(tmp_path / "splits.json")})
    files, channels = pretraining_pool([str(tmp_path)], which)
    assert sorted(path.stem for path in files) == sorted(split["train"] + split["validation"])
    assert not set(split["test"]) & {path.stem for path in files} and channels == 1
    # the same dataset in a shared pool: its unlabelled cases, of which it has none
    assert pool_cases({"pool": spec["pool"]}, {}) == ["unlabelled"]


def test_a_downstream_entry_is_checked_against_each_downstream_datasets_channels():
    config = with_downstream_byol()
    assert config_problems(config) == []
    config["datasets"]["brats2020"] = {"source": "registry", "split": "brats2020_5fold", "missing": "skip",
                                       "inits": ["scratch", "models_genesis", "byol_task"]}  # four-channel inits
    config["finetune"]["datasets"].append("brats2020")
    config["pretrain"]["methods"]["models_genesis"]["pool"] = "downstream"
    problems = config_problems(config)
    assert len(problems) == 1 and problems[0].startswith("pretrain.methods.models_genesis")
    assert "4" in problems[0] and "channel" in problems[0]
    config["pretrain"]["methods"]["models_genesis"]["pool"] = ["phantom"]  # BraTS left out: it builds
    assert config_problems(config) == []
    config["pretrain"]["methods"]["models_genesis"]["pool"] = ["phantom", "btcv"]
    assert config_problems(config) == ["pretrain.methods.models_genesis.pool: ['btcv'] not in finetune.datasets "
                                       "(phantom, brats2020)"]


def test_a_listed_pool_pre_trains_on_those_datasets_only_and_a_datasets_inits_leave_an_entry_out():
    other = dict(DEMO["datasets"]["phantom"], seed=5)
    config = with_downstream_byol(other=other)
    config["pretrain"]["methods"]["byol_task"]["pool"] = ["other"]
    runs = pretrain_runs(config)
    (task,) = [run["spec"] for run in runs.values() if run["spec"]["variant"] == "byol_task"]
    assert task["pool"][0]["dataset"] == "other"
    finetuned = [run["spec"]["dataset"] for run in finetune_runs(config).values() if run["spec"]["init"] == "byol_task"]
    assert set(finetuned) == {"other"}  # no pre-trained run for phantom: not fine-tuned there
    config["datasets"]["other"]["inits"] = ["scratch", "byol"]
    assert not [run for run in pretrain_runs(config).values() if run["spec"]["variant"] == "byol_task"]
    assert {(run["spec"]["dataset"], run["spec"]["init"]) for run in finetune_runs(config).values()
            if run["spec"]["dataset"] == "other"} == {("other", "scratch"), ("other", "byol")}
    assert pretrain_runs(config).keys() < runs.keys()  # the dataset's inits do not change the identities


def test_without_a_shared_pool_pretrain_datasets_is_needed_only_by_shared_entries():
    config = copy.deepcopy(DEMO)
    del config["pretrain"]["datasets"]
    config["pretrain"]["methods"] = {"byol": {**DEMO["pretrain"]["methods"]["byol"], "pool": "downstream"},
                                     "models_genesis": dict(DEMO["pretrain"]["methods"]["models_genesis"])}
    config["finetune"]["inits"] = ["scratch", "byol", "models_genesis"]
    assert config_problems(config) == ["pretrain.datasets: missing, and the entry models_genesis pre-trains on its "
                                       "pool (pool: shared, the default); list the pool's datasets, or give the "
                                       "entry pool: downstream"]
    config["pretrain"]["methods"]["models_genesis"]["pool"] = "downstream"
    assert config_problems(config) == []
    assert sorted(run["spec"]["variant"] for run in pretrain_runs(config).values()) == ["byol", "models_genesis"]


def test_an_entry_with_its_own_datasets_pre_trains_on_their_pool_and_the_others_keep_their_identities():
    """HDSSL's MRI model beside its CT one: an entry's own shared pool."""
    config = copy.deepcopy(DEMO)
    config["datasets"]["mri"] = dict(DEMO["datasets"]["phantom"], seed=7)
    config["pretrain"]["methods"]["byol_mri"] = {**DEMO["pretrain"]["methods"]["byol"], "method": "byol",
                                                 "datasets": ["mri"]}
    runs = pretrain_runs(config)
    shared = pretrain_runs(DEMO)
    assert {name: run for name, run in runs.items() if name in shared} == shared
    (mri,) = [run["spec"] for run in runs.values() if run["spec"]["variant"] == "byol_mri"]
    assert [member["dataset"] for member in mri["pool"]] == ["mri"] and "pool_split" not in mri
    config["finetune"]["inits"].append("byol_mri")
    assert config_problems(config) == []
    config["pretrain"]["methods"]["byol_mri"]["datasets"] = ["mri", "brats2020"]
    config["datasets"]["brats2020"] = {"source": "registry", "missing": "skip"}
    assert config_problems(config) == ["pretrain.methods.byol_mri.datasets: one pool cannot mix channel counts ([1, 4])"]
    config["pretrain"]["methods"]["byol_mri"]["datasets"] = ["mr"]
    assert config_problems(config)[0].startswith("pretrain.methods.byol_mri.datasets: unknown dataset 'mr'")


def test_an_init_pre_trained_on_other_channels_than_a_datasets_is_a_problem_until_the_dataset_leaves_it_out():
    config = with_downstream_byol(brats2020={"source": "registry", "split": "brats2020_5fold", "missing": "skip"})
    problems = config_problems(config)
    assert len(problems) == 7 and problems[0] == (
        "finetune.inits: models_genesis pre-trains on 1-channel volumes and cannot initialise the 4-channel networks "
        "of brats2020; leave it out there with datasets.brats2020.inits")
    config["datasets"]["brats2020"]["inits"] = ["scratch", "byol_task"]  # BYOL on BraTS's own four channels
    assert config_problems(config) == []
    config["finetune"]["inits"].append("vox2vec_official")  # released CT weights
    assert config_problems(config) == []  # not in BraTS's inits
    config["datasets"]["brats2020"]["inits"].append("vox2vec_official")
    assert config_problems(config) == ["finetune.inits: vox2vec_official pre-trains on 1-channel volumes and cannot "
                                       "initialise the 4-channel networks of brats2020; leave it out there with "
                                       "datasets.brats2020.inits"]

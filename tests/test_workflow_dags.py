"""Other DAGs through the workflow: a bring-your-own folder edited after a run, PGL's segmentation network, and
vox2vec and hierarchical dense SSL probed and fine-tuned on an FPN."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from ssl3d.nets import BACKBONES

from conftest import MICRO, rewrite, snakemake


@pytest.mark.slow
def test_a_folder_dataset_edited_or_grown_after_a_run_is_prepared_again(tmp_path):
    """Your own folder: a label edited in place re-runs prepare and preprocess and rebuilds that case only, and so does
    one replaced by an older file; an added image re-runs prepare. (Before, both were "Nothing to be done" and the cache kept the old case.)"""
    from ssl3d.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "mine", n_labelled=4, n_unlabelled=1, seed=2, shape=[64, 64, 32],
                          spacing=[2.4, 2.4, 4.5])
    config = json.loads(json.dumps(MICRO))
    config["datasets"] = {"phantom": {"source": "folder", "images": str(tmp_path / "mine" / "imagesTr"),
                                      "labels": str(tmp_path / "mine" / "labelsTr")}}
    target = "data/preprocessed/demo_ct/phantom"
    assert snakemake(tmp_path, config, target).returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, config, "-n", target).stdout
    cache = tmp_path / "data" / "preprocessed" / "demo_ct" / "phantom"
    before = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}

    rewrite(tmp_path / "mine" / "labelsTr" / "phantom_001.nii.gz", lambda label: np.where(label == 1, 0, label))
    rerun = snakemake(tmp_path, config, target)
    jobs = rerun.stdout + rerun.stderr  # its job table
    assert rerun.returncode == 0
    assert re.search(r"^prepare\s+1$", jobs, re.M) and re.search(r"^preprocess\s+1$", jobs, re.M)
    after = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}
    assert [name for name in before if after[name] != before[name]] == ["phantom_001.npz"]

    replaced = tmp_path / "mine" / "labelsTr" / "phantom_002.nii.gz"  # by an older file (mv, cp -p, rsync -a)
    rewrite(replaced, lambda label: np.where(label == 2, 0, label))
    os.utime(replaced, ns=(before["phantom_002.npz"] - 10 ** 12,) * 2)
    planned = snakemake(tmp_path, config, "-n", target).stdout
    assert re.search(r"^prepare\s+1$", planned, re.M) and re.search(r"^preprocess\s+1$", planned, re.M)

    (tmp_path / "mine" / "imagesTr" / "extra.nii.gz").write_bytes(
        (tmp_path / "mine" / "imagesTs" / "phantom_004.nii.gz").read_bytes())
    assert re.search(r"^prepare\s+1$", snakemake(tmp_path, config, "-n", target).stdout, re.M)


@pytest.mark.slow
def test_a_micro_dag_pretrains_pgl_and_fine_tunes_its_segmentation_network(tmp_path):
    """PGL pre-trains the segmentation network's ResNet encoder and hands over all of it and nothing else."""
    segnet = {"name": "pgl_segnet", **BACKBONES["pgl_segnet"].smallest["fields"]}
    config = json.loads(json.dumps(MICRO))
    config["pretrain"].update(backbone=segnet, methods={"pgl": {
        "patch_size": [32, 32, 32], "batch_size": 2, "projector_hidden": 16, "predictor_hidden": 16,
        "projection_dim": 8}})
    config["splits"]["label_fractions"] = [1.0]
    config["finetune"].update(inits=["scratch", "pgl"], seeds=[0], backbones=[segnet], patch_size=[32, 32, 32])
    config["inference"]["roi_size"] = [32, 32, 32]
    result = snakemake(tmp_path, config, "results/micro/per_case.csv")  # the report is the micro DAG's to test
    assert result.returncode == 0, result.stderr[-5000:]
    (finetuned,) = (tmp_path / "results" / "micro" / "finetune").glob("phantom_pgl_pgl_segnet_*")
    transfer = json.loads((finetuned / "manifest.json").read_text())["transfer"]
    assert transfer["fractions"] == {"encoder": 1.0, "decoder": 0.0, "head": 0.0}
    table = pd.read_csv(tmp_path / "results" / "micro" / "per_case.csv")
    assert set(table["init"]) == {"scratch", "pgl"} and table["value"].notna().any()


@pytest.mark.slow
def test_a_micro_dag_pretrains_on_the_downstream_datasets_training_cases(tmp_path):
    """Task-specific pre-training (``pool: downstream``): the run reads the split's training and validation cases,
    labelled ones, not the unlabelled pool, and its dataset's fine-tuning starts from it."""
    config = json.loads(json.dumps(MICRO))
    config["pretrain"]["methods"] = {"models_genesis": {**MICRO["pretrain"]["methods"]["models_genesis"],
                                                        "pool": "downstream"}}
    config["splits"]["label_fractions"] = [1.0]
    config["finetune"].update(inits=["scratch", "models_genesis"], seeds=[0])
    result = snakemake(tmp_path, config, "results/micro/per_case.csv")
    assert result.returncode == 0, result.stderr[-5000:]
    (pretrained,) = (tmp_path / "results" / "micro" / "pretrain").glob("models_genesis_unet_phantom_seed0_*")
    splits = json.loads((tmp_path / "results" / "micro" / "splits" / "phantom.json").read_text())
    assert json.loads((pretrained / "manifest.json").read_text())["pool_cases"] == 3 == (
        len(splits["train"]) + len(splits["validation"]))  # of 5 labelled cases (2 unlabelled: the shared pool)
    (finetuned,) = (tmp_path / "results" / "micro" / "finetune").glob("phantom_models_genesis_unet_*")
    assert json.loads((finetuned / "config.json").read_text())["pretrain_run"] == pretrained.name


@pytest.mark.slow
def test_a_micro_dag_runs_all_three_protocols_on_vox2vec_and_hdssl(tmp_path):
    """vox2vec and hierarchical dense SSL pre-train an FPN, which is fine-tuned whole, probed, and fine-tuned with the
    backbone frozen first (the HDSSL paper's protocols), end to end: each protocol its own runs, per-case rows and
    leaderboard.
    (The released vox2vec weights take the same path: tests/test_released.py plans and loads them.)"""
    from ssl3d.pretrain.registry import get_method

    fpn = {"name": "fpn3d", **BACKBONES["fpn3d"].smallest["fields"]}
    voxels = {"patch_size": [32, 32, 16], "batch_size": 1, "pairs_per_region": 2, "max_voxels": 64,
              "projection_dim": 16}
    config = json.loads(json.dumps(MICRO))
    config["pretrain"].update(backbone=fpn, methods={
        "vox2vec": {**voxels, "cache_window_hu": [-175.0, 250.0]},  # the demo recipe's window
        "hdssl": voxels})
    config["splits"]["label_fractions"] = [1.0]
    config["finetune"].update(
        inits=["vox2vec", "hdssl"], seeds=[0], backbones=[fpn], patch_size=[32, 32, 32], loss="sigmoid_bce_dice",
        protocols={"finetune": {}, "probe": {"optimizer": {"lr": 0.01}},
                   "frozen_then_finetune": {"frozen_steps": 2, "ramp_steps": 2}})
    config["inference"]["roi_size"] = [32, 32, 32]
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr[-5000:]
    table = pd.read_csv(tmp_path / "results" / "micro" / "per_case.csv")
    assert table.groupby("protocol")["init"].unique().map(sorted).to_dict() == {
        protocol: ["hdssl", "vox2vec"] for protocol in ("finetune", "frozen_then_finetune", "probe")}
    (probe,) = (tmp_path / "results" / "micro" / "finetune").glob("phantom_vox2vec_probe_fpn3d_*")
    manifest = json.loads((probe / "manifest.json").read_text())
    assert manifest["transfer"]["method"] == "vox2vec" and manifest["transfer"]["fractions"]["encoder"] == 1.0
    assert manifest["probe_features"] == get_method("vox2vec").probe_features
    board = pd.read_csv(tmp_path / "reports" / "micro" / "tables" / "leaderboard.csv")
    assert sorted(board.groupby("protocol").size().items()) == [("finetune", 2), ("frozen_then_finetune", 2),
                                                                ("probe", 2)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync, a system program (no pip package), is missing: "
                    "the fs storage plugin copies every file with it; apt install rsync")
def test_a_dag_runs_with_no_shared_file_system_so_every_file_a_job_reads_is_declared(tmp_path):
    """As on a cluster whose jobs share no file system (profiles/kubernetes): every input and output goes through a
    storage provider, here a folder (snakemake-storage-plugin-fs), and a job sees only the files it declares, in
    local copies at other paths. Your own folder, pre-training, fine-tuning from it and the report all run."""
    from ssl3d.data.phantom import write_phantom_dataset

    store = tmp_path / "store"
    write_phantom_dataset(store / "mine", n_labelled=5, n_unlabelled=2, seed=2, shape=[64, 64, 32],
                          spacing=[2.4, 2.4, 4.5])  # a folder dataset goes into the storage, at its path
    config = json.loads(json.dumps(MICRO))
    config["datasets"] = {"phantom": {"source": "folder", "images": "mine/imagesTr", "labels": "mine/labelsTr",
                                      "pretrain_cases": "all"}}
    config["pretrain"]["methods"] = {"models_genesis": MICRO["pretrain"]["methods"]["models_genesis"]}
    config["finetune"].update(inits=["scratch", "models_genesis"], seeds=[0])
    config["evaluation"]["nsd_tolerance_mm"] = 2.0  # the folder's classes are label_1 ... label_6
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(store / "mine", work / "mine")  # where the plan lists the folder's files
    result = snakemake(work, config, "--default-storage-provider", "fs", "--default-storage-prefix", str(store))
    assert result.returncode == 0, result.stderr[-5000:]
    assert "(retrieve from storage)" in result.stdout + result.stderr
    assert not (work / "data").exists() and not (work / "results").exists()  # everything went through the storage
    table = pd.read_csv(store / "results" / "micro" / "per_case.csv")
    assert set(table["init"]) == {"scratch", "models_genesis"} and table["value"].notna().any()
    assert (store / "reports" / "micro" / "index.html").is_file()
    assert list((store / "reports" / "micro" / "figures").glob("qualitative*"))  # it read a test case's volume

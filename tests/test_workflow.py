"""The Snakemake workflow end to end on a micro config in a temporary directory, and its config validation."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from ssl3d.evaluate.columns import PER_CASE_COLUMNS
from ssl3d.nets import BACKBONES

from conftest import REPO, rewrite
from test_experiment_configs import CONFIGS as PLANNED_THERE  # planned (and more) there

MICRO = yaml.safe_load((REPO / "config" / "experiments" / "micro.yaml").read_text())


def snakemake(workdir, config, *args, sort_keys=True):
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=sort_keys))
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(path), "--cores", "2", *args],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("micro")
    result = snakemake(workdir, MICRO)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_per_case_table(micro_run):
    table = pd.read_csv(micro_run / "results" / "micro" / "per_case.csv")
    assert list(table.columns) == PER_CASE_COLUMNS
    # 3 inits x 2 fractions x 2 seeds = 12 runs, each: 2 test cases x 6 organs x 4 metrics
    assert len(table) == 12 * 2 * 6 * 4
    assert table["run_id"].nunique() == 12
    assert set(table["label_fraction"]) == {0.5, 1.0} and set(table["seed"]) == {0, 1}
    assert set(table["init"]) == {"scratch", "models_genesis", "byol"} and set(table["protocol"]) == {"finetune"}
    assert set(table["target"]) == {"spleen", "kidney_right", "kidney_left", "liver", "stomach", "aorta"}
    dice = table[table["metric"] == "dice"]["value"]
    assert dice.between(0, 1).all()
    # a miss is scored, not dropped: with both_empty=nan no reference is empty, so no value is NaN
    assert not table["empty_reference"].any() and table["value"].notna().all()
    assert set(table["empty_policy"]) == {"both_empty=nan;one_empty_distance=max"}


@pytest.mark.slow
def test_summary_and_manifests(micro_run):
    summary = pd.read_csv(micro_run / "results" / "micro" / "summary.csv")
    cells = summary[(summary["target"] == "mean") & (summary["metric"] == "dice") & (summary["label_fraction"] == 1.0)]
    assert sorted(cells["init"]) == ["byol", "models_genesis", "scratch"]
    assert (cells["n_seeds"] == 2).all() and np.isfinite(cells["sd"]).all()
    markdown = (micro_run / "results" / "micro" / "summary.md").read_text()
    assert "### Dice" in markdown and " ± " in markdown and "both_empty=nan" in markdown
    manifests = sorted((micro_run / "results" / "micro" / "finetune").glob("phantom_scratch_*/manifest.json"))
    assert len(manifests) == 4
    manifest = json.loads(manifests[0].read_text())
    for key in ("run_id", "config_hash", "config", "git_commit", "packages", "device", "seed", "wall_seconds",
                "steps_per_second", "peak_memory_mb"):
        assert key in manifest, key
    assert manifest["run_id"] in manifests[0].parent.name
    assert manifest["packages"]["torch"].startswith("2.13.0")


@pytest.mark.slow
def test_pretraining_feeds_fine_tuning_through_the_verified_transfer(micro_run):
    pretrain = micro_run / "results" / "micro" / "pretrain"
    for method, decoder in (("models_genesis", 1.0), ("byol", 0.0)):
        (run,) = pretrain.glob(f"{method}_unet_seed0_*")
        log = pd.read_csv(run / "step_log.csv")
        assert list(log["step"]) == [1, 2, 3, 4] and {"data_s", "forward_s", "backward_s"} <= set(log.columns)
        assert json.loads((run / "manifest.json").read_text())["transfer"]["fractions"]["decoder"] == decoder
        finetuned_runs = sorted((micro_run / "results" / "micro" / "finetune").glob(f"phantom_{method}_unet_*"))
        assert len(finetuned_runs) == 4  # 2 fractions x 2 seeds
        for finetuned in finetuned_runs:
            config = json.loads((finetuned / "config.json").read_text())
            assert config["inputs"]["pretrained"].endswith(f"{run.name}/pretrained.pt")
            transfer = json.loads((finetuned / "manifest.json").read_text())["transfer"]
            assert transfer["fractions"]["encoder"] == 1.0 and transfer["fractions"]["decoder"] == decoder


@pytest.mark.slow
def test_a_cosmetic_config_edit_plans_nothing(micro_run):
    """Reordered keys, and a dataset's label_fractions equal to the global ones, change no run and no data stage."""
    edited = json.loads(json.dumps(MICRO))
    for section in (edited, edited["datasets"]["phantom"], edited["splits"], edited["finetune"],
                    edited["evaluation"]["nsd_tolerance_mm"]):
        items = list(section.items())
        section.clear()
        section.update(reversed(items))
    edited["datasets"]["phantom"]["label_fractions"] = MICRO["splits"]["label_fractions"]
    assert "Nothing to be done" in snakemake(micro_run, edited, "-n", sort_keys=False).stdout


@pytest.mark.slow
def test_a_folder_dataset_edited_or_grown_after_a_run_is_prepared_again(tmp_path):
    """Your own folder: a label edited in place re-runs prepare and preprocess and rebuilds that case only; an added
    image re-runs prepare. (Before, both were "Nothing to be done" and the cache kept the old case.)"""
    from ssl3d.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "mine", n_labelled=4, n_unlabelled=1, seed=2, shape=[64, 64, 32],
                          spacing=[2.4, 2.4, 4.5])
    config = json.loads(json.dumps(MICRO))
    config["datasets"] = {"phantom": {"source": "folder", "images": str(tmp_path / "mine" / "imagesTr"),
                                      "labels": str(tmp_path / "mine" / "labelsTr")}}
    target = "data/preprocessed/demo_ct/phantom/index.json"
    assert snakemake(tmp_path, config, target).returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, config, "-n", target).stdout
    cache = tmp_path / "data" / "preprocessed" / "demo_ct" / "phantom"
    before = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}

    rewrite(tmp_path / "mine" / "labelsTr" / "phantom_001.nii.gz", lambda label: np.where(label == 1, 0, label))
    planned = snakemake(tmp_path, config, "-n", target).stdout
    assert re.search(r"^prepare\s+1$", planned, re.M) and re.search(r"^preprocess\s+1$", planned, re.M)
    assert snakemake(tmp_path, config, target).returncode == 0
    after = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}
    assert [name for name in before if after[name] != before[name]] == ["phantom_001.npz"]

    (tmp_path / "mine" / "imagesTr" / "extra.nii.gz").write_bytes(
        (tmp_path / "mine" / "imagesTs" / "phantom_004.nii.gz").read_bytes())
    assert re.search(r"^prepare\s+1$", snakemake(tmp_path, config, "-n", target).stdout, re.M)


@pytest.mark.slow
def test_rerun_has_nothing_to_do_and_an_override_makes_new_runs(micro_run):
    assert "Nothing to be done" in snakemake(micro_run, MICRO, "-n").stdout
    changed = {**MICRO, "finetune": {**MICRO["finetune"], "steps": 7}}
    dry = snakemake(micro_run, changed, "-n", "--rerun-triggers", "mtime")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "finetune" in dry.stdout and "rule prepare:" not in dry.stdout and "pretrain " not in dry.stdout


@pytest.mark.slow
def test_the_report_links_every_figure_and_table_and_regenerates_without_training(micro_run):
    report = micro_run / "reports" / "micro"
    page = (report / "index.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"#][^"]*)"', page))
    assert [link for link in links if not (report / link).is_file()] == []
    shown = {link.removeprefix("figures/").removesuffix(".png") for link in links if link.endswith(".png")}
    assert shown == {"label_efficiency_phantom", "training_curves_phantom_0p5", "training_curves_phantom_1",
                     "pretrain_step_times", "qualitative_phantom", "critical_difference",
                     "compute_phantom"}  # 2 test cases: no p-values
    assert page.count("<figcaption>") == len(shown)
    runs = pd.read_csv(report / "tables" / "runs.csv")
    assert sorted(runs.value_counts("stage").items()) == [("finetune", 12), ("pretrain", 2)]
    assert all((report / "manifests" / stage / f"{run}.json").is_file() for stage, run in zip(runs.stage, runs.run))
    assert len(pd.read_csv(report / "tables" / "leaderboard.csv")) == 3 * 2  # inits x label fractions
    cells = pd.read_csv(report / "tables" / "paper_tables.csv")
    assert set(cells.status) <= {"not run", "method not implemented", "metric not measured",  # no paper dataset here
                                 "components not recoverable"}

    (report / "index.html").unlink()
    result = snakemake(micro_run, MICRO, "--forcerun", "report", "--", "reports/micro")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.search(r"Job stats:\n(.*?)\ntotal", result.stdout + result.stderr, re.S).group(1)
    assert re.findall(r"^(\w+)\s+\d+$", jobs, re.M) == ["report"]
    assert (report / "index.html").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["finetune"].update(stepz=3), r"^  finetune: .*'stepz' was unexpected"),
    (lambda c: c["splits"].update(label_fractions=[0.5, 1.5]), r"^  splits\.label_fractions\[1\]: 1\.5 is greater"),
    (lambda c: c["evaluation"]["empty"].update(both_empty="zero"), r"^  evaluation\.empty\.both_empty: 'zero' is not"),
    (lambda c: c["pretrain"]["methods"]["byol"].update(noise_sd=1),
     r"^  pretrain\.methods\.byol\.noise_sd: unknown setting of byol; known: batch_size, "),
    (lambda c: c["pretrain"]["methods"].update(swinunetr_ssl={}), r"^  pretrain\.methods\.swinunetr_ssl: swinunetr_ssl "
     r"needs a backbone with hidden_states; 'unet' has not \(it runs on swinunetr\)$"),
    (lambda c: c["finetune"]["backbones"][0].update(chanels=[4, 8]), r"^  finetune\.backbones\[0\]\.chanels: unet "
                                                                     r"takes no field 'chanels'; known: channels"),
    (lambda c: c["finetune"].update(protocols={"frozen_then_finetune": {"frozen_steps": 6, "ramp_steps": 2}}),
     r"^  finetune\.protocols\.frozen_then_finetune\.frozen_steps: 6 leaves none of the 6 steps"),
    (lambda c: c["finetune"].update(per_init={"simclr": {"steps": 2}}), r"^  finetune\.per_init\.simclr: not one of"),
])
def test_bad_config_fails_before_any_job_with_one_line_per_problem(tmp_path, edit, message):
    config = json.loads(json.dumps(MICRO))
    edit(config)
    result = snakemake(tmp_path, config, "-n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the config has 1 problem(s) (also in logs/config_problems.log)" in output
    assert re.search(message, output, re.M), output[-2000:]
    assert len(output.splitlines()) < 12 and "$schema" not in output  # no dump of schema and config
    assert "config:" in (tmp_path / "logs" / "config_problems.log").read_text()
    assert not (tmp_path / "data").exists()


def test_workflow_is_lint_clean():
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--lint"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_no_rule_runs_python_code_in_snakemake():
    """Snakemake starts a whole Snakemake process for each job of a `run:` rule (seconds; with ~40 run_config jobs
    they once took three of the demo's eleven minutes): every rule is a shell command."""
    rules = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    assert [(path.name, line) for path in rules for line in path.read_text().splitlines()
            if re.fullmatch(r"\s+run:\s*", line)] == []


def test_an_experiment_config_replaces_the_demo_config_instead_of_merging_into_it(tmp_path):
    """Snakemake merges --configfile into the workflow's configfile: the demo's dict entries (here an NSD
    tolerance for a target the experiment does not have) must not leak into an experiment."""
    config = json.loads(json.dumps(MICRO))
    del config["evaluation"]["nsd_tolerance_mm"]["aorta"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    result = snakemake(tmp_path, config, "-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--nsd-tolerance" in result.stdout and "aorta" not in result.stdout


@pytest.mark.parametrize("experiment", [path for path in sorted((REPO / "config" / "experiments").glob("*.yaml"))
                                        if path.stem not in PLANNED_THERE], ids=lambda p: p.stem)
def test_every_experiment_config_validates_and_plans(experiment, tmp_path):
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(experiment), "-n"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"results/{yaml.safe_load(experiment.read_text())['experiment']}/summary.md" in result.stdout


@pytest.mark.parametrize("config_path", [REPO / "config" / "config.yaml",
                                         *sorted((REPO / "config" / "experiments").glob("*.yaml"))],
                         ids=lambda p: p.stem)
def test_every_pretraining_entry_of_every_config_builds_its_method(config_path):
    """An unknown setting or an unsupported backbone fails here, not hours into a run."""
    from ssl3d.plan import pretrain_runs
    from ssl3d.pretrain.loop import build_method

    for name, run in pretrain_runs(yaml.safe_load(config_path.read_text())).items():
        method = build_method(run["spec"])
        assert method.backbone_spec == run["spec"]["backbone"], name


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
def test_a_micro_dag_probes_and_fine_tunes_vox2vec_and_hdssl(tmp_path):
    """vox2vec and hierarchical dense SSL pre-train an FPN, which is probed and fine-tuned with the backbone frozen
    first (the HDSSL paper's protocols), end to end: each protocol its own runs, per-case rows and leaderboard.
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
        protocols={"probe": {"optimizer": {"lr": 0.01}}, "frozen_then_finetune": {"frozen_steps": 2, "ramp_steps": 2}})
    config["inference"]["roi_size"] = [32, 32, 32]
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr[-5000:]
    table = pd.read_csv(tmp_path / "results" / "micro" / "per_case.csv")
    assert table.groupby("protocol")["init"].unique().map(sorted).to_dict() == {
        protocol: ["hdssl", "vox2vec"] for protocol in ("frozen_then_finetune", "probe")}
    (probe,) = (tmp_path / "results" / "micro" / "finetune").glob("phantom_vox2vec_probe_fpn3d_*")
    manifest = json.loads((probe / "manifest.json").read_text())
    assert manifest["transfer"]["method"] == "vox2vec" and manifest["transfer"]["fractions"]["encoder"] == 1.0
    assert manifest["probe_features"] == get_method("vox2vec").probe_features
    board = pd.read_csv(tmp_path / "reports" / "micro" / "tables" / "leaderboard.csv")
    assert sorted(board.groupby("protocol").size().items()) == [("frozen_then_finetune", 2), ("probe", 2)]


def dry_run_commands(tmp_path, profile, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"), "-n", "-p",
                           "--cores", "8", "--workflow-profile", str(REPO / "profiles" / profile), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("profile, device, threads, workers", [("default", "cpu", 1, 0), ("gpu", "cuda", 4, 3)])
def test_each_profile_puts_every_training_job_on_its_device_with_loader_workers(profile, device, threads, workers,
                                                                                tmp_path):
    result = dry_run_commands(tmp_path, profile)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"python -m ssl3d --threads (\d+) (pretrain|finetune) .*?--device (\w+)"
                      r"(?: --workers (\d+))?", result.stdout)
    assert {stage for _, stage, _, _ in jobs} == {"pretrain", "finetune"}
    assert {found for _, _, found, _ in jobs} == {device}
    assert {int(n) for _, stage, _, n in jobs if stage == "finetune"} == {workers}
    assert {int(n) for n, stage, _, _ in jobs if stage == "finetune"} == {threads}
    assert "mem_mb=" not in result.stdout  # estimated only when asked for (SSL3D_DEVICE_CLASS), for a scheduler


def test_a_scheduler_gets_each_training_jobs_memory_and_time_from_the_plan(tmp_path):
    """With a device class named, every training job carries the estimate's mem_mb and runtime (ssl3d.estimate)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(REPO / "config" / "experiments" / "micro.yaml"), "-n"],
                            capture_output=True, text=True, env={**os.environ, "SSL3D_DEVICE_CLASS": "cpu-2core"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    estimated = [(rule, re.search(r"runtime=(\d+), mem_mb=(\d+)", resources)) for rule, resources in jobs]
    assert {rule for rule, found in estimated if found} == {"pretrain", "finetune"}
    assert all(bool(found) == (rule in ("pretrain", "finetune")) for rule, found in estimated)
    assert all(int(found[1]) >= 10 and int(found[2]) >= 4000 for _, found in estimated if found)


def test_a_pretraining_job_on_several_gpus_claims_them_and_runs_one_process_per_gpu(tmp_path):
    result = dry_run_commands(tmp_path, "gpu", "--set-resources", "pretrain:gpu=2", "--resources", "gpu=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"python -m ssl3d\.gpus 2 python -m torch\.distributed\.run --standalone --nproc_per_node 2 "
                     r"-m ssl3d --threads 3 pretrain .* --device cuda --workers 2", result.stdout)


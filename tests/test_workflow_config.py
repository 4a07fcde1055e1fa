"""The workflow's checks and plans, with no job run: a config problem is one line naming its config path, the
Snakefile is lint clean, every experiment config plans, and each profile gives the training jobs their device,
threads, loader workers and, for a scheduler, their resources."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from ssl3d.plan import schema_problems
from ssl3d.validate import config_problems

from conftest import MICRO, REPO, snakemake
from test_experiment_configs import CONFIGS as PLANNED_THERE  # planned (and more) there


PROBLEMS = [
    (lambda c: c["finetune"].update(stepz=3), r"finetune: .*'stepz' was unexpected"),
    (lambda c: c["splits"].update(label_fractions=[0.5, 1.5]), r"splits\.label_fractions\[1\]: 1\.5 is greater"),
    (lambda c: c["evaluation"]["empty"].update(both_empty="zero"), r"evaluation\.empty\.both_empty: 'zero' is not"),
    (lambda c: c["pretrain"]["methods"]["byol"].update(noise_sd=1),
     r"pretrain\.methods\.byol\.noise_sd: unknown setting of byol; known: batch_size, "),
    (lambda c: c["pretrain"]["methods"].update(swinunetr_ssl={}), r"pretrain\.methods\.swinunetr_ssl: swinunetr_ssl "
     r"needs a backbone with hidden_states; 'unet' has not \(it runs on swinunetr\)$"),
    (lambda c: c["finetune"]["backbones"][0].update(chanels=[4, 8]), r"finetune\.backbones\[0\]\.chanels: unet "
                                                                     r"takes no field 'chanels'; known: channels"),
    (lambda c: c["finetune"].update(protocols={"frozen_then_finetune": {"frozen_steps": 6, "ramp_steps": 2}}),
     r"finetune\.protocols\.frozen_then_finetune\.frozen_steps: 6 leaves none of the 6 steps"),
    (lambda c: c["finetune"].update(protocols={"frozen_then_finetune": {"frozen_steps": 4, "ramp_steps": 2}},
                                    per_init={"byol": {"steps": 4}}),
     r"finetune\.protocols\.frozen_then_finetune\.frozen_steps: 4 leaves none of the 4 steps .* \(arms: byol on unet "
     r"\(frozen_then_finetune\)\)$"),
    (lambda c: c["finetune"].update(per_init={"simclr": {"steps": 2}}), r"finetune\.per_init\.simclr: not one of"),
    (lambda c: c["pretrain"]["methods"]["byol"].update(tau_base="0.99"),
     r"pretrain\.methods\.byol\.tau_base: '0\.99' is not a number$"),
    (lambda c: c["pretrain"]["methods"].update(pgl={"align_flip": "false"}),
     r"pretrain\.methods\.pgl\.align_flip: 'false' is not true or false$"),
    (lambda c: c["pretrain"]["methods"].update(pgl={"level": 7}),
     r"pretrain\.methods\.pgl: pgl\.level: 7 is not an encoder level of unet, which has 3"),
    (lambda c: c["pretrain"]["methods"].update(vox2vec={"pairs_per_region": 0}),
     r"pretrain\.methods\.vox2vec: pairs_per_region 0 .*want counts of at least 1"),
    (lambda c: c["pretrain"]["methods"].update(hybridmim={"mask_patch": 0}),
     r"pretrain\.methods\.hybridmim: hybridmim: mask_patch 0"),
]


@pytest.mark.parametrize("edit, message", PROBLEMS)
def test_each_config_problem_is_one_line_with_its_config_path(edit, message):
    """What the workflow checks before planning (``workflow/rules/common.smk``: the schema's problems, then
    ``ssl3d.validate``'s), called as it calls them."""
    config = json.loads(json.dumps(MICRO))
    edit(config)
    problems = schema_problems(config) or config_problems(config)
    assert len(problems) == 1 and re.match(message, problems[0]), problems


def test_a_bad_config_fails_before_any_job_with_one_line_per_problem(tmp_path):
    config = json.loads(json.dumps(MICRO))
    PROBLEMS[0][0](config)
    result = snakemake(tmp_path, config, "-n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the config has 1 problem(s) (also in logs/config_problems.log)" in output
    assert re.search(f"^  {PROBLEMS[0][1]}", output, re.M), output[-2000:]
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
    config = yaml.safe_load(experiment.read_text())
    assert f"results/{config['experiment']}/summary.md" in result.stdout
    # the plan's summary, and each manual dataset without a copy here named as skipped, before the job list
    assert re.search(rf"^experiment {config['experiment']}: \d+ pre-training and \d+ fine-tuning runs; follow one "
                     rf"with `tail -f results/{config['experiment']}/<stage>/<run>/<stage>.log`", result.stderr, re.M)
    for name, dataset in config["datasets"].items():
        if dataset.get("missing") == "skip":
            assert f"skipping dataset {name}: " in result.stderr


def test_ssl3d_data_moves_every_data_stage_to_another_disk(tmp_path, monkeypatch):
    elsewhere = tmp_path / "other_disk"
    monkeypatch.setenv("SSL3D_DATA", str(elsewhere))
    result = snakemake(tmp_path, MICRO, "-n")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"output: {elsewhere}/raw/phantom\n" in result.stdout  # prepare
    assert f"output: {elsewhere}/preprocessed/demo_ct/phantom\n" in result.stdout  # preprocess
    assert f"input: {elsewhere}/preprocessed/demo_ct/phantom," in result.stdout  # the runs read it there
    assert "data/" not in result.stdout.replace(str(elsewhere), "")  # nothing under the working directory's data/


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


def dry_run_commands(tmp_path, profile, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"), "-n", "-p",
                           "--cores", "8", "--workflow-profile", str(REPO / "profiles" / profile), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("profile, device, per_stage", [
    ("default", "cpu", {"pretrain": (1, 0), "finetune": (1, 0)}),  # (threads, loader workers)
    ("gpu", "cuda", {"pretrain": (6, 5), "finetune": (4, 3)})])
def test_each_profile_puts_every_training_job_on_its_device_with_loader_workers(profile, device, per_stage, tmp_path):
    result = dry_run_commands(tmp_path, profile)
    assert result.returncode == 0, result.stderr[-3000:]
    assert training_jobs(result.stdout) == {(stage, device, *found) for stage, found in per_stage.items()}
    assert "mem_mb=" not in result.stdout  # estimated only when asked for (SSL3D_DEVICE_CLASS), for a scheduler


def training_jobs(commands: str) -> set[tuple[str, str, int, int]]:
    """(stage, device, threads, loader workers) of the training commands of a dry run."""
    jobs = re.findall(r"python -m ssl3d --threads (\d+) (pretrain|finetune) .*?--device (\w+)(?: --workers (\d+))?",
                      commands)
    return {(stage, device, int(threads), int(workers or 0)) for threads, stage, device, workers in jobs}


def test_a_gpu_requested_through_gres_is_used_like_one_requested_through_gpu(tmp_path):
    """A cluster that wants --gres: ``gres: gpu:<type>:N`` gives the job its device and loader workers as gpu does."""
    result = dry_run_commands(tmp_path, "default", "--set-resources", 'pretrain:gres="gpu:a100:1"',
                              "--set-threads", "pretrain=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {job for job in training_jobs(result.stdout) if job[0] == "pretrain"} == {("pretrain", "cuda", 4, 3)}


def test_the_kubernetes_profile_puts_every_training_job_on_a_gpu_with_a_storage_provider(tmp_path):
    """Its plan, where its executor plugin is installed (it is no test dependency: it pulls the kubernetes client);
    running it needs a cluster. The storage provider is the fs one, as the profile suggests for a shared volume."""
    pytest.importorskip("snakemake_executor_plugin_kubernetes",
                        reason='the kubernetes executor plugin: pip install -c requirements.lock -e ".[kubernetes]"')
    result = dry_run_commands(tmp_path, "kubernetes", "--default-storage-provider", "fs",
                              "--default-storage-prefix", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"python -m ssl3d --threads (\d+) (pretrain|finetune) .*?--device (\w+)", result.stdout)
    assert {stage for _, stage, _ in jobs} == {"pretrain", "finetune"} and {d for _, _, d in jobs} == {"cuda"}
    assert "gpu=1, gpu_manufacturer=nvidia" in result.stdout and "(retrieve from storage)" in result.stdout


def test_the_slurm_profile_puts_every_training_job_on_a_gpu_with_its_threads(tmp_path):
    """Its plan (running it needs a cluster: tests/cluster/test_slurm.py): each training job asks SLURM for one GPU
    and its threads as CPUs, and trains on cuda with loader workers."""
    pytest.importorskip("snakemake_executor_plugin_slurm",
                        reason='the slurm executor plugin: pip install -c requirements.lock -e ".[slurm]"')
    result = dry_run_commands(tmp_path, "slurm")
    assert result.returncode == 0, result.stderr[-3000:]
    assert training_jobs(result.stdout) == {("pretrain", "cuda", 8, 7), ("finetune", "cuda", 8, 7)}
    assert re.search(r"^rule pretrain:\n(?:    .*\n)*?    resources: .*mem_mb=4000, .*runtime=60, .*gpu=1",
                     result.stdout, re.M)


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
    result = dry_run_commands(tmp_path, "gpu", "--set-resources", "pretrain:gpu=3", "--resources", "gpu=3")
    assert result.returncode != 0  # the plan, not the job, says that 4 samples do not divide among 3 GPUs
    assert re.search(r"pretrain \S+: its batch_size 4 does not divide among its 3 GPUs; set "
                     r"pretrain\.methods\.\w+\.batch_size to a multiple of 3", result.stdout + result.stderr)

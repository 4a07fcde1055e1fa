"""The micro DAG end to end through a real SLURM cluster with profiles/slurm (snakemake-executor-plugin-slurm).

Needs a running cluster with accounting (sacct) whose default partition takes CPU jobs: on Debian, as root,
`bash tests/cluster/setup_single_node_slurm.sh` makes this machine one, and `pip install -e ".[slurm]"` the plugin.
Skipped elsewhere. Run it alone with `pytest -m slurm -s` (-s prints what SLURM accounted).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from ssl3d.estimate import job_resources
from ssl3d.plan import finetune_runs, load_config, pretrain_runs

PROFILE = REPO / "profiles" / "slurm"
MICRO = REPO / "config" / "experiments" / "micro.yaml"
# The micro DAG's jobs that go to SLURM (run_config, skipped, collect, summarise and all are local rules): 1 prepare,
# 1 preprocess, 1 splits, 2 pretrain, 12 finetune (3 inits x 2 fractions x 2 seeds; each evaluates its model),
# 1 report.
SLURM_JOBS = {"prepare": 1, "preprocess": 1, "splits": 1, "pretrain": 2, "finetune": 12, "report": 1}
SETUP = "tests/cluster/setup_single_node_slurm.sh"
DEVICE_CLASS = "cpu-2core"  # the training jobs' mem_mb and runtime come from the plan's estimate on this class


def cluster_problem() -> str | None:
    """Why the test cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return f"sbatch is not on PATH: no SLURM here ({SETUP} sets up a one-node cluster, as root)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return 'the SLURM executor plugin is not installed: pip install -c requirements.lock -e ".[slurm]"'
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if "UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
        return f"sbatch is here but no slurmctld answers (run {SETUP} as root): {said}"
    if shutil.which("sacct") is None or subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True,
                                                          timeout=60).returncode != 0:
        return "sacct does not work here (no slurmdbd accounting): the test reads what SLURM ran from sacct"
    return None


def gpu_free(profile: dict) -> list[str]:
    """The profile's set-resources as --set-resources arguments, with no GPU (the test cluster has none)."""
    return [f"{rule}:{key}={0 if key == 'gpu' else value}"
            for rule, resources in profile.get("set-resources", {}).items() for key, value in resources.items()]


def as_sacct_shows(resources: dict) -> tuple[str, str]:
    """(ReqMem, Timelimit) as sacct prints a request of ``mem_mb`` and ``runtime`` minutes (under a day)."""
    hours, minutes = divmod(resources["runtime"], 60)
    return f"{resources['mem_mb']}M", f"{hours:02d}:{minutes:02d}:00"


@pytest.mark.slurm
@pytest.mark.slow
def test_the_micro_dag_runs_to_the_end_through_slurm(tmp_path):
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    profile = yaml.safe_load((PROFILE / "profile.yaml").read_text())
    started = time.monotonic()
    # The working directory is a fresh folder (the plugin submits with sbatch -D <the launch directory>, and keeps
    # its SLURM logs under .snakemake/slurm_logs there). One CPU per job (the profile asks up to 8; a test node may
    # have 2); the profile's GPU requests become 0; the first status check comes after 5 s instead of 40.
    # SSL3D_DEVICE_CLASS: the training jobs ask for the memory and time the plan estimates (workflow/rules/common.smk,
    # estimated_resources), the other jobs for the profile's default-resources.
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--workflow-profile", str(PROFILE), "--configfile", str(MICRO), "--max-threads", "1",
         "--set-resources", *gpu_free(profile), "--slurm-init-seconds-before-status-checks", "5",
         "--slurm-keep-successful-logs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "SSL3D_DEVICE_CLASS": DEVICE_CLASS})
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-8000:]
    assert (tmp_path / "reports" / "micro" / "index.html").is_file()
    assert (tmp_path / "results" / "micro" / "summary.md").is_file()

    # Every job of the DAG that is not a local rule ran as a SLURM job named after this run, and completed.
    (run_id,) = set(re.findall(r"SLURM run ID: (\S+)", result.stderr))
    fields = "JobID,JobName%40,Comment%120,Partition,AllocCPUS,ReqMem,Timelimit,MaxRSS,Elapsed,State"
    table = subprocess.run(["sacct", "-P", "-n", "--name", run_id, "--starttime", "now-1days", "-o", fields],
                           capture_output=True, text=True, check=True).stdout
    jobs = [line.split("|") for line in table.splitlines() if line.split("|")[1] == run_id]  # the jobs, no steps
    # the profile names no partition: every job went to the cluster's default one (sinfo marks it with *)
    (default,) = [name.rstrip("*") for name in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True,
                                                              text=True, check=True).stdout.split() if "*" in name]
    micro = load_config(MICRO)
    runs = {"pretrain": pretrain_runs(micro), "finetune": finetune_runs(micro)}
    rules = {}
    for _, _, comment, partition, _, memory, time_limit, *_, state in jobs:
        assert state == "COMPLETED" and partition == default, (comment, partition, state)
        # the plugin's comment: rule_<rule>[_wildcards_<the values joined by _>]; a training job's are stage and run
        rule, run = re.match(r"rule_([a-z_]+?)(?:_wildcards_(.*))?$", comment).groups()
        rules[rule] = rules.get(rule, 0) + 1
        asked = (job_resources(rule, runs[rule][run.removeprefix(f"{rule}_")], DEVICE_CLASS) if rule in runs
                 else profile["default-resources"])
        assert (memory, time_limit) == as_sacct_shows(asked), comment
    assert rules == SLURM_JOBS
    # each job ran its rule through `srun` inside the allocation (a job step besides the batch step)
    steps = [line for line in table.splitlines() if re.match(r"\d+\.0\|", line)]
    assert len(steps) == sum(SLURM_JOBS.values())
    logs = sorted((tmp_path / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log"))
    assert len(logs) == sum(SLURM_JOBS.values())

    print(f"\nmicro DAG through SLURM: {wall:.0f} s wall, {len(jobs)} SLURM jobs (run {run_id})")
    print(subprocess.run(["sacct", "--name", run_id, "--starttime", "now-1days", "--format",
                          "JobID,JobName%12,AllocCPUS,ReqMem,Timelimit,MaxRSS,Elapsed,State"],
                         capture_output=True, text=True).stdout)

"""Wall time of the demo DAG (`snakemake --cores all` on config/config.yaml) in a fresh working directory.

Prints the total, the time per stage (each rule's jobs: how many, their summed seconds and the span from the first
start to the last end, from the start and end times Snakemake records per output in .snakemake/metadata), the
fine-tuning jobs' times (Snakemake's benchmark files) and each pre-training method's median step time split into
data wait / forward / backward+step with its peak memory (its step log), and exits non-zero when the total exceeds
the target (5 minutes on 2 cores: the demo grid with every pre-training method but SwinUNETR SSL, data stages and
report included; config/config.yaml says why that one is left out).

    python benchmarks/demo_wall_time.py [--target-seconds 300] [--cores all]

With ``SSL3D_JOB_SERVER=off`` in the environment every job starts its own Python (ssl3d.jobserver): the time the
job server saves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def stage_times(workdir: Path) -> pd.DataFrame:
    """Per rule: jobs, their summed wall seconds and the stage's span (first start to last end), in start order."""
    records = [json.loads(path.read_text()) for path in (workdir / ".snakemake" / "metadata").iterdir()]
    outputs = pd.DataFrame([{key: record.get(key) for key in ("rule", "job_hash", "starttime", "endtime")}
                            for record in records]).dropna()
    # one job, several outputs: each output has its own end time; the job spans the earliest start to the last end
    jobs = outputs.groupby(["rule", "job_hash"]).agg(starttime=("starttime", "min"), endtime=("endtime", "max"))
    jobs = jobs.reset_index()
    # clipped: local rules (run_config) record their end a moment before their start
    jobs["seconds"] = (jobs["endtime"] - jobs["starttime"]).clip(lower=0)
    stages = jobs.groupby("rule").agg(jobs=("seconds", "size"), job_seconds=("seconds", "sum"),
                                      start=("starttime", "min"), end=("endtime", "max"))
    stages["span_seconds"] = stages["end"] - stages["start"]
    return stages.sort_values("start")[["jobs", "job_seconds", "span_seconds"]].round(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-seconds", type=float, default=300.0)
    parser.add_argument("--cores", default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", workdir,
                        "--configfile", str(REPO / "config" / "config.yaml"), "--cores", args.cores, "--quiet"],
                       check=True)
        total = time.perf_counter() - start
        print(stage_times(Path(workdir)).to_string())
        runs = sorted(Path(workdir).glob("results/*/finetune/*/finetune.benchmark.tsv"))
        seconds = pd.concat([pd.read_csv(path, sep="\t") for path in runs])["s"]
        summary = next(Path(workdir).glob("results/*/summary.md")).read_text()
        for step_log in sorted(Path(workdir).glob("results/*/pretrain/*/step_log.csv")):
            steps = pd.read_csv(step_log).iloc[1:]  # the first step pays one-off start-up costs
            split = " / ".join(f"{1000 * steps[key].median():.1f}" for key in ("data_s", "forward_s", "backward_s"))
            print(f"pre-training {step_log.parent.name}: {len(steps)} steps, median ms data / forward / backward "
                  f"{split}, peak memory {steps['peak_memory_mb'].max():.0f} MB")
    print(f"fine-tuning jobs: {len(runs)}, each {seconds.median():.1f} s median ({seconds.min():.1f}-{seconds.max():.1f})")
    print(f"demo DAG wall time: {total:.1f} s (target {args.target_seconds:.0f} s)")
    for section in summary.split("\n## ")[1:]:  # each (dataset, backbone, protocol): its Dice table
        print("## " + section.split("### IoU")[0])
    return 0 if total <= args.target_seconds else 1


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of the demo DAG (`snakemake --cores all` on config/config.yaml) in a fresh working directory.

Prints the total, the fine-tuning jobs' times (Snakemake's benchmark files) and each pre-training method's median
step time split into data wait / forward / backward+step with its peak memory (its step log), and exits non-zero
when the total exceeds the target (10 minutes on 2 cores for the demo grid with pre-training).

    python benchmarks/demo_wall_time.py [--target-seconds 600] [--cores all]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-seconds", type=float, default=600.0)
    parser.add_argument("--cores", default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", workdir,
                        "--configfile", str(REPO / "config" / "config.yaml"), "--cores", args.cores, "--quiet"],
                       check=True)
        total = time.perf_counter() - start
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

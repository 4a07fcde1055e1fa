"""``ssl3d estimate`` against what a finished experiment's runs measured: how far to trust its device-hours.

For each run of the config's plan that has a manifest under ``--results``, the estimate's seconds per step
(``ssl3d.estimate.seconds_per_step`` on ``--device-class``) beside the median forward + backward seconds of a step
that the run recorded (``median_step_seconds`` in its manifest; the data wait is left out, as the estimate leaves
it out), grouped as ``ssl3d estimate`` groups its rows, with the ratio estimated / measured. Run it on a machine of
the device class, for an experiment other than the demo: the demo's pre-training arms are one of the two points the
device class was measured at (``benchmarks/gpu_step.py``), so their ratios are near 1 by construction.

    snakemake --cores all --configfile config/experiments/micro.yaml
    python benchmarks/estimate_accuracy.py --configfile config/experiments/micro.yaml --results results/micro
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ssl3d.estimate import run_arm, seconds_per_step
from ssl3d.plan import finetune_runs, load_config, pretrain_runs


def compared(config: dict, results: Path, device: str) -> dict[str, list[tuple[float, float]]]:
    """Row label -> (estimated, measured) seconds per step of each run with a manifest."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for stage, runs in (("pretrain", pretrain_runs(config)), ("finetune", finetune_runs(config))):
        for name, run in runs.items():
            manifest = results / stage / name / "manifest.json"
            if not manifest.is_file():
                continue
            median = json.loads(manifest.read_text())["median_step_seconds"]
            spec = run["spec"]
            label = (f"pretrain {spec['variant']}" if stage == "pretrain"
                     else f"finetune {spec['backbone']['name']} {spec.get('protocol', 'finetune')}")
            rows.setdefault(label, []).append((seconds_per_step(run_arm(stage, spec), device),
                                               median["forward_s"] + median["backward_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="the experiment's results/<experiment>")
    parser.add_argument("--device-class", default="cpu-2core")
    args = parser.parse_args()
    rows = compared(load_config(args.configfile), args.results, args.device_class)
    if not rows:
        raise SystemExit(f"{args.results}: no run of {args.configfile} has a manifest there")
    print(f"{'':32}{'runs':>6}{'estimated s':>13}{'measured s':>12}{'ratio':>8}")
    for label, pairs in rows.items():
        estimated, measured = (statistics.median(side) for side in zip(*pairs))
        print(f"{label[:32]:32}{len(pairs):>6}{estimated:>13.4f}{measured:>12.4f}{estimated / measured:>8.2f}")


if __name__ == "__main__":
    main()

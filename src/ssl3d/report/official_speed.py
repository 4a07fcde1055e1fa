"""Our pre-training step against the official implementations' step, as the report shows it.

``benchmarks/official_compare.py --json benchmarks/results/official/<name>.json`` times an official step and ours
alternately on one machine and writes the medians, the paired ratios ours / official and the conditions (shape,
batch, the machine, our numerics, torch, the official commit). The report shows the comparisons of the methods its
experiment pre-trains, each with its spread and conditions, so that a speed claim is read with what it was measured
under. The comparisons are the repository's files (measured on the machine that wrote them), not the experiment's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

LEGEND = ("One pre-training step (forward, loss, backward, optimizer step) of the official code and of ours, timed "
          "alternately in one process on the same inputs (benchmarks/official_compare.py; the JSON files in "
          "benchmarks/results/official/). ours / official: the median of the paired ratios, with their "
          "interquartile range; peak memory: the resident set above the one before the step, on CPU; GFLOP/s: the "
          "convolution, matrix and attention FLOPs of a step over its median time; ours in: what our step ran in (the "
          "official steps run in float32).")


def _numerics(result: dict) -> str:
    numerics = "bf16 autocast" if result["precision_ours"] == "bfloat16" else "float32"
    return (numerics + (", channels_last_3d" if result.get("channels_last_ours") else "")
            + (", torch.compile" if result.get("compile_ours") else ""))


def comparison_table(paths: Iterable[str | Path], methods: Iterable[str]) -> pd.DataFrame:
    """One row per comparison file of ``paths`` whose method is one of ``methods`` (registered method names)."""
    methods, rows = set(methods), []
    for path in sorted(map(Path, paths)):
        result = json.loads(path.read_text())
        if result["ours_method"] not in methods:
            continue
        ratio, official, ours = result["ratio_ours_over_official"], result["official"], result["ours"]
        rows.append({
            "comparison": result["method"], "input": f"{'x'.join(map(str, result['shape']))} x {result['batch']}",
            "ours in": _numerics(result), "official s/step": round(official["median_s"], 3),
            "ours s/step": round(ours["median_s"], 3),
            "ours / official": f"{ratio['median']:.3f} [{ratio['q1']:.3f}, {ratio['q3']:.3f}]",
            "peak MiB official / ours": f"{official['peak_step_memory_mib']} / {ours['peak_step_memory_mib']}",
            "GFLOP/s official / ours": f"{official['achieved_gflops']:.0f} / {ours['achieved_gflops']:.0f}",
            "machine": result.get("device", f"cpu, {result['threads']} threads"),  # older files: threads only
            "rounds": len(ratio["paired"]), "torch": result["torch"],
            "official commit": (result["official_commit"] or "unknown")[:12],
        })
    return pd.DataFrame(rows)

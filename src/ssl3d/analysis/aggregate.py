"""From the per-case table to summaries: mean ± sd across seeds (and subset draws) per init, fraction and target.

Cases are averaged within a run first (a run is one seed of one subset draw), then runs are summarised: the sd
is the spread between training runs, which is what a reader compares methods against. The ``mean`` target is
each run's mean over its targets. The folds of a k-fold split are runs too (each tests other cases), so a cell
pools them with the seeds, as the papers report a mean ± sd over folds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ssl3d.evaluate.columns import METRICS, PER_CASE_COLUMNS, TEXT_COLUMNS
from ssl3d.io import atomic_path, write_text

GROUP = ["dataset", "backbone", "protocol", "init", "label_fraction", "target", "metric"]
METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "nsd": "NSD"}
DEVICE_HOURS = {"cuda": "GPU-hours", "cpu": "CPU-hours"}  # a manifest's device_type -> what its hours are called


def hours_title(device_types) -> str:
    """What device-hours are called where runs ran (the ``device_type`` of their manifests, unknown ones left out):
    GPU-hours or CPU-hours when all ran on one kind, device-hours when on both or none is known, so a table or axis
    never calls CPU time GPU time."""
    known = set(pd.Series(device_types, dtype=object).dropna())
    return DEVICE_HOURS.get(known.pop(), "device-hours") if len(known) == 1 else "device-hours"


def read_per_case(path: str | Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    if "fold" not in table.columns:  # written before k-fold splits: every run had the one split
        table["fold"] = 0
    missing = [column for column in PER_CASE_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a per-case results table (missing columns {missing})")
    return table


def collect(paths: list[str | Path], out_csv: str | Path) -> pd.DataFrame:
    table = pd.concat([read_per_case(path) for path in paths], ignore_index=True)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


def per_run_means(per_case: pd.DataFrame) -> pd.DataFrame:
    keys = GROUP + ["subset", "seed", "run_id"]
    runs = per_case.groupby(keys, dropna=False)["value"].agg(value="mean", n_cases="count").reset_index()
    overall = (runs.groupby([key for key in keys if key != "target"], dropna=False)
               .agg(value=("value", "mean"), n_cases=("n_cases", "max")).reset_index().assign(target="mean"))
    return pd.concat([runs, overall], ignore_index=True)


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    runs = per_run_means(per_case)
    summary = runs.groupby(GROUP, dropna=False).agg(
        mean=("value", "mean"), sd=("value", "std"), n_runs=("run_id", "nunique"), n_seeds=("seed", "nunique"),
        n_subsets=("subset", "nunique"), n_test_cases=("n_cases", "max"),
    ).reset_index()
    target_order = {target: i for i, target in enumerate(dict.fromkeys(list(per_case["target"]) + ["mean"]))}
    return summary.sort_values(GROUP, key=lambda column: column.map(target_order) if column.name == "target"
                               else column).reset_index(drop=True)


SUMMARY_LEGEND = ("Mean ± sd across training runs (seeds × subset draws) of each run's mean over its test cases; "
                  "columns are label fractions. The `mean` target is each run's mean over targets.")


def summary_blocks(summary: pd.DataFrame) -> list[tuple[str, str, list[tuple[str, pd.DataFrame]]]]:
    """The summary as display tables: per dataset · backbone · protocol, its title, the runs behind each cell, and
    one table per metric (rows init × target, columns label fractions, cells ``mean ± sd``)."""
    blocks = []
    for (dataset, backbone, protocol), block in summary.groupby(["dataset", "backbone", "protocol"], sort=False):
        runs = block.iloc[0]
        tables = []
        for metric in [m for m in METRICS if m in set(block["metric"])]:
            rows = block[block["metric"] == metric].copy()
            rows["cell"] = [f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}" for m, s in zip(rows["mean"], rows["sd"])]
            table = rows.pivot(index=["init", "target"], columns="label_fraction", values="cell")
            table = table.reindex(pd.MultiIndex.from_frame(rows[["init", "target"]].drop_duplicates()))
            table.columns = [f"{fraction:g}" for fraction in table.columns]
            tables.append((METRIC_TITLES[metric], table.reset_index()))
        blocks.append((f"{dataset} · {backbone} · {protocol}",
                       f"{int(runs.n_seeds)} seed(s) × {int(runs.n_subsets)} subset draw(s) per cell, "
                       f"{int(runs.n_test_cases)} test cases.", tables))
    return blocks


def summary_markdown(summary: pd.DataFrame, empty_policy: str) -> str:
    lines = ["# Results summary", "", SUMMARY_LEGEND, f"Empty-mask policy: `{empty_policy}`.", ""]
    for title, runs, tables in summary_blocks(summary):
        lines += [f"## {title}", "", runs, ""]
        for metric, table in tables:
            lines += [f"### {metric}", "", table.to_markdown(index=False), ""]
    return "\n".join(lines)


def write_summary(per_case_csv: str | Path, out_csv: str | Path, out_md: str | Path) -> pd.DataFrame:
    per_case = read_per_case(per_case_csv)
    summary = summarise(per_case)
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    write_text(out_md, summary_markdown(summary, "; ".join(sorted(per_case["empty_policy"].dropna().unique()))))
    return summary

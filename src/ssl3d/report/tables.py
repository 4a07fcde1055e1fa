"""Reproduced versus published: each paper table in its own layout with our numbers beside the paper's, and the
leaderboard of every init, ranked within each protocol. Both are DataFrames in long form (one line per cell, or per
ranked row); the ``*_markdown`` functions render them, and writing CSV is the caller's job.

Paper tables (:func:`paper_table`)
    One line per published cell of the table (``report/published/<paper>.csv``). ``row`` numbers the printed rows
    (method, init, backbone, setting, label fraction) and ``column`` the printed columns (dataset, target, metric),
    both in order of first appearance in the published file, so the paper's grid is kept even for cells we have no
    number for; :func:`paper_table_markdown` pivots the lines back into that grid.

Matching a published cell to our per-case rows
    - protocol: equal to the one the cell's table reports (:func:`ssl3d.report.published.protocol_of`: HDSSL's
      linear evaluation is our ``probe``, its fine-tuning our ``frozen_then_finetune``, every other published
      number ``finetune``), so a number is never compared with runs of another protocol.
    - dataset: equal.
    - init: our init equals the published one (a method name or ``scratch``). An experiment entry named otherwise
      (``hybridmim_unet`` is HybridMIM on its UNet) is tied to a published init by ``aliases``: our init -> the
      published init, or -> (published init, setting) where the paper tells rows of one init apart by their
      setting only (the loss ablation of HybridMIM's Table 4). A match on the setting wins over one without; two of
      our inits matching one cell raise ``ValueError`` (their runs would be pooled).
    - backbone: equal after ``backbones`` (published backbone -> ours), which names the stand-in where the paper's
      network is not in the suite (``{"unetformer": "swinunetr"}``, PGL's ``resnet50_aspp``); without one such a
      row matches nothing and says "not run".
    - label fraction: equal where the paper gives one (where it gives none, our matching runs must have one).
    - target: equal; the paper's ``avg`` is our ``mean``, each run's mean over the targets we evaluate
      (:func:`ssl3d.analysis.aggregate.per_run_means`).
    - metric: equal. PGL's ``hd`` (Hausdorff distance, percentile not stated) is not our ``hd95``, and speeds are
      not per-case metrics: those cells say "metric not measured".
    The setting text is not matched otherwise, so an unaliased init stands for every setting of its published init
    (HybridMIM's generic and task-specific rows show the same runs).

Numbers of a cell
    ``ours`` is the mean over runs of each run's mean over its test cases (the summary table's number), ×100 where
    the paper prints percent; ``delta`` = ours − published, in the paper's scale. The 95 % interval is the BCa
    bootstrap over test cases, each case averaged over the runs first (:func:`ssl3d.analysis.stats.bootstrap_ci`
    on :func:`ssl3d.analysis.stats.case_values`), the same interval as the leaderboard's. Not a t-interval across
    runs: a reproduction has 1-3 seeds, where that interval is undefined or a dozen standard errors wide
    (t(0.975, 1) = 12.7), and it is evaluated on another test split than the paper's, so test-case sampling is the
    uncertainty the published number is read against. It leaves out seed-to-seed variation (the summary's sd across
    runs shows it), so ``outside_ci`` (the published value lies outside our interval) is a flag to look into, not a
    test. For the ``mean`` target the interval is over each case's mean over targets, so where a target is NaN its
    centre can differ slightly from ``ours`` (a mean of target means).

Status of a cell, first that applies: "components not recoverable" (a row the paper's text lost the label of, with
no init: HDSSL Table 1's rows 2-4), "method not implemented" (the published init is empty, e.g. TransVW, or not
``scratch``, a registered method or a released checkpoint: :func:`ssl3d.report.published.implemented`), "metric not
measured", "not run" (no run matches), else the scale of the experiment that produced the per-case table, which only
the caller knows: "demo scale", "mini scale" or "paper scale" (the experiment config's ``report.tier``).

Leaderboard (:func:`leaderboard`)
    Every (init, backbone) row of each protocol × dataset × label fraction, ranked by the primary metric (1 = best)
    of its mean over the case values, with the case bootstrap intervals of Dice and HD95, the Holm-corrected paired
    Wilcoxon p-values against ``scratch`` on the row's own backbone and against the best row, and ``stale``.
    The comparisons are :func:`ssl3d.analysis.stats.compare_inits`' (same tests, same pair-once family, same Holm);
    a row on a backbone scratch was not trained on (Models Genesis on its own UNet in the HybridMIM grid) has no
    p vs scratch.

Compute of a leaderboard row
    What one result of the row cost, in device-hours (``device_seconds`` of the manifests: the training loop's wall
    time × the devices it ran on, :func:`ssl3d.manifest.compute_spent`): the mean over the row's pre-training runs
    plus the mean over its fine-tuning runs, / 3600. A pre-training run is shared by the fine-tuning runs of several
    seeds, subset draws and label fractions, so it is counted once per row however many of the row's fine-tuning
    runs start from it (a mean over fine-tuning runs of "its pre-training + itself" would weight a pre-training run
    by how many runs reuse it). Scratch pre-trains nothing (0). Unknown, NaN and never 0: a manifest missing or
    written before manifests recorded compute, or a released checkpoint (pre-trained elsewhere); one unknown run
    makes its part of the row unknown. ``device_type`` is the runs' (``mixed`` when they ran on several kinds).

Method names and descriptions
    Come from the registry (``Method.title()``, ``description()``, ``paper``, ``version``): :func:`init_titles` for
    tables and legends, :func:`methods_table` for the report's Methods section. Scratch is described here; an init
    that is a pre-training entry named otherwise (a variant) is titled after its method.

Staleness
    A fine-tuning run is stale when the pre-training it starts from was made by an older version of its method
    (``Method.version``, bumped when a change alters results). Fine-tuning manifests do not record the version:
    it is read from the pre-training run's manifest (``method_version``, and ``config.method``), found through the
    fine-tuning manifest's ``config.pretrained`` run id, so ``manifests`` must hold both kinds. A fine-tuning
    manifest that records ``method`` and ``method_version`` itself is read directly. Versions are only bumped, so a
    recorded version other than the current one is an older one. Unknown (a manifest missing, a method no longer
    registered) is NA; a row is stale when any of its runs is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache

import numpy as np
import pandas as pd

from ssl3d.analysis.aggregate import METRIC_TITLES, hours_title, per_run_means
from ssl3d.analysis.stats import (LOWER_IS_BETTER, MIN_PAIRS, SCRATCH, best_row, bootstrap_ci, case_values,
                                  compare_rows, format_p)
from ssl3d.evaluate.columns import METRICS
from ssl3d.pretrain import registry
from ssl3d.report.published import implemented, protocol_of

__all__ = ["NOT_IMPLEMENTED", "NOT_MEASURED", "NOT_RUN", "PAPER_TABLE_LEGEND", "SCRATCH_DESCRIPTION", "TIERS",
           "UNATTRIBUTED",
           "init_titles", "leaderboard", "leaderboard_blocks", "leaderboard_legend", "leaderboard_markdown",
           "method_footnotes", "methods_table", "paper_table", "paper_table_grid", "paper_table_markdown",
           "status_counts"]

SCRATCH_DESCRIPTION = ("No pre-training: the downstream network starts from random weights and is trained on the "
                       "labelled cases alone, the supervised baseline every pre-trained init is compared with.")
TIERS = {"demo": "demo scale", "mini": "mini scale", "paper": "paper scale"}
NOT_IMPLEMENTED, NOT_MEASURED, NOT_RUN = "method not implemented", "metric not measured", "not run"
UNATTRIBUTED = "components not recoverable"  # the phrase of such a row's setting, and its status
FACTORS = {"percent": 100.0, "fraction": 1.0, "mm": 1.0}  # our per-case values -> the paper's scale
MIN_DECIMALS = {"fraction": 3}
ROW_KEY = ["method", "init", "backbone", "setting", "label_fraction"]
COLUMN_KEY = ["dataset", "target", "metric"]
TARGETS = {"avg": "mean"}  # the paper's target name -> ours
LEADERBOARD_METRICS = ("dice", "hd95")
ROW = ["init", "backbone"]
BLOCK = ["protocol", "dataset", "label_fraction"]  # a leaderboard ranks within one of these
CONFIDENCE = 0.95
N_RESAMPLES = 10_000

Alias = str | tuple[str, str]


# --- method names and descriptions ----------------------------------------------------------------------------

def _method_class(init: str, method_of: Mapping[str, str] | None):
    """The registered method behind an init (None for scratch or an init the registry does not know)."""
    return registry.methods().get((method_of or {}).get(init, init))


def init_titles(inits, method_of: Mapping[str, str] | None = None) -> dict[str, str]:
    """init -> the name tables and legends show: the method's display name (``Method.title()``), followed by the init
    for a variant (a pre-training entry named otherwise; ``method_of``: init -> method name); else the init."""
    titles = {}
    for init in dict.fromkeys(inits):
        cls = _method_class(init, method_of)
        titles[init] = init if cls is None else cls.title() if cls.name == init else f"{cls.title()} ({init})"
    return titles


def methods_table(inits, method_of: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The report's Methods section: per init (scratch first) its title, method, paper, version and description,
    each from the registry (``method_of``: init -> method name, for variants); scratch is described here, and an
    init the registry does not know says so."""
    titles = init_titles(inits, method_of)
    lines = []
    for init in sorted(titles, key=lambda init: init != SCRATCH):
        cls = _method_class(init, method_of)
        description = (SCRATCH_DESCRIPTION if init == SCRATCH else cls.description() if cls is not None
                       else "not a registered method")
        lines.append({"init": init, "title": titles[init], "method": "" if cls is None else cls.name,
                      "paper": "" if cls is None else cls.paper, "version": "" if cls is None else str(cls.version),
                      "description": description})
    return pd.DataFrame(lines, columns=["init", "title", "method", "paper", "version", "description"])


# --- paper tables ---------------------------------------------------------------------------------------------

def _published_cells(published: pd.DataFrame, paper: str, table: str) -> pd.DataFrame:
    """The table's cells in published order, numbered by printed row and column (order of first appearance)."""
    cells = published[(published["paper"] == paper) & (published["table"] == table)].reset_index(drop=True)
    if cells.empty:
        raise ValueError(f"no published cells for {paper} {table}")
    return cells.assign(row=cells.groupby(ROW_KEY, sort=False, dropna=False).ngroup(),
                        column=cells.groupby(COLUMN_KEY, sort=False, dropna=False).ngroup(),
                        protocol=cells["setting"].map(protocol_of))


def _aliased_runs(runs: pd.DataFrame, aliases: Mapping[str, Alias]) -> pd.DataFrame:
    """``runs`` with the published init (``as_init``) and, for an alias with one, setting (``as_setting``) that
    each of our inits stands for."""
    alias = runs["init"].map(lambda init: aliases.get(init, init))
    return runs.assign(as_init=alias.map(lambda a: a[0] if isinstance(a, tuple) else a),
                       as_setting=alias.map(lambda a: a[1] if isinstance(a, tuple) else None))


EXACT_KEYS = ["protocol", "dataset", "as_init", "backbone", "target", "metric"]  # what a run must equal to match


def _runs_by_key(runs: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Our per-run means grouped by ``EXACT_KEYS``, so that each published cell looks up its few candidate rows
    instead of filtering every run (a report matches about a thousand cells)."""
    return dict(tuple(runs.groupby(EXACT_KEYS, sort=False)))


def _matching_runs(runs_by_key: dict[tuple, pd.DataFrame], empty: pd.DataFrame, cell,
                   backbones: Mapping[str, str]) -> pd.DataFrame:
    """Our per-run means matching a published cell (rules in the module docstring); ``empty`` when none."""
    key = (cell.protocol, cell.dataset, cell.init, backbones.get(cell.backbone, cell.backbone),
           TARGETS.get(cell.target, cell.target), cell.metric)
    runs = runs_by_key.get(key, empty)
    match = runs["as_setting"].isna() | (runs["as_setting"] == cell.setting)
    if not math.isnan(cell.label_fraction):
        match &= np.isclose(runs["label_fraction"].astype(float), cell.label_fraction)
    found = runs[match]
    if (found["as_setting"] == cell.setting).any():
        found = found[found["as_setting"] == cell.setting]
    if len(found[["init", "label_fraction"]].drop_duplicates()) > 1:
        raise ValueError(f"{cell.paper} {cell.table}, row {cell.method!r} ({cell.setting}), {cell.target} "
                         f"{cell.metric}: several of our inits or label fractions match "
                         f"({sorted(set(zip(found['init'], found['label_fraction'])))}); their runs would be pooled. "
                         "Tie one init to the row with a setting in aliases")
    return found


def _status(cell, found: pd.DataFrame, tier: str) -> str:
    if not cell.init and UNATTRIBUTED in cell.setting:
        return UNATTRIBUTED
    if not implemented(cell.init):
        return NOT_IMPLEMENTED
    if cell.metric not in METRICS:
        return NOT_MEASURED
    return NOT_RUN if found.empty else TIERS[tier]


def _reproduce(cell, found: pd.DataFrame, interval) -> dict:
    """Our number for one matched cell, in the paper's scale, with its interval and run counts."""
    factor = FACTORS[cell.scale]
    init, backbone, fraction = found[["init", "backbone", "label_fraction"]].iloc[0]
    ci = interval(cell.protocol, cell.dataset, float(fraction), TARGETS.get(cell.target, cell.target), cell.metric,
                  init, backbone)
    ours = found["value"].astype(float).mean() * factor
    low, high = ci["low"] * factor, ci["high"] * factor
    return {"ours": ours, "ci_low": low, "ci_high": high, "delta": ours - cell.value,
            "outside_ci": bool(cell.value < low or cell.value > high) if not math.isnan(low) else pd.NA,
            "n_runs": found["run_id"].nunique(), "n_seeds": found["seed"].nunique(),
            "n_subsets": found["subset"].nunique(), "n_cases": ci["n"], "our_init": init, "our_backbone": backbone}


def _case_interval(per_case: pd.DataFrame, confidence: float, n_resamples: int):
    """A cached ``(protocol, dataset, fraction, target, metric, init, backbone) -> bootstrap_ci`` over one row's
    case values."""
    values = cache(lambda protocol, dataset, fraction, target, metric: case_values(
        per_case[per_case["protocol"] == protocol], dataset, fraction, target, metric))

    def interval(protocol, dataset, fraction, target, metric, init, backbone) -> dict:
        table = values(protocol, dataset, fraction, target, metric)
        row = table[(table["init"] == init) & (table["backbone"] == backbone)]
        return bootstrap_ci(row["value"], confidence, n_resamples)
    return interval


def paper_table(per_case: pd.DataFrame, published: pd.DataFrame, paper: str, table: str, tier: str = "demo", *,
                aliases: Mapping[str, Alias] | None = None, backbones: Mapping[str, str] | None = None,
                confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """Our numbers for one published table, one line per published cell in the paper's order (module docstring:
    matching, interval, statuses). ``tier``: "demo", "mini" or "paper", the scale of the config behind ``per_case``.

    Columns: paper, table, row, column, the published key (method, init, backbone, setting, label_fraction,
    dataset, target, metric, scale), protocol (the cell's: :func:`ssl3d.report.published.protocol_of`), published,
    published_pm, ours, ci_low, ci_high, delta, outside_ci (NA without an interval), n_runs, n_seeds, n_subsets,
    n_cases, our_init, our_backbone, status, source_line, inferred (the published cell's own: the INFERENCES.md keys
    it depends on).
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {tuple(TIERS)}, got {tier!r}")
    runs = _aliased_runs(per_run_means(per_case), aliases or {})
    runs_by_key, empty = _runs_by_key(runs), runs.iloc[:0]
    interval = _case_interval(per_case, confidence, n_resamples)
    lines = []
    for cell in _published_cells(published, paper, table).itertuples(index=False):
        found = _matching_runs(runs_by_key, empty, cell, backbones or {})
        status = _status(cell, found, tier)
        numbers = _reproduce(cell, found, interval) if status == TIERS[tier] else {}
        lines.append({**cell._asdict(), "published": cell.value, "published_pm": cell.pm, **numbers,
                      "status": status})
    columns = ["paper", "table", "row", "column", *ROW_KEY, *COLUMN_KEY, "scale", "protocol", "published",
               "published_pm",
               "ours", "ci_low", "ci_high", "delta", "outside_ci", "n_runs", "n_seeds", "n_subsets", "n_cases",
               "our_init", "our_backbone", "status", "source_line", "inferred"]
    frame = pd.DataFrame(lines).reindex(columns=columns)
    counts = ["n_runs", "n_seeds", "n_subsets", "n_cases"]
    frame[counts] = frame[counts].astype("Int64")
    frame["outside_ci"] = frame["outside_ci"].astype("boolean")
    return frame.sort_values(["row", "column"], ignore_index=True)


def method_footnotes(inits) -> dict[str, str]:
    """init -> its method's description (``Method.description()``: what the method is, and for a stand-in what
    stands in: "UNetFormer-style masked volume modelling ... on MONAI's SwinUNETR."), for the registered inits."""
    known = registry.methods()
    return {init: known[init].description() for init in dict.fromkeys(inits) if init in known}


def _decimals(values: pd.Series) -> int:
    """Decimals the paper printed for one scale, at most 4, and at least 3 for fractions (a tenth of a percent):
    the CSV keeps each value as a number, so trailing zeros are lost, and the most decimals of any value stand for
    all."""
    printed = max((len(f"{v:.6g}".partition(".")[2]) for v in values.dropna()), default=0)
    return min(4, max(printed, MIN_DECIMALS.get(values.name, 0)))


def _number(value: float, decimals: int, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{decimals}f}".replace("-", "−")


def _runs_text(line) -> str:
    seeds = f"{int(line.n_seeds)} seed{'s' if line.n_seeds != 1 else ''}"
    return seeds + (f" × {int(line.n_subsets)} subsets" if line.n_subsets > 1 else "")


def _cell_text(line, decimals: int) -> str:
    published = _number(line.published, decimals) + (f" ± {_number(line.published_pm, decimals)}"
                                                      if not math.isnan(line.published_pm) else "")
    if line.status not in TIERS.values():
        return f"{published} → {line.status}"
    interval = (f" [{_number(line.ci_low, decimals)}, {_number(line.ci_high, decimals)}]"
                if not math.isnan(line.ci_low) else "")
    dagger = " †" if line.outside_ci is not pd.NA and line.outside_ci else ""
    return (f"{published} → {_number(line.ours, decimals)}{interval} "
            f"(Δ {_number(line.delta, decimals, sign=True)}, {_runs_text(line)}){dagger}")


def _column_labels(table: pd.DataFrame) -> pd.Series:
    """Per column: target, with the dataset and metric added where the table has several."""
    heads = table.drop_duplicates("column").set_index("column")
    parts = [heads[key] for key in ("dataset", "target", "metric") if key == "target" or heads[key].nunique() > 1]
    return pd.concat(parts, axis=1).astype(str).agg(" ".join, axis=1)


PAPER_TABLE_LEGEND = (
    "Cell: published (± as printed) → ours [95% bootstrap CI over test cases] (Δ = ours − published; training runs "
    "behind it); † the published value lies outside our CI. Ours is the mean over runs of each run's mean over its "
    "test cases, in the paper's scale. Other cells name why there is no number.")


def paper_table_grid(table: pd.DataFrame) -> pd.DataFrame:
    """The lines of :func:`paper_table` pivoted back into the paper's grid: the printed row keys, then one column
    per printed column, each cell ``published → ours [95% CI] (Δ, runs) †`` or the reason there is no number."""
    decimals = {scale: _decimals(values.rename(scale)) for scale, values in table.groupby("scale")["published"]}
    cells = table.assign(cell=[_cell_text(line, decimals[line.scale]) for line in table.itertuples(index=False)])
    grid = (cells.pivot(index="row", columns="column", values="cell").fillna("")  # a cell the paper left blank
            .rename(columns=_column_labels(table)))
    keys = table.drop_duplicates("row").set_index("row")[ROW_KEY].rename(columns={"label_fraction": "fraction"})
    return keys.join(grid).reset_index(drop=True)


def status_counts(table: pd.DataFrame) -> str:
    """"12 not run, 4 demo scale": how many cells of a paper table have each status."""
    return ", ".join(f"{n} {status}" for status, n in table["status"].value_counts().items())


def paper_table_markdown(table: pd.DataFrame, footnotes: Mapping[str, str] | None = None) -> str:
    """The table of :func:`paper_table` as Markdown in the paper's grid (:func:`paper_table_grid`): a legend, the
    table, and a note per method init (``footnotes``; by default :func:`method_footnotes`: what each method is,
    including what stands in for a paper without public code)."""
    footnotes = method_footnotes(table["init"]) if footnotes is None else footnotes
    lines = [f"# {table['paper'].iloc[0]} · {table['table'].iloc[0]}: published → reproduced", "",
             PAPER_TABLE_LEGEND, f"Cells: {status_counts(table)}.", "",
             paper_table_grid(table).to_markdown(index=False), ""]
    notes = [f"- `{init}`: {text}" for init, text in footnotes.items() if init in set(table["init"])]
    return "\n".join(lines + (["Methods:", "", *notes, ""] if notes else []))


# --- leaderboard ----------------------------------------------------------------------------------------------

def _run_stale(run_id: str, manifests: Mapping[str, dict]) -> bool | None:
    """Whether one fine-tuning run starts from a pre-training of an older method version; None when unknown."""
    manifest = manifests.get(run_id)
    if manifest is None:
        return None
    if manifest["config"].get("init") == SCRATCH or "released" in manifest["config"]:
        return False  # no code of ours made scratch weights or released ones
    recorded = manifest.get("transfer") or {}  # fine-tuning manifests record the checkpoint's method and version
    if recorded.get("method_version") is None:
        pretraining = manifests.get(manifest["config"].get("pretrained"))  # older runs: the pre-training manifest
        if pretraining is None or "method_version" not in pretraining:
            return None
        recorded = {"method": pretraining.get("method") or pretraining["config"].get("method"),
                    "method_version": pretraining["method_version"]}
    method = registry.methods().get(recorded["method"])
    return None if method is None else str(recorded["method_version"]) != str(method.version)


def _stale(run_ids, manifests: Mapping[str, dict] | None):
    """A row is stale when any run is (Kleene logic: NA when none is known stale and some are unknown)."""
    if manifests is None:
        return pd.NA
    return pd.array([_run_stale(run_id, manifests) for run_id in run_ids], dtype="boolean").any(skipna=False)


def _device_seconds(manifest: Mapping | None) -> float:
    """A run's recorded device-seconds; NaN where unknown (no manifest, or one written before they were recorded),
    never 0, which would read as free."""
    seconds = (manifest or {}).get("device_seconds")
    return math.nan if seconds is None else float(seconds)


def _pretraining_runs(finetuning: list[dict | None], manifests: Mapping[str, dict]) -> list[dict | None]:
    """The manifests of the pre-training runs that fine-tuning runs start from, each once; None where there is none
    of ours to read (a fine-tuning manifest missing, scratch, or a released checkpoint, pre-trained elsewhere)."""
    sources = dict.fromkeys((manifest or {}).get("config", {}).get("pretrained") for manifest in finetuning)
    return [manifests.get(source) for source in sources]


def _compute(init: str, run_ids, manifests: Mapping[str, dict] | None) -> dict:
    """One row's pre-training and total device-hours and device type (module docstring: Compute of a leaderboard
    row, which says why each pre-training run counts once)."""
    manifests = manifests or {}
    finetuning = [manifests.get(run_id) for run_id in run_ids]
    pretraining = _pretraining_runs(finetuning, manifests)
    pretrain_seconds = 0.0 if init == SCRATCH else pd.Series(list(map(_device_seconds, pretraining))).mean(skipna=False)
    finetune_seconds = pd.Series(list(map(_device_seconds, finetuning))).mean(skipna=False)
    types = {(manifest or {}).get("device_type") for manifest in finetuning + pretraining} - {None}
    return {"pretrain_device_hours": pretrain_seconds / 3600,
            "device_hours": (pretrain_seconds + finetune_seconds) / 3600,
            "device_type": types.pop() if len(types) == 1 else "mixed" if types else None}


def _comparisons(values: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each row's Holm-corrected p-values against scratch on its backbone and against the best row
    (:func:`ssl3d.analysis.stats.compare_rows`: a pair tested once, one family). Columns init, backbone,
    p_vs_scratch, p_vs_best."""
    tests = compare_rows(values, SCRATCH, metric)
    p = {} if tests.empty else {frozenset([(t.init, t.backbone), (t.other_init, t.other_backbone)]): t.p_holm
                                for t in tests.itertuples()}
    best = best_row(values, metric)
    return pd.DataFrame([{"init": init, "backbone": backbone,
                          "p_vs_scratch": p.get(frozenset([(init, backbone), (SCRATCH, backbone)]), math.nan),
                          "p_vs_best": p.get(frozenset([(init, backbone), best]), math.nan)}
                         for init, backbone in values[ROW].drop_duplicates().itertuples(index=False)])


def _intervals(values: pd.DataFrame, metric: str, confidence: float, n_resamples: int) -> pd.DataFrame:
    """Per row: mean over its case values and the bootstrap interval, as columns <metric>, <metric>_low/_high."""
    def one(group: pd.DataFrame) -> pd.Series:
        ci = bootstrap_ci(group["value"], confidence, n_resamples)
        return pd.Series({metric: ci["mean"], f"{metric}_low": ci["low"], f"{metric}_high": ci["high"],
                          f"n_cases_{metric}": ci["n"]})
    return values.groupby(ROW)[["value"]].apply(one).reset_index()


def _block(rows: pd.DataFrame, protocol: str, dataset: str, fraction: float, metrics: list[str], target: str,
           manifests: Mapping[str, dict] | None, confidence: float, n_resamples: int) -> pd.DataFrame:
    """The leaderboard lines of one protocol × dataset × label fraction: its rows are ranked and tested among
    themselves only."""
    here = rows[(rows["protocol"] == protocol) & (rows["dataset"] == dataset)
                & np.isclose(rows["label_fraction"].astype(float), fraction)]
    board = here.groupby(ROW).agg(n_runs=("run_id", "nunique"), n_seeds=("seed", "nunique"),
                                  n_subsets=("subset", "nunique"), run_ids=("run_id", "unique")).reset_index()
    primary = metrics[0]
    for metric in [m for m in metrics if m in set(here["metric"])]:
        values = case_values(here, dataset, fraction, target, metric)
        board = board.merge(_intervals(values, metric, confidence, n_resamples), on=ROW, how="left")
        if metric == primary:
            board = board.merge(_comparisons(values, metric), on=ROW, how="left")
    board["rank"] = board[primary].rank(ascending=primary in LOWER_IS_BETTER, method="min").astype("Int64")
    run_ids = board.pop("run_ids")
    board = board.join(pd.DataFrame([_compute(init, ids, manifests) for init, ids in zip(board["init"], run_ids)],
                                    index=board.index))
    board["stale"] = pd.array([_stale(ids, manifests) for ids in run_ids], dtype="boolean")
    return (board.assign(protocol=protocol, dataset=dataset, label_fraction=fraction)
            .sort_values(["rank", *ROW], ignore_index=True))


def leaderboard(per_case: pd.DataFrame, manifests: Mapping[str, dict] | None = None, metric_primary: str = "dice",
                *, protocol: str | None = None, target: str = "mean", confidence: float = CONFIDENCE,
                n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """Every (init, backbone) ranked within each protocol × dataset × label fraction (module docstring): one
    leaderboard per protocol of the table (``protocol``: that one only), never ranking or testing rows of two
    protocols together.

    ``manifests``: run id -> manifest, of the fine-tuning runs and of the pre-training runs they start from (for
    ``stale`` and compute; None: both unknown). Columns: protocol, dataset, label_fraction, rank (1 = best
    ``metric_primary``; ties share the lower rank), init, backbone, n_runs, n_seeds, n_subsets, then per metric (the
    primary, Dice and HD95, those present) its case-bootstrap mean, _low, _high and n_cases_, p_vs_scratch,
    p_vs_best (Holm; primary metric), pretrain_device_hours, device_hours, device_type (module docstring: Compute of
    a leaderboard row), stale. ``attrs`` records metric_primary, protocols, target and confidence for the Markdown
    legend.
    """
    rows = per_case if protocol is None else per_case[per_case["protocol"] == protocol]
    if rows.empty:
        raise ValueError(f"no per-case rows of protocol {protocol!r}" if protocol else "no per-case rows")
    metrics = list(dict.fromkeys([metric_primary, *LEADERBOARD_METRICS]))
    if metric_primary not in set(rows["metric"]):
        raise ValueError(f"no {metric_primary} rows to rank by")
    blocks = rows[BLOCK].drop_duplicates().sort_values(BLOCK)
    board = pd.concat([_block(rows, protocol, dataset, float(fraction), metrics, target, manifests, confidence,
                              n_resamples) for protocol, dataset, fraction in blocks.itertuples(index=False)],
                      ignore_index=True)
    first = [*BLOCK, "rank", *ROW, "n_runs", "n_seeds", "n_subsets"]
    board = board[first + [c for c in board.columns if c not in first + ["stale"]] + ["stale"]]
    board.attrs = {"metric_primary": metric_primary, "protocols": list(blocks["protocol"].unique()),
                   "target": target, "confidence": confidence}
    return board


def _interval_text(line: pd.Series, metric: str) -> str:
    decimals = 2 if metric in LOWER_IS_BETTER else 3
    if math.isnan(line[metric]):
        return "–"
    interval = (f" [{line[f'{metric}_low']:.{decimals}f}, {line[f'{metric}_high']:.{decimals}f}]"
                if not math.isnan(line[f"{metric}_low"]) else "")
    return f"{line[metric]:.{decimals}f}{interval}"


def _hours_text(hours: float) -> str:
    """Device-hours with three significant digits (a demo run's 0.00417 h is not 0.00), whole hours from 1000."""
    if math.isnan(hours):
        return "–"
    return f"{hours:,.0f}" if hours >= 1000 else f"{hours:.3g}"


def leaderboard_legend(board: pd.DataFrame) -> str:
    """What the leaderboard's columns mean, from the settings it was ranked under (``board.attrs``)."""
    attrs = {"metric_primary": "dice", "protocols": list(board["protocol"].unique()), "target": "mean",
             "confidence": CONFIDENCE, **board.attrs}
    primary = METRIC_TITLES.get(attrs["metric_primary"])
    target = "the mean over targets" if attrs["target"] == "mean" else attrs["target"]
    protocols = ", ".join(f"`{protocol}`" for protocol in attrs["protocols"])
    return (f"One leaderboard per protocol ({protocols}): rows are ranked and tested within a protocol, dataset and "
            f"label fraction, never across protocols. {target.capitalize()}; ranked by {primary} (1 = best). Values: "
            f"mean over test cases (each averaged over the row's runs) [{attrs['confidence']:.0%} BCa bootstrap CI "
            f"over cases]. p: paired "
            f"Wilcoxon signed-rank on the cases ({primary}), Holm-corrected within each table, against scratch on "
            "the same backbone and against the best row; – where not tested (no scratch on that backbone, or fewer "
            f"than {MIN_PAIRS} cases whose values differ: the test could not reach 0.05). GPU-hours (CPU-hours for "
            "runs on CPU, device-hours for a mix): what one result of the row cost, the mean over its pre-training "
            "runs (each counted once, however many fine-tuning runs start from it; 0 for scratch) plus the mean "
            "over its fine-tuning runs, of the training loop's wall time × the devices it ran on, from the "
            "manifests; – where a run did not record it (an older manifest, a released checkpoint). Stale: "
            "pre-trained with an older version of its method (? unknown).")


def leaderboard_blocks(board: pd.DataFrame, titles: Mapping[str, str] | None = None
                       ) -> list[tuple[str, str, pd.DataFrame]]:
    """The leaderboard as display tables, one per protocol × dataset × label fraction: (protocol, title, table of
    text cells). Methods are shown by their display names (``titles``: init -> name; :func:`init_titles` by
    default)."""
    primary = board.attrs.get("metric_primary", "dice")
    metrics = [m for m in dict.fromkeys([primary, *LEADERBOARD_METRICS]) if m in board.columns]
    titles = init_titles(board["init"]) if titles is None else titles
    blocks = []
    for (protocol, dataset, fraction), block in board.groupby(BLOCK, sort=False):
        blocks.append((protocol, f"{dataset} · label fraction {fraction:g}", pd.DataFrame({
            "rank": block["rank"], "method": block["init"].map(lambda init: titles.get(init, init)),
            "backbone": block["backbone"],
            **{METRIC_TITLES.get(m, m): [_interval_text(line, m) for _, line in block.iterrows()] for m in metrics},
            "p vs scratch": block["p_vs_scratch"].map(format_p), "p vs best": block["p_vs_best"].map(format_p),
            "runs": block["n_runs"], hours_title(block["device_type"]): block["device_hours"].map(_hours_text),
            "stale": block["stale"].map(lambda s: "?" if s is pd.NA else "stale" if s else "")})))
    return blocks


def leaderboard_markdown(board: pd.DataFrame, titles: Mapping[str, str] | None = None) -> str:
    """The leaderboard as Markdown: a legend, then per protocol one ranked table per dataset × label fraction."""
    lines = ["# Leaderboard", "", leaderboard_legend(board), ""]
    shown = None
    for protocol, title, table in leaderboard_blocks(board, titles):
        if protocol != shown:
            lines += [f"## Protocol `{protocol}`", ""]
            shown = protocol
        lines += [f"### {title}", "", table.to_markdown(index=False), ""]
    return "\n".join(lines)

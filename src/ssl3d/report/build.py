"""One HTML report per experiment, rebuilt from the results already on disk: nothing is trained. Beyond tables and
statistics, the only computation is inference on one test case per row for the qualitative figure.

A static page built by the suite rather than Snakemake's ``--report``: a reader needs each paper table in its own
layout, the leaderboard ranked per dataset and a caption under every figure, which Snakemake's report shows as a
list of attachments. The page's folder is still a ``report()`` output of the workflow's ``report`` rule, so
``snakemake --report report.zip`` carries it beside Snakemake's runtime statistics.

``reports/<experiment>/`` holds:

* ``index.html``: the page (the jinja2 template ``templates/report.html.j2``), linking everything below.
* ``figures/<name>.png`` and ``.svg``: every figure of :mod:`ssl3d.report.figures`.
* ``tables/``: ``summary``, ``leaderboard`` (one per protocol, in one table with a protocol column),
  ``paper_tables`` (every published cell with ours beside it), ``reproduction_status``,
  ``significance_<dataset>_<fraction>``, ``friedman``, ``methods``, ``runs``, the experiment's settings
  (``experiment_finetune``, ``experiment_pretrain``: :func:`experiment_settings`) and, where the repository holds
  comparisons of its methods' steps with the official code's, ``official_speed``, as CSV, and the Markdown renderings
  of the summary, the leaderboard and each paper table. The files of a protocol other than ``finetune`` name it
  after their kind (``significance_probe_<dataset>_<fraction>``, ``label_efficiency_probe_<dataset>``).
* ``manifests/<stage>/<run>.json``: the manifest of every run behind the numbers.

What the report knows of methods comes from the registry (``ssl3d.pretrain.registry``): display names for tables and
legends, the Methods section (description, paper, version), and the method-specific figures each method of the
experiment declares (``Method.figures``, drawn by :data:`ssl3d.report.figures.METHOD_FIGURES`). Rows of different
protocols are never ranked, tested or drawn together: every table, test and figure is per protocol.

Which runs: the fine-tuning runs of the per-case table (a results folder also keeps runs of earlier configs, which
the table no longer holds) and the pre-training runs they start from. The folder is built beside its destination
and renamed into place, so an interrupted build leaves the previous report whole.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from ssl3d import __version__
from ssl3d.analysis.aggregate import METRIC_TITLES, SUMMARY_LEGEND, read_per_case, summarise, summary_blocks
from ssl3d.analysis.stats import LOWER_IS_BETTER, SCRATCH, case_values, friedman_nemenyi, significance_matrix
from ssl3d.data.registry import load_registry
from ssl3d.io import read_json, write_text
from ssl3d.pretrain import registry
from ssl3d.pretrain.released import released_checkpoints
from ssl3d.report import figures, official_speed, tables
from ssl3d.report.published import load_published, published_tables

log = logging.getLogger(__name__)

__all__ = ["ExperimentResults", "ReportOptions", "build_report", "experiment_settings", "read_results",
           "reproduction_status", "run_table"]

STAGES = ("pretrain", "finetune")
TEMPLATE = "report.html.j2"
RUN_TIMES = ("loop_seconds: the training loop's wall time (every session of a resumed run, validation included), "
             "from the manifest; steps_per_second is its rate; device_seconds is it × the devices the run trained "
             "on, what the leaderboard's hours add up (– for a manifest written before it was recorded). "
             "job_seconds: the whole Snakemake job (start-up, reading the data, the loop, writing the outputs and, "
             "for fine-tuning, evaluating on the test cases; the last attempt of a resumed run), from the run's "
             "benchmark file; – for a run made outside the workflow.")


@dataclass(frozen=True)
class ReportOptions:
    """The experiment config's ``report`` block (schema: ``workflow/schemas/config.schema.yaml``).

    ``tier``: the scale the paper tables call our numbers (demo, mini or paper). ``aliases``: our init -> the
    published init, or -> [init, setting]; ``backbones``: published backbone -> ours (the stand-in);
    both as :func:`ssl3d.report.tables.paper_table` reads them. ``n_resamples``: bootstrap resamples per interval.
    """
    tier: str = "demo"
    aliases: Mapping[str, str | list[str]] = field(default_factory=dict)
    backbones: Mapping[str, str] = field(default_factory=dict)
    n_resamples: int = tables.N_RESAMPLES

    @classmethod
    def from_config(cls, block: Mapping | None, **overrides) -> ReportOptions:
        unknown = set(block or {}) - {"tier", "aliases", "backbones"}
        if unknown:
            raise ValueError(f"report: unknown key(s) {sorted(unknown)}; allowed: tier, aliases, backbones")
        options = cls(**(block or {}), **overrides)
        if options.tier not in tables.TIERS:
            raise ValueError(f"report.tier must be one of {sorted(tables.TIERS)}, got {options.tier!r}")
        return options

    def paper_aliases(self) -> dict[str, str | tuple[str, str]]:
        return {init: tuple(alias) if isinstance(alias, list) else alias for init, alias in self.aliases.items()}


@dataclass
class ExperimentResults:
    """What an experiment left on disk: the per-case table and, per run (``<stage>/<run name>``), its folder,
    manifest and step or training log; ``caches``: where a preprocessed dataset that a run config names is, where
    that is not the path it names (the workflow's local copies on a cluster without a shared file system)."""
    name: str
    per_case: pd.DataFrame
    run_dirs: dict[str, Path]
    manifests: dict[str, dict]
    step_logs: dict[str, pd.DataFrame]
    train_logs: dict[str, pd.DataFrame]
    skipped: dict[str, str]
    caches: Mapping[str, str] = field(default_factory=dict)

    def by_run_id(self) -> dict[str, dict]:
        return {manifest["run_id"]: manifest for manifest in self.manifests.values()}

    def runs_of(self, stage: str) -> list[str]:
        return [run for run in self.run_dirs if run.startswith(f"{stage}/")]

    def method_of(self) -> dict[str, str]:
        """Pre-training entry (the init fine-tuning runs name) -> its method, from the pre-training manifests; a
        released checkpoint the runs start from -> the method it was trained with (``released.yaml``)."""
        released = {init: released_checkpoints()[init].method for init in self.per_case["init"].unique()
                    if init in released_checkpoints()}
        return released | {m["config"].get("variant", m["config"]["method"]): m["config"]["method"]
                           for run, m in self.manifests.items()
                           if run.startswith("pretrain/") and "method" in m["config"]}

    def methods(self) -> list[str]:
        """The registered methods of the experiment: pre-trained by its runs, or named as an init."""
        found = [*self.method_of().values(), *self.per_case["init"]]
        return [name for name in dict.fromkeys(found) if name in registry.methods()]

    def titles(self) -> dict[str, str]:
        """init (and method) -> its display name in tables and legends."""
        return tables.init_titles([SCRATCH, *self.per_case["init"], *self.method_of(), *self.methods()],
                                  self.method_of())


def read_results(results_dir: str | Path, caches: Mapping[str, str] | None = None) -> ExperimentResults:
    """The results of ``results/<experiment>``: ``per_case.csv``, and the manifests and logs of the runs behind it
    (module docstring). A run of the table without its manifest raises ``FileNotFoundError`` naming the folder."""
    results_dir = Path(results_dir)
    per_case = read_per_case(results_dir / "per_case.csv")
    wanted = set(per_case["run_id"].astype(str))
    finetune = {path.parent: read_json(path) for path in sorted(results_dir.glob("finetune/*/manifest.json"))}
    finetune = {folder: m for folder, m in finetune.items() if m["run_id"] in wanted}
    missing = wanted - {m["run_id"] for m in finetune.values()}
    if missing:
        raise FileNotFoundError(f"{results_dir}/finetune: no manifest for run(s) {sorted(missing)} of per_case.csv; "
                                "re-run the workflow (snakemake) to finish them")
    pretrained = {m["config"].get("pretrained") for m in finetune.values()} - {None}
    pretrain = {path.parent: read_json(path) for path in sorted(results_dir.glob("pretrain/*/manifest.json"))}
    pretrain = {folder: m for folder, m in pretrain.items() if m["run_id"] in pretrained}
    run_dirs, manifests, step_logs, train_logs = {}, {}, {}, {}
    for stage, found, log_name, logs in (("pretrain", pretrain, "step_log.csv", step_logs),
                                          ("finetune", finetune, "train_log.csv", train_logs)):
        for folder, manifest in found.items():
            run = f"{stage}/{folder.name}"
            run_dirs[run], manifests[run] = folder, manifest
            if (folder / log_name).is_file():
                logs[run] = pd.read_csv(folder / log_name)
    skipped_file = results_dir / "skipped.json"
    skipped = read_json(skipped_file) if skipped_file.is_file() else {}
    return ExperimentResults(results_dir.name, per_case, run_dirs, manifests, step_logs, train_logs, skipped,
                             dict(caches or {}))


# --- tables ---------------------------------------------------------------------------------------------------

def _job_seconds(folder: Path) -> float | None:
    """The wall time of the run's whole Snakemake job, from its benchmark file (``<rule>.benchmark.tsv``: start-up,
    reading the data, the training loop, writing the outputs; the last attempt of a resumed run); None for a run
    made outside the workflow."""
    files = sorted(folder.glob("*.benchmark.tsv"))
    return float(pd.read_csv(files[0], sep="\t")["s"].mean()) if files else None


def run_table(results: ExperimentResults) -> pd.DataFrame:
    """One line per run: what it is (stage, init or method, backbone, dataset, label fraction, seed), its identity
    (config hash, code version, git commit) and where and how fast it ran (device, versions, time, memory). Two
    times, as :data:`RUN_TIMES` says: the training loop's (the manifest's) and the whole job's (Snakemake's)."""
    lines = []
    for run, manifest in results.manifests.items():
        config, packages = manifest["config"], manifest.get("packages", {})
        stage, name = run.split("/", 1)
        lines.append({
            "stage": stage, "run": name,
            "init": config.get("init") or config.get("variant") or config.get("method"),
            "backbone": config["backbone"]["name"],
            "dataset": config.get("dataset") or "+".join(member["dataset"] for member in config.get("pool", [])),
            "label_fraction": config.get("label_fraction"), "seed": manifest.get("seed"),
            "config_hash": manifest["config_hash"], "code_version": manifest.get("code_version"),
            "git_commit": (manifest.get("git_commit") or "")[:10] or None, "device": manifest.get("device"),
            "precision": manifest.get("precision"),
            "torch": packages.get("torch"), "monai": packages.get("monai"), "python": manifest.get("python"),
            "steps": manifest.get("steps"), "loop_seconds": manifest.get("wall_seconds"),
            "device_seconds": manifest.get("device_seconds"), "job_seconds": _job_seconds(results.run_dirs[run]),
            "steps_per_second": manifest.get("steps_per_second"),
            "peak_memory_mb": manifest.get("peak_memory_mb")})
    return pd.DataFrame(lines)


def _shown(value) -> str:
    """A config value as the page shows it: a shape as 32×32×16, a number without trailing zeros."""
    if isinstance(value, list) and all(isinstance(item, int) for item in value):
        return "×".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _distinct(lines: list[dict]) -> dict[str, str]:
    """Per key of the runs' lines, its distinct values (numbers sorted) as one text: one value is the whole story,
    several mean the runs differ."""
    found: dict[str, list] = {}
    for line in lines:
        for key, value in line.items():
            if value is not None:
                found.setdefault(key, []).append(value)
    numbers = {key for key, values in found.items() if all(isinstance(value, (int, float)) for value in values)}
    return {key: ", ".join(dict.fromkeys(map(_shown, sorted(values) if key in numbers else values)))
            for key, values in found.items()}


def _data_source(spec: Mapping) -> str:
    """A dataset of a run's config with where it comes from (the registry's title, your folder, phantoms), its
    committed split if any and its preprocessing recipe."""
    data, name = spec.get("data", {}), spec["dataset"]
    source = data.get("source")
    if source == "registry" and name in load_registry():
        source = f"registry: {load_registry()[name].title}"
    elif source == "folder":
        source = f"your folder {data.get('images')}"
    elif source == "phantom":
        source = "synthetic phantoms"
    details = [text for text in (source, data.get("split") and f"split {data['split']}",
                                 spec.get("recipe") and f"recipe {spec['recipe']}") if text]
    return f"{name} ({', '.join(details)})" if details else name


def _backbone(spec: Mapping) -> str:
    """A backbone of a run's config with its settings: two UNets of different widths are two backbones."""
    settings = ", ".join(f"{key} {_shown(value)}" for key, value in spec.items() if key != "name")
    return f"{spec['name']} ({settings})" if settings else spec["name"]


def experiment_settings(results: ExperimentResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the experiment ran, from its runs' manifests (each run's resolved config, so the page describes the runs
    behind its numbers even where the config file has changed since): the fine-tuning grid as (setting, value)
    lines, and one line per pre-training entry. Where runs differ (a per-init override) a setting lists every
    value."""
    finetune = [results.manifests[run]["config"] for run in results.runs_of("finetune")]
    grid = _distinct([{"datasets": _data_source(config), "protocols": config.get("protocol", "finetune"),
                       "backbones": _backbone(config["backbone"]), "label fractions": config.get("label_fraction"),
                       "subset draws": config.get("splits", {}).get("subsets"), "seeds": config.get("seed"),
                       "steps": config.get("steps"), "batch size": config.get("batch_size"),
                       "patch size": config.get("patch_size")} for config in finetune])
    entries: dict[str, list[dict]] = {}
    for run in results.runs_of("pretrain"):
        manifest = results.manifests[run]
        config = manifest["config"]
        settings = manifest.get("method_config") or config.get("method_config") or {}  # resolved, else overrides
        entries.setdefault(config.get("variant", config["method"]), []).append({
            "method": config["method"], "backbone": _backbone(config["backbone"]),
            "datasets": "; ".join(_data_source(member) for member in config.get("pool", []))
            + (" (task-specific: its split's training cases)" if "pool_split" in config else ""),
            "seeds": config.get("seed"), "steps": config.get("steps"), "batch size": settings.get("batch_size"),
            "patch size": settings.get("patch_size")})
    return (pd.DataFrame(list(grid.items()), columns=["setting", "value"]),
            pd.DataFrame([{"entry": entry, **_distinct(lines)} for entry, lines in entries.items()]))


def reproduction_status(cells: pd.DataFrame) -> pd.DataFrame:
    """Paper × table: how many published cells have each status (not run, demo / mini / paper scale, method not
    implemented, components not recoverable, metric not measured) and, of those we have numbers for, how many
    published values lie inside and outside our 95 % interval."""
    statuses = [tables.NOT_RUN, *tables.TIERS.values(), tables.NOT_IMPLEMENTED, tables.UNATTRIBUTED,
                tables.NOT_MEASURED]
    counts = pd.crosstab([cells["paper"], cells["table"]], cells["status"]).reindex(columns=statuses, fill_value=0)
    with_ci = cells[cells["outside_ci"].notna()]
    ci = pd.crosstab([with_ci["paper"], with_ci["table"]], with_ci["outside_ci"].astype(bool))
    counts["inside CI"] = ci.get(False, pd.Series(dtype=int)).reindex(counts.index, fill_value=0)
    counts["outside CI"] = ci.get(True, pd.Series(dtype=int)).reindex(counts.index, fill_value=0)
    counts = counts.loc[:, (counts != 0).any() | counts.columns.isin([tables.NOT_RUN, "inside CI", "outside CI"])]
    return (counts.reindex([pair for pair in published_tables() if pair in counts.index]).reset_index()
            .rename_axis(columns=None))  # crosstab names the columns "status": a blank column on the page


def _friedman_scores(board: pd.DataFrame, titles: Mapping[str, str]) -> pd.DataFrame:
    """Blocks (dataset × label fraction) × rows (``name (backbone)``) of the leaderboard's primary metric, keeping
    the rows every block has (the Friedman test needs complete blocks). Pass one protocol's leaderboard."""
    primary = board.attrs.get("metric_primary", "dice")
    labelled = board.assign(row=[f"{titles.get(init, init)} ({backbone})"
                                 for init, backbone in zip(board["init"], board["backbone"])])
    scores = labelled.pivot_table(index=["dataset", "label_fraction"], columns="row", values=primary)
    return scores.dropna(axis=1)


# --- figures --------------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """A figure of the page: its section, title, files (relative to the report) and caption."""
    section: str
    title: str
    png: str
    svg: str
    caption: str


def _colours(results: ExperimentResults) -> dict[str, str]:
    """One colour per init for every figure: scratch first, then the inits in the order the table has them, then
    pre-training entries and methods that no fine-tuning run names (pre-training figures show them)."""
    method_of = results.method_of()
    return figures.init_colours([SCRATCH, *results.per_case["init"], *method_of, *method_of.values()])


def _slug(*parts) -> str:
    return "_".join(str(part).replace(".", "p").replace(" ", "_").replace("/", "_") for part in parts)


def _stem(kind: str, protocol: str, *parts) -> str:
    """The file stem of one protocol's figure or table: named like run names (``ssl3d.plan.finetune_runs``), with
    the protocol only where it is not whole-network fine-tuning."""
    return _slug(kind, *([] if protocol == "finetune" else [protocol]), *parts)


def _representative_case(per_case: pd.DataFrame, dataset: str, fraction: float) -> str:
    """The test case whose Dice, averaged over every row, is the median one: neither the easiest nor the hardest."""
    values = case_values(per_case, dataset, fraction, "mean", "dice").groupby("case_id")["value"].mean()
    return str(values.sort_values().index[(len(values) - 1) // 2])


def _qualitative(results: ExperimentResults, protocol: str, dataset: str, out: Path, colours: Mapping[str, str],
                 titles: Mapping[str, str]):
    """Predictions of one representative test case by the first run (lowest subset, seed) of each row of one
    protocol, at the dataset's largest label fraction."""
    import torch

    from ssl3d.data.cache import load_cached_case, read_index
    from ssl3d.evaluate.run import load_model
    from ssl3d.nets import predict_volume

    rows = results.per_case[(results.per_case["dataset"] == dataset) & (results.per_case["protocol"] == protocol)]
    fraction = float(rows["label_fraction"].max())
    rows = rows[np.isclose(rows["label_fraction"].astype(float), fraction)]
    case_id = _representative_case(rows, dataset, fraction)
    first_runs = rows.sort_values(["subset", "seed"]).drop_duplicates(["init", "backbone"])
    folders = {m["run_id"]: results.run_dirs[run] for run, m in results.manifests.items() if run.startswith("finetune/")}
    several = first_runs["backbone"].nunique() > 1
    predictions, panel_colours, case, classes = {}, {}, None, {}
    for line in first_runs.itertuples():
        folder = folders[line.run_id]
        model, checkpoint = load_model(folder / "model.pt", torch.device("cpu"))
        inputs, inference = read_json(folder / "config.json")["inputs"], checkpoint["spec"]["inference"]
        if case is None:
            index = read_index(results.caches.get(inputs["cache"], inputs["cache"]))
            case = load_cached_case(index["dir"] / index["cases"][case_id]["file"])
        name = f"{titles[line.init]} ({line.backbone})" if several else titles[line.init]
        predictions[name] = predict_volume(model, case["image"], inference["roi_size"], inference["overlap"],
                                           inference["sw_batch_size"], torch.device("cpu"))
        panel_colours[name], classes = colours[line.init], checkpoint["classes"]
    files = figures.qualitative_slices(case["image"], case["label"], predictions, classes, out, colours=panel_colours)
    return files, f"{protocol} · {dataset}: case {case_id}, label fraction {fraction:g}"


def _warmup(step_logs: Mapping[str, pd.DataFrame]) -> int:
    """The figures' warm-up, shortened for runs too short to keep any step after it (a smoke-test config)."""
    return min(figures.WARMUP_STEPS, min(len(log) for log in step_logs.values()) // 2)


def _titled(label: str, titles: Mapping[str, str]) -> str:
    """A row label of :func:`ssl3d.analysis.stats.significance_matrix` (``init`` or ``init (backbone)``) with the
    init's display name."""
    init, _, backbone = label.partition(" (")
    return titles.get(init, init) + (f" ({backbone}" if backbone else "")


def _method_figures(results: ExperimentResults, inputs: figures.FigureInputs, out: Path, add) -> None:
    """The figures each method of the experiment declares (``Method.figures``), where the experiment has their
    data; a name the figure registry lacks is an error naming the method."""
    known = registry.methods()
    for method in results.methods():
        for name in known[method].figures:
            if name not in figures.METHOD_FIGURES:
                raise ValueError(f"method {method!r} declares figure {name!r}; report figures: "
                                 f"{', '.join(figures.METHOD_FIGURES)}")
            figure = figures.METHOD_FIGURES[name]
            files = figure.draw(method, inputs, out / _slug(method, name))
            if files is not None:
                add(figure.section, figure.title.format(method=inputs.titles.get(method, method)), files)


def _significance(per_case: pd.DataFrame, board: pd.DataFrame, out: Path, titles: Mapping[str, str], add) -> dict:
    """Per protocol: the pairwise matrix of each dataset × label fraction, and the Friedman test across them
    (protocol -> its result, where there are enough blocks and rows)."""
    friedman = {}
    for (protocol, dataset, fraction), block in board.groupby(tables.BLOCK, sort=False):
        if len(block) < 2:
            continue
        stem = _stem("significance", protocol, dataset, f"{fraction:g}")
        matrix = significance_matrix(per_case[per_case["protocol"] == protocol], dataset, fraction)
        matrix.to_csv(out.parent / "tables" / f"{stem}.csv")
        if matrix.notna().any().any():  # else no pair could be tested (the leaderboard's legend says why)
            labels = {label: _titled(label, titles) for label in matrix.index}
            add("Significance", f"{protocol} · {dataset} · label fraction {fraction:g}",
                figures.significance_heatmap(matrix.rename(index=labels, columns=labels), out=out / stem))
    for protocol, one in board.groupby("protocol", sort=False):
        scores = _friedman_scores(one, titles)
        if scores.shape[0] >= 2 and scores.shape[1] >= 3:
            friedman[protocol] = friedman_nemenyi(scores, higher_is_better=board.attrs.get("metric_primary", "dice")
                                                  not in LOWER_IS_BETTER)
            add("Significance", f"{protocol} · across datasets and label fractions",
                figures.critical_difference(friedman[protocol], out=out / _stem("critical_difference", protocol)))
    return friedman


def _compute_figures(results: ExperimentResults, board: pd.DataFrame, out: Path, colours: Mapping[str, str],
                     titles: Mapping[str, str], add) -> None:
    """Per protocol × dataset, the primary metric against pre-training compute, where pre-training runs recorded
    their compute; the caption names the devices they ran on."""
    metric = board.attrs.get("metric_primary", "dice")
    devices = [results.manifests[run].get("device", "unknown device") for run in results.runs_of("pretrain")]
    for protocol, dataset in board[["protocol", "dataset"]].drop_duplicates().itertuples(index=False):
        files = figures.metric_against_compute(board, dataset, metric, out / _stem("compute", protocol, dataset),
                                               protocol=protocol, devices=devices, colours=colours, titles=titles)
        if files is not None:
            add("Pre-training cost", f"{METRIC_TITLES.get(metric, metric)} against pre-training compute · "
                f"{protocol} · {dataset}", files)


def _figures(results: ExperimentResults, board: pd.DataFrame, out: Path, n_resamples: int
             ) -> tuple[list[Figure], dict]:
    """Every figure the results allow, each of one protocol, with the Friedman result per protocol."""
    out.mkdir(parents=True, exist_ok=True)
    colours, titles = _colours(results), results.titles()
    per_case = results.per_case
    made: list[Figure] = []

    def add(section: str, title: str, files: figures.FigureFiles) -> None:
        made.append(Figure(section, title, f"figures/{files.png.name}", f"figures/{files.svg.name}",
                           files.caption))

    settings = per_case[["protocol", "dataset"]].drop_duplicates()
    for protocol, dataset in settings.itertuples(index=False):
        add("Label efficiency", f"{protocol} · {dataset}", figures.label_efficiency(
            per_case, dataset, protocol=protocol, out=out / _stem("label_efficiency", protocol, dataset),
            colours=colours, titles=titles, n_resamples=n_resamples))
    friedman = _significance(per_case, board, out, titles, add)
    if results.step_logs:
        warmup = _warmup(results.step_logs)
        step_manifests = {run: results.manifests[run] for run in results.step_logs}
        add("Pre-training cost", "time and memory per step", figures.pretrain_step_times(
            results.step_logs, step_manifests, out=out / "pretrain_step_times", colours=colours, titles=titles,
            warmup=warmup))
        inputs = figures.FigureInputs(per_case, results.manifests, results.step_logs, warmup, colours, titles)
        _method_figures(results, inputs, out, add)
    _compute_figures(results, board, out, colours, titles, add)
    logs = pd.DataFrame([{"run": run, "protocol": m["config"].get("protocol", "finetune"),
                          "dataset": m["config"]["dataset"], "fraction": m["config"]["label_fraction"]}
                         for run, m in results.manifests.items() if run in results.train_logs])
    for (protocol, dataset, fraction), runs in (logs.groupby(["protocol", "dataset", "fraction"], sort=False)
                                                if len(logs) else []):
        add("Training curves", f"{protocol} · {dataset} · label fraction {fraction:g}", figures.training_curves(
            {run: results.train_logs[run] for run in runs["run"]}, results.manifests,
            out=out / _stem("training_curves", protocol, dataset, f"{fraction:g}"), colours=colours, titles=titles))
    for protocol, dataset in settings.itertuples(index=False):
        files, title = _qualitative(results, protocol, dataset, out / _stem("qualitative", protocol, dataset),
                                    colours, titles)
        add("Qualitative", title, files)
    return made, friedman


# --- the page -------------------------------------------------------------------------------------------------

def _html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="–", classes="data", escape=True)


def _applies(cells: pd.DataFrame, datasets) -> pd.Series:
    """(paper, table) -> whether any of its cells is on a dataset of the experiment: only those cells can ever have a
    number of ours (a cell matches runs of its own dataset only)."""
    return cells.groupby(["paper", "table"], sort=False)["dataset"].agg(lambda names: names.isin(datasets).any())


def _folded_summary(applies: pd.Series, datasets) -> str:
    """The one line that stands for the paper tables folded away, those on datasets the experiment does not run
    (every table, for an experiment of your own data): pages of "not run" would bury the tables that apply."""
    n = int((~applies).sum())
    return (f"{n} of {len(applies)} published tables are on datasets this experiment does not run (it runs "
            f"{', '.join(sorted(datasets))}): none of their cells can have a number of ours" if n else "")


def _paper_sections(cells: pd.DataFrame, applies: pd.Series) -> list[dict]:
    """Per published table: its grid, the counts of cell statuses, whether it applies (:func:`_applies`) and whether
    any cell has our number (a table with none is folded on the page)."""
    sections = []
    for (paper, table), lines in cells.groupby(["paper", "table"], sort=False):
        sections.append({"paper": paper, "table": table, "grid": _html(tables.paper_table_grid(lines)),
                         "counts": tables.status_counts(lines), "applies": applies[paper, table],
                         "has_numbers": lines["ours"].notna().any(),
                         "markdown": f"tables/{_slug('paper', paper, table)}.md",
                         "notes": tables.method_footnotes(lines["init"])})
    return sections


def _leaderboard_sections(board: pd.DataFrame, titles: Mapping[str, str]) -> list[tuple[str, list]]:
    """The leaderboard for the page: per protocol, its (title, table) per dataset × label fraction."""
    sections: dict[str, list] = {}
    for protocol, title, block in tables.leaderboard_blocks(board, titles):
        sections.setdefault(protocol, []).append((title, _html(block)))
    return list(sections.items())


def _records(runs: pd.DataFrame) -> list[dict]:
    """The run table's lines for the page, NaN as None, each with the path of its manifest in the report."""
    lines = runs.astype(object).where(runs.notna(), None).to_dict("records")
    return [{**line, "manifest": f"manifests/{line['stage']}/{line['run']}.json"} for line in lines]


def _write_tables(folder: Path, named: Mapping[str, pd.DataFrame]) -> None:
    for name, frame in named.items():
        frame.to_csv(folder / f"{name}.csv", index=False)


def _environment(runs: pd.DataFrame) -> dict[str, str]:
    """Each provenance column's distinct values across runs: one value is the whole story, several a warning; a
    column no run records is left out (an empty line would read as a value)."""
    return {column: ", ".join(sorted(map(str, runs[column].dropna().unique())))
            for column in ("git_commit", "code_version", "device", "torch", "monai", "python")
            if column in runs and runs[column].notna().any()}


def build_report(results_dir: str | Path, out_dir: str | Path, options: ReportOptions | None = None,
                 caches: Mapping[str, str] | None = None, comparisons: Sequence[str | Path] = ()) -> Path:
    """Build ``out_dir`` (``reports/<experiment>``) from ``results_dir`` (``results/<experiment>``); returns the
    path of ``index.html``. Progress is logged per stage. ``caches``: as :class:`ExperimentResults`';
    ``comparisons``: files of ``benchmarks/official_compare.py`` (``ssl3d.report.official_speed``)."""
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()

    def progress(message: str) -> None:
        log.info("report %s: %s (%.1f s)", out_dir.name, message, time.perf_counter() - started)

    results = read_results(results_dir, caches)
    progress(f"read {len(results.per_case)} per-case rows of {len(results.manifests)} runs")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        table_dir = build / "tables"
        table_dir.mkdir()
        summary = summarise(results.per_case)
        titles = results.titles()
        titled_summary = summary.assign(init=summary["init"].map(lambda init: titles.get(init, init)))
        method_list = tables.methods_table(results.per_case["init"], results.method_of())
        board = tables.leaderboard(results.per_case, results.by_run_id(), n_resamples=options.n_resamples)
        progress("leaderboard")
        published = load_published()
        cells = pd.concat([tables.paper_table(results.per_case, published, paper, table, options.tier,
                                              aliases=options.paper_aliases(), backbones=options.backbones,
                                              n_resamples=options.n_resamples)
                           for paper, table in published_tables()], ignore_index=True)
        progress(f"{cells[['paper', 'table']].drop_duplicates().shape[0]} paper tables")
        status = reproduction_status(cells)
        datasets = set(results.per_case["dataset"])
        applies = _applies(cells, datasets)
        shown = np.array([applies[pair] for pair in zip(status["paper"], status["table"])], dtype=bool)
        grid, pretraining = experiment_settings(results)
        runs = run_table(results)
        speed = official_speed.comparison_table(comparisons, results.methods())
        made, friedman = _figures(results, board, build / "figures", options.n_resamples)
        progress(f"{len(made)} figures")

        _write_tables(table_dir, {"summary": summary, "leaderboard": board, "paper_tables": cells,
                                  "reproduction_status": status, "methods": method_list, "runs": runs,
                                  "experiment_finetune": grid, "experiment_pretrain": pretraining,
                                  **({"official_speed": speed} if len(speed) else {})})
        write_text(table_dir / "leaderboard.md", tables.leaderboard_markdown(board, titles))
        for (paper, table), lines in cells.groupby(["paper", "table"], sort=False):
            write_text(table_dir / f"{_slug('paper', paper, table)}.md", tables.paper_table_markdown(lines))
        if friedman:
            _write_tables(table_dir, {"friedman": pd.concat([
                result["ranks"].rename("average_rank").rename_axis("row").reset_index()
                .assign(protocol=protocol, cd=result["cd"], p=result["p"]) for protocol, result in friedman.items()],
                ignore_index=True)})
        for run, folder in results.run_dirs.items():
            target = build / "manifests" / f"{run}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / "manifest.json", target)

        # escape every text not marked safe (a ".html.j2" name is not escaped by default): method descriptions are
        # the docstrings of whatever methods are installed
        template = jinja2.Environment(loader=jinja2.PackageLoader("ssl3d.report", "templates"),
                                      autoescape=jinja2.select_autoescape(["html", "j2"]),
                                      undefined=jinja2.StrictUndefined)
        page = template.get_template(TEMPLATE).render(
            experiment=results.name, tier=tables.TIERS[options.tier], version=__version__,
            grid=_html(grid), pretraining=_html(pretraining) if len(pretraining) else "",
            environment=_environment(runs), skipped=results.skipped,
            summary_legend=SUMMARY_LEGEND, summary=[(title, runs_text, [(metric, _html(t)) for metric, t in blocks])
                                                    for title, runs_text, blocks in summary_blocks(titled_summary)],
            leaderboard_legend=tables.leaderboard_legend(board), leaderboard=_leaderboard_sections(board, titles),
            friedman=friedman, methods=method_list.to_dict("records"), paper_legend=tables.PAPER_TABLE_LEGEND,
            papers=_paper_sections(cells, applies), folded=_folded_summary(applies, datasets),
            status=_html(status[shown]) if shown.any() else "", folded_status=_html(status[~shown]),
            figures=made, sections=list(dict.fromkeys(f.section for f in made)),
            run_legend=RUN_TIMES, run_columns=list(runs.columns), runs=_records(runs),
            speed_legend=official_speed.LEGEND, speed=_html(speed) if len(speed) else "")
        write_text(build / "index.html", page)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    progress(f"wrote {out_dir / 'index.html'}")
    return out_dir / "index.html"

"""The report's figures, drawn from the suite's tables (DataFrames and arrays, never file paths).

Every figure function takes its data and an output stem ``out`` and writes ``<out>.png`` and ``<out>.svg``
(atomically, through :func:`ssl3d.io.atomic_path`); it returns a :class:`FigureFiles` with both paths, a one-
paragraph caption for the HTML report, and the (closed) matplotlib figure, whose artists the tests inspect.

Conventions shared by all figures:

* **Names**: figures label inits by their display names where the caller passes ``titles`` (init -> name; the report
  passes the registry's, :func:`ssl3d.report.tables.init_titles`), else by the init.
* **Colours** belong to inits (a pre-training entry, or ``scratch``): :func:`init_colours` maps names to colours,
  ``scratch`` always grey. Each figure takes ``colours=``; the report passes one map built from the experiment's
  ``finetune.inits`` so that an init has the same colour everywhere. Without it a figure builds the map from the
  inits it shows, sorted, which agrees across figures as long as they show the same pre-trained inits.
* **Backbones** are told apart by line style and marker (:func:`backbone_styles`), never by colour.
* **Uncertainty** of a mean over training runs (seeds × subset draws) and test cases is a 95 % bootstrap interval
  that resamples both (:func:`ssl3d.analysis.stats.runs_cases_bootstrap_ci`). Not a t-interval across runs: with
  the typical 1-3 runs per point it is undefined for one run and ±12.7 standard errors wide for two (Dice 0 to 1),
  and it ignores which test cases happened to be drawn.
* **Timings** skip the first :data:`WARMUP_STEPS` steps of each run (and of each resume): they pay for CUDA
  context and kernel selection, allocator growth and data-loader start-up, not for the method.
* SVGs keep text as text (searchable, editable) and are byte-for-byte reproducible (fixed hash salt, no date).

Method-specific figures (:data:`METHOD_FIGURES`) are registered here by name and declared by methods
(``Method.figures``, e.g. HybridMIM's ``("region_size_curve",)``): the report draws, for every method of an
experiment, the figures it declares, from the experiment's data (:class:`FigureInputs`), and skips one whose data the
experiment does not have. A new method figure is a function here and a name in the method's ``figures``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from ssl3d.analysis.aggregate import METRIC_TITLES, hours_title  # noqa: E402
from ssl3d.analysis.stats import (LOWER_IS_BETTER, MIN_PAIRS, SCRATCH, format_p,  # noqa: E402
                                  runs_cases_bootstrap_ci)
from ssl3d.io import atomic_path  # noqa: E402

__all__ = ["DPI", "METHOD_FIGURES", "SCRATCH_COLOUR", "WARMUP_STEPS", "FigureFiles", "FigureInputs", "MethodFigure",
           "backbone_styles", "critical_difference", "init_colours", "label_efficiency", "method_figure",
           "metric_against_compute", "pretrain_step_times", "qualitative_slices", "region_size_curve",
           "region_size_table", "significance_heatmap", "timed_steps", "training_curves"]

SCRATCH_COLOUR = "#7f7f7f"
# tab10 then tab20's light partners, greys removed (grey is scratch's)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
CLASS_PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf"]  # Set1
CONFIDENCE = 0.95
WARMUP_STEPS = 10
N_RESAMPLES = 10_000
RUN_KEYS = ["init", "backbone", "label_fraction", "subset", "seed", "run_id"]
DPI = 150
# Parts of a pre-training step (step_log.csv columns), drawn as stacked segments in the init's colour
STEP_PARTS = (("data_s", "data wait", {"alpha": 0.35, "hatch": "///"}),
              ("forward_s", "forward (views to loss)", {"alpha": 0.65}),
              ("backward_s", "backward + optimizer step", {"alpha": 1.0}))
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "hatch.linewidth": 0.6, "svg.fonttype": "none", "svg.hashsalt": "ssl3d",
}


@dataclass(frozen=True)
class FigureFiles:
    """What a figure function wrote: the PNG, the SVG, the caption to print under it, and the closed figure."""

    png: Path
    svg: Path
    caption: str
    figure: Figure


def init_colours(inits: Iterable[str]) -> dict[str, str]:
    """Init name -> colour: ``scratch`` grey, the others the palette in the order given (cycling past 18)."""
    others = [init for init in dict.fromkeys(inits) if init != SCRATCH]
    return {SCRATCH: SCRATCH_COLOUR, **{init: PALETTE[i % len(PALETTE)] for i, init in enumerate(others)}}


def backbone_styles(backbones: Iterable[str]) -> dict[str, dict]:
    """Backbone name -> line style and marker, in sorted order of the names."""
    return {name: {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i, name in enumerate(sorted(set(backbones)))}


def _styled(function):
    """Draw and save under the suite's style, leaving the caller's rcParams alone."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return function(*args, **kwargs)
    return wrapper


def _colours(colours: Mapping[str, str] | None, inits: Iterable[str]) -> dict[str, str]:
    inits = set(inits)
    if colours is None:
        return init_colours(sorted(inits))
    missing = sorted(inits - set(colours))
    if missing:
        raise ValueError(f"colours has no entry for init(s) {', '.join(missing)}")
    return dict(colours)


def _ordered_groups(frame: pd.DataFrame, colours: Mapping[str, str]) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """The (init, backbone) groups of ``frame`` in the order of the colour map, then of the backbone."""
    order = {init: i for i, init in enumerate(colours)}
    return sorted(frame.groupby(["init", "backbone"], sort=False), key=lambda item: (order[item[0][0]], item[0][1]))


def _label(init: str, backbone: str, styles: Mapping[str, dict], titles: Mapping[str, str] | None = None) -> str:
    name = (titles or {}).get(init, init)
    return f"{name} ({backbone})" if len(styles) > 1 else name


def _subplots(ncols: int, width: float, height: float = 3.4) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained", squeeze=False)
    return fig, axes[0]


def _save(fig: Figure, out: str | Path, caption: str, dpi: int) -> FigureFiles:
    """Write ``<out>.png`` and ``<out>.svg`` atomically and close the figure."""
    paths = {}
    try:
        for fmt in ("png", "svg"):
            paths[fmt] = Path(f"{out}.{fmt}")
            with atomic_path(paths[fmt]) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
    finally:
        plt.close(fig)
    return FigureFiles(paths["png"], paths["svg"], caption, fig)


def _case_values(rows: pd.DataFrame, target: str) -> pd.DataFrame:
    """One value per run and test case: the case's value of ``target``, for ``mean`` its mean over targets
    (columns :data:`RUN_KEYS`, case_id, value)."""
    if target != "mean":
        rows = rows[rows["target"] == target]
    return rows.groupby([*RUN_KEYS, "case_id"])["value"].mean().reset_index()


def _summarise(cases: pd.DataFrame, n_resamples: int) -> pd.DataFrame:
    """Per (init, backbone, label fraction): the mean over its runs × cases and the two-way bootstrap interval
    (:func:`ssl3d.analysis.stats.runs_cases_bootstrap_ci`)."""
    keys = ["init", "backbone", "label_fraction"]
    return pd.DataFrame([{**dict(zip(keys, key)), **runs_cases_bootstrap_ci(
        group.pivot(index="run_id", columns="case_id", values="value"), CONFIDENCE, n_resamples)}
                         for key, group in cases.groupby(keys, sort=True)],
                        columns=[*keys, "mean", "low", "high", "n_runs", "n_cases"])


def _paired_deltas(cases: pd.DataFrame) -> pd.DataFrame:
    """Each pre-trained run minus the scratch run with the same backbone, label fraction, subset draw and seed, case
    by case."""
    keys = ["backbone", "label_fraction", "subset", "seed", "case_id"]
    scratch = cases.loc[cases["init"] == SCRATCH, keys + ["value"]]
    if scratch.duplicated(keys).any():
        raise ValueError("several scratch runs share a backbone, label fraction, subset and seed: "
                         "pass the per-case table of one experiment")
    paired = cases[cases["init"] != SCRATCH].merge(scratch, on=keys, suffixes=("", "_scratch"))
    return paired.assign(value=paired["value"] - paired["value_scratch"])


def _ci_line(ax, summary: pd.DataFrame, colour: str, style: dict, label: str) -> None:
    """The mean line and its interval band (a percentile bootstrap of means stays within the values the metric can
    take: no clipping)."""
    ax.plot(summary["label_fraction"], summary["mean"], color=colour, label=label, markersize=4, **style)
    ax.fill_between(summary["label_fraction"], summary["low"], summary["high"], color=colour, alpha=0.15,
                    linewidth=0)


def _fraction_axis(ax, fractions: np.ndarray) -> None:
    """Label fractions as percent ticks; a log axis when they span a decade or more."""
    if fractions.max() / fractions.min() >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(fractions, labels=[f"{100 * fraction:g}%" for fraction in fractions])
    ax.set_xlabel("labelled training cases (% of the training set)")


def _figure_legend(fig: Figure, ax) -> None:
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper")


def _manifest(manifests: Mapping[str, dict], run: str) -> dict:
    if run not in manifests:
        raise ValueError(f"{run}: no manifest given for this run")
    return manifests[run]


def _range_text(counts: pd.Series) -> str:
    low, high = int(counts.min()), int(counts.max())
    return f"{low}" if low == high else f"{low}-{high}"


@_styled
def label_efficiency(per_case: pd.DataFrame, dataset: str, metric: str = "dice", out: str | Path = "label_efficiency",
                     *, target: str = "mean", protocol: str = "finetune", colours: Mapping[str, str] | None = None,
                     titles: Mapping[str, str] | None = None, n_resamples: int = N_RESAMPLES,
                     dpi: int = DPI) -> FigureFiles:
    """How much each init gains as labels get scarce, and whether the gain over scratch exceeds the noise of runs
    and test cases.

    Left: the metric (each case's value for ``target``; ``mean`` is its mean over targets) against the label
    fraction, one line per (init, backbone): the mean over runs × test cases (each run's mean over its cases,
    averaged over runs) with a 95 % bootstrap band resampling both runs and cases. Right: the difference to scratch
    on the same backbone, paired by subset draw, seed (the same training cases and sampling seed) and test case,
    with the same band: a band clear of zero is a gain beyond that noise (PGL, Fig. 5).
    """
    rows = per_case[(per_case["dataset"] == dataset) & (per_case["metric"] == metric)
                    & (per_case["protocol"] == protocol)]
    if rows.empty:
        raise ValueError(f"no {metric} rows for dataset {dataset!r} and protocol {protocol!r}")
    cases = _case_values(rows, target)
    if cases.empty:
        raise ValueError(f"no target {target!r} in the {metric} rows of {dataset!r}")
    colours = _colours(colours, cases["init"])
    styles = backbone_styles(cases["backbone"])
    summary, deltas = _summarise(cases, n_resamples), _paired_deltas(cases)
    delta_summary = _summarise(deltas, n_resamples)

    title = METRIC_TITLES.get(metric, metric)
    fig, (ax, ax_delta) = _subplots(2, width=9.5)
    for axis, lines in ((ax, summary), (ax_delta, delta_summary)):
        for (init, backbone), line in _ordered_groups(lines, colours):
            _ci_line(axis, line, colours[init], styles[backbone], _label(init, backbone, styles, titles))
    ax_delta.axhline(0, color="0.3", linewidth=0.8, linestyle="--")
    fractions = np.sort(cases["label_fraction"].unique())
    for axis in (ax, ax_delta):
        _fraction_axis(axis, fractions)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    ax.set(title=f"{dataset}: {title} against labels", ylabel=f"{title} ({better} is better)")
    ax_delta.set(title="difference to scratch (same backbone)", ylabel=f"Δ {title} vs scratch")
    _figure_legend(fig, ax)

    unpaired = sorted(set(cases.loc[cases["init"] != SCRATCH, "init"]) - set(deltas["init"]))
    caption = (f"{title} on {dataset} ({'mean over targets' if target == 'mean' else target}, {protocol}) against "
               f"the fraction of labelled training cases: the mean over {_range_text(summary['n_runs'])} runs "
               f"(seeds × subset draws) × {_range_text(summary['n_cases'])} test cases. Band: 95% bootstrap interval "
               f"of that mean resampling both the runs and the test cases ({n_resamples} resamples, percentile), so "
               f"it holds seed noise and test-case sampling. Right: each pre-trained run minus the scratch run on "
               f"the same backbone with the same subset draw and seed, case by case, with the same band; {better} "
               f"is better, and a band clear of the dashed zero line is a difference beyond that noise.")
    if unpaired:
        names = [(titles or {}).get(init, init) for init in unpaired]
        caption += f" No scratch run to pair with on their backbone: {', '.join(names)}."
    return _save(fig, out, caption, dpi)


def timed_steps(log: pd.DataFrame, manifest: dict, warmup: int, run: str) -> pd.DataFrame:
    """The steps of one run after its warm-up (the first ``warmup`` steps, and the first ``warmup`` after a resume)."""
    config = manifest["config"]
    keep = log["step"] > warmup
    resumed = manifest.get("resumed_from_step") or 0
    if resumed:
        keep &= ~log["step"].between(resumed + 1, resumed + warmup)
    steps = log[keep]
    if steps.empty:
        raise ValueError(f"{run}: {len(log)} steps logged, none left after skipping {warmup} warm-up steps")
    return steps.assign(init=config.get("variant", config["method"]), backbone=config["backbone"]["name"], run=run,
                        device=manifest.get("device", "unknown device"),
                        total_s=steps["data_s"] + steps["forward_s"] + steps["backward_s"])


@_styled
def pretrain_step_times(step_logs: Mapping[str, pd.DataFrame], manifests: Mapping[str, dict],
                        out: str | Path = "pretrain_step_times", *, warmup: int = WARMUP_STEPS,
                        colours: Mapping[str, str] | None = None, titles: Mapping[str, str] | None = None,
                        dpi: int = DPI) -> FigureFiles:
    """What a pre-training step costs per method and backbone, where the time goes, and how much memory it needs.

    Left: median time per step, stacked as data wait, forward and backward (with the optimizer step); the whiskers
    are the interquartile range of the whole step around its median (the median of the sum, which can differ
    slightly from the sum of the medians). Right: peak memory. Steps of all seeds of a method are pooled; the
    first ``warmup`` steps of every run, and of every resume, are skipped.
    """
    steps = pd.concat([timed_steps(log, _manifest(manifests, run), warmup, run)
                       for run, log in step_logs.items()], ignore_index=True)
    colours = _colours(colours, steps["init"])
    groups = _ordered_groups(steps, colours)
    x = np.arange(len(groups))
    fig, (ax_time, ax_memory) = _subplots(2, width=max(7.0, 1.3 * len(groups) + 4.0), height=3.8)
    bar_colours = [colours[init] for (init, _), _ in groups]
    bottom = np.zeros(len(groups))
    for column, _, style in STEP_PARTS:
        heights = np.array([group[column].median() * 1000 for _, group in groups])
        ax_time.bar(x, heights, bottom=bottom, color=bar_colours, edgecolor="white", linewidth=0.5, **style)
        bottom += heights
    totals = np.array([group["total_s"].quantile([0.25, 0.5, 0.75]).to_numpy() * 1000 for _, group in groups])
    whiskers = ax_time.errorbar(x, totals[:, 1], yerr=[totals[:, 1] - totals[:, 0], totals[:, 2] - totals[:, 1]],
                                fmt="o", color="black", markersize=3, capsize=3, linewidth=1,
                                label="whole step: median, IQR")
    ax_memory.bar(x, [group["peak_memory_mb"].max() for _, group in groups], color=bar_colours)
    labels = [f"{(titles or {}).get(init, init)}\n{backbone}" for (init, backbone), _ in groups]
    for axis in (ax_time, ax_memory):
        axis.set_xticks(x, labels=labels, rotation=30, ha="right")
        axis.grid(axis="x", visible=False)
    ax_time.set(title="time per pre-training step", ylabel="median time per step (ms)")
    ax_memory.set(title="peak memory", ylabel="peak memory (MiB)")
    parts = [Patch(facecolor="0.35", edgecolor="white", label=label, **style) for _, label, style in STEP_PARTS]
    fig.legend(handles=[*parts, whiskers], loc="outside lower center", ncols=len(parts) + 1)

    runs = steps.groupby(["init", "backbone"])["run"].nunique()
    devices = sorted(steps["device"].unique())
    caption = (f"Pre-training cost per method and backbone ({_range_text(runs)} run(s) each, steps pooled), after "
               f"skipping the first {warmup} steps of every run and of every resume as warm-up. Bars: median time "
               f"waiting for data, in the forward pass (views to loss terms) and in the backward pass with the "
               f"optimizer step; whiskers: interquartile range of the whole step. Right: peak memory (GPU memory "
               f"allocated by torch on CUDA, the process's peak resident set on CPU). Device: {'; '.join(devices)}.")
    if len(devices) > 1:
        caption += " Runs on different devices are not comparable."
    return _save(fig, out, caption, dpi)


def _compute_axis(ax, hours: pd.Series, title: str) -> float | None:
    """Pre-training device-hours on the x axis, with no pre-training (0) at its left edge, marked. Symmetric-log
    when the pre-trained inits span a decade or more (a log axis has no 0): linear from 0 to the power of ten below
    the cheapest of them, logarithmic beyond; returns that bound, None for a linear axis."""
    positive = hours[hours > 0]
    linear_to = 10.0 ** np.floor(np.log10(positive.min())) if positive.max() / positive.min() >= 10 else None
    if linear_to is not None:
        ax.set_xscale("symlog", linthresh=linear_to)
    if (hours == 0).any():
        ax.axvline(0, color="0.3", linewidth=0.8, linestyle=":")
        ax.annotate("no pre-training", (0, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", ha="left", va="top", color="0.3")
    ax.set_xlabel(f"pre-training {title} (mean over the init's pre-training runs)")
    return linear_to


@_styled
def metric_against_compute(board: pd.DataFrame, dataset: str, metric: str = "dice",
                           out: str | Path = "metric_against_compute", *, protocol: str = "finetune",
                           devices: Iterable[str], colours: Mapping[str, str] | None = None,
                           titles: Mapping[str, str] | None = None, dpi: int = DPI) -> FigureFiles | None:
    """What an init's pre-training compute buys: the comparison per unit of compute that none of the three papers
    gives (each reports accuracy alone, so a method that pre-trains ten times longer looks simply better).

    ``board`` is the leaderboard (:func:`ssl3d.report.tables.leaderboard`), whose rows hold ``metric`` and
    ``pretrain_device_hours``; ``devices`` are the pre-training runs' devices, named in the caption. One point per
    row (init × backbone × label fraction) in the init's colour, its marker the label fraction's; a grey line joins
    the rows of one fraction (and backbone, by line style) in order of compute. Rows without recorded compute are
    left out and named. None where no pre-trained row has recorded compute (nothing to put on the axis).
    """
    rows = board[(board["protocol"] == protocol) & (board["dataset"] == dataset)]
    shown = rows[rows["pretrain_device_hours"].notna()]
    if not (shown["pretrain_device_hours"] > 0).any():
        return None
    colours = _colours(colours, shown["init"])
    styles = backbone_styles(shown["backbone"])
    fractions = sorted(shown["label_fraction"].unique())
    markers = {fraction: MARKERS[i % len(MARKERS)] for i, fraction in enumerate(fractions)}
    name = METRIC_TITLES.get(metric, metric)
    fig, (ax,) = _subplots(1, width=6.5)
    lines = shown.sort_values("pretrain_device_hours").groupby(["backbone", "label_fraction"])
    for (backbone, fraction), line in lines:
        ax.plot(line["pretrain_device_hours"], line[metric], color="0.6", linewidth=0.8, marker=markers[fraction],
                markerfacecolor="none", linestyle=styles[backbone]["linestyle"],
                label=f"{100 * fraction:g}% labels" + (f" ({backbone})" if len(styles) > 1 else ""))
        ax.scatter(line["pretrain_device_hours"], line[metric], c=[colours[init] for init in line["init"]],
                   marker=markers[fraction], s=40, edgecolors="black", linewidths=0.4, zorder=3)
    linear_to = _compute_axis(ax, shown["pretrain_device_hours"], hours_title(shown["device_type"]))
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    ax.set(title=f"{dataset}: {name} against pre-training compute", ylabel=f"{name} ({better} is better)")
    inits = [Line2D([], [], color=colours[init], marker="o", linestyle="none", label=(titles or {}).get(init, init))
             for init in colours if init in set(shown["init"])]
    fig.legend(handles=[*inits, *ax.get_legend_handles_labels()[0]], loc="outside right upper")

    caption = (f"{name} on {dataset} ({protocol}; the leaderboard's mean over test cases, each averaged over the "
               f"row's runs) of each init at each label fraction against the compute its pre-training took: "
               f"device-hours measured from the runs' manifests (the training loop's wall time × the devices it ran "
               f"on), on {'; '.join(sorted(set(devices)))}. Scratch pre-trains nothing and sits at 0, the left "
               "edge. Fine-tuning compute is not on this axis (the leaderboard's hours add it).")
    if linear_to is not None:
        caption += f" The axis is linear from 0 to {linear_to:g}, logarithmic beyond."
    unknown = sorted(set(rows.loc[rows["pretrain_device_hours"].isna(), "init"]))
    if unknown:
        caption += f" No compute recorded, left out: {', '.join((titles or {}).get(i, i) for i in unknown)}."
    return _save(fig, out, caption, dpi)


@_styled
def region_size_curve(table: pd.DataFrame, out: str | Path = "hybridmim_region_size", *, full_size: int | None = None,
                      init: str = "hybridmim", colours: Mapping[str, str] | None = None, title: str | None = None,
                      dpi: int = DPI) -> FigureFiles:
    """How much partial-region reconstruction saves in a HybridMIM step (HybridMIM, Fig. 6b).

    ``table`` has one row per timed step: ``region_size`` (edge of the reconstructed cube, voxels) and
    ``seconds`` (that step's time), as ``benchmarks/hybridmim_region_size.py`` measures them; one row per size
    (its median) also works, without spread. ``full_size`` is the full-volume reconstruction (the crop's edge;
    default: the largest size). Points are medians with interquartile whiskers, each region annotated with
    full-volume time / region time: the speed-up partial reconstruction buys. ``title``: the method's display
    name (default ``init``).
    """
    quartiles = table.groupby("region_size")["seconds"].quantile([0.25, 0.5, 0.75]).unstack() * 1000
    sizes, (q25, median, q75) = quartiles.index.to_numpy(), quartiles.to_numpy().T
    full_size = int(sizes.max()) if full_size is None else full_size
    if full_size not in sizes:
        raise ValueError(f"full_size {full_size} is not a region size of the table ({', '.join(map(str, sizes))})")
    colour = _colours(colours, [init])[init]
    full = median[sizes == full_size][0]
    name = title or init

    fig, (ax,) = _subplots(1, width=5.5)
    ax.errorbar(sizes, median, yerr=[median - q25, q75 - median], fmt="-o", color=colour, markersize=4, capsize=3,
                label="median, IQR over timed steps")
    ax.plot([full_size], [full], linestyle="none", marker="*", markersize=14, color=colour, markeredgecolor="black",
            label=f"full volume ({full_size}³)")
    for size, value in zip(sizes, median):
        if size != full_size:
            ax.annotate(f"{full / value:.2f}×", (size, value), textcoords="offset points", xytext=(0, 8),
                        ha="center")
    ax.set_xticks(sizes, labels=[f"{size}³" for size in sizes])
    ax.set_ylim(bottom=0)
    ax.margins(x=0.08)
    ax.set(title=f"{name}: time per step against reconstruction size", xlabel="reconstructed region (voxels)",
           ylabel="time per step (ms)")
    ax.legend(loc="upper left")

    speedups = {size: full / value for size, value in zip(sizes, median) if size != full_size}
    caption = (f"Time per {name} pre-training step against the size of the reconstructed region: median and "
               f"interquartile range over the timed steps; the star is full-volume reconstruction ({full_size}³). "
               f"Labels: full-volume time / region time")
    if speedups:
        best = max(speedups, key=speedups.get)
        caption += f" (up to {speedups[best]:.2f}× at {best}³)"
    return _save(fig, out, caption + ".", dpi)


# --- method-specific figures ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FigureInputs:
    """What a method's figure may read of an experiment: its per-case table, the manifests and pre-training step
    logs of its runs (keyed ``<stage>/<run>``), the warm-up to skip in timings, and the report's colours and
    display names (init -> colour, init -> name)."""

    per_case: pd.DataFrame
    manifests: Mapping[str, dict]
    step_logs: Mapping[str, pd.DataFrame]
    warmup: int
    colours: Mapping[str, str]
    titles: Mapping[str, str]


@dataclass(frozen=True)
class MethodFigure:
    """A figure a method can declare: the report section it goes in, its title (``{method}``: the method's display
    name) and ``draw(method, inputs, out)``, which returns the files, or None where the experiment lacks its data."""

    section: str
    title: str
    draw: Callable[[str, FigureInputs, Path], FigureFiles | None]


METHOD_FIGURES: dict[str, MethodFigure] = {}


def method_figure(name: str, section: str, title: str):
    """Register the decorated ``draw(method, inputs, out)`` as the method figure ``name``."""
    def register(draw):
        METHOD_FIGURES[name] = MethodFigure(section, title, draw)
        return draw
    return register


def region_size_table(manifests: Mapping[str, dict], step_logs: Mapping[str, pd.DataFrame], warmup: int,
                      method: str = "hybridmim") -> pd.DataFrame | None:
    """Timed steps of ``method``'s pre-training runs by reconstruction size (columns backbone, region_size, seconds),
    where the experiment pre-trains it with several sizes on one backbone (HybridMIM's Table 4 / Fig. 6b ablation;
    the backbone with most sizes); None otherwise. A run without ``reconstruction_size`` reconstructs its whole
    crop (``patch_size``); both are read from the manifest's resolved ``method_config`` (the run's config holds only
    the entry's overrides)."""
    timed = []
    for run, manifest in manifests.items():
        config = manifest["config"]
        if config.get("method") != method or run not in step_logs:
            continue
        settings = manifest["method_config"]
        size = settings.get("reconstruction_size") or settings["patch_size"][0]
        steps = timed_steps(step_logs[run], manifest, warmup, run)
        timed.append(pd.DataFrame({"backbone": config["backbone"]["name"], "region_size": int(size),
                                   "seconds": steps["total_s"]}))
    if not timed:
        return None
    table = pd.concat(timed, ignore_index=True)
    sizes = table.groupby("backbone")["region_size"].nunique()
    if sizes.max() < 2:
        return None
    return table[table["backbone"] == sizes.idxmax()]


@method_figure("region_size_curve", "Pre-training cost",
               "{method} time per step against reconstruction size (HybridMIM, Fig. 6b)")
def _region_size_figure(method: str, inputs: FigureInputs, out: Path) -> FigureFiles | None:
    table = region_size_table(inputs.manifests, inputs.step_logs, inputs.warmup, method)
    if table is None:
        return None
    return region_size_curve(table, out=out, init=method, colours=inputs.colours,
                             title=inputs.titles.get(method, method))


@_styled
def training_curves(train_logs: Mapping[str, pd.DataFrame], manifests: Mapping[str, dict],
                    out: str | Path = "training_curves", *, colours: Mapping[str, str] | None = None,
                    titles: Mapping[str, str] | None = None, dpi: int = DPI) -> FigureFiles:
    """Whether an init converges faster or higher than scratch, and how much seeds disagree along the way.

    ``train_logs`` and ``manifests`` map run names to each fine-tuning run's ``train_log.csv`` and
    ``manifest.json`` (which says the run's init, backbone, seed, dataset and label fraction); pass the runs of one
    dataset and label fraction. Left: training loss, a running mean over 5 % of the run's steps; right: validation
    Dice at the validation steps. Thin lines are single runs, thick lines their mean per (init, backbone).
    """
    curves = []
    for run, log in train_logs.items():
        config = _manifest(manifests, run)["config"]
        curves.append(pd.DataFrame({
            "step": log["step"], "loss": log["loss"].rolling(max(1, len(log) // 20), min_periods=1).mean(),
            "val_dice": pd.to_numeric(log["val_dice"], errors="coerce"), "run": run, "init": config["init"],
            "backbone": config["backbone"]["name"], "dataset": config["dataset"],
            "label_fraction": config["label_fraction"]}))
    curves = pd.concat(curves, ignore_index=True)
    settings = curves[["dataset", "label_fraction"]].drop_duplicates()
    if len(settings) > 1:
        raise ValueError("training_curves draws one dataset and label fraction; got "
                         + ", ".join(f"{d} at {f:g}" for d, f in settings.itertuples(index=False)))
    dataset, fraction = settings.iloc[0]
    colours = _colours(colours, curves["init"])
    styles = backbone_styles(curves["backbone"])

    fig, (ax_loss, ax_dice) = _subplots(2, width=9.5)
    for (init, backbone), group in _ordered_groups(curves, colours):
        style = {"color": colours[init], "linestyle": styles[backbone]["linestyle"]}
        for axis, column, marker in ((ax_loss, "loss", None), (ax_dice, "val_dice", styles[backbone]["marker"])):
            points = group.dropna(subset=[column])
            for _, one in points.groupby("run"):
                axis.plot(one["step"], one[column], linewidth=0.7, alpha=0.4, **style)
            mean = points.groupby("step")[column].mean()
            axis.plot(mean.index, mean.to_numpy(), linewidth=2, marker=marker, markersize=4,
                      label=_label(init, backbone, styles, titles), **style)
    for axis in (ax_loss, ax_dice):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(title="fine-tuning loss", xlabel="step", ylabel="training loss (Dice + cross-entropy)")
    ax_dice.set(title="validation", xlabel="step", ylabel="validation Dice (mean over classes)")
    _figure_legend(fig, ax_dice)

    runs = curves.groupby(["init", "backbone"])["run"].nunique()
    caption = (f"Fine-tuning on {dataset} with {100 * fraction:g}% of the labelled training cases: training loss "
               f"(running mean over 5% of the steps) and validation Dice against step. Thin lines: single runs "
               f"({_range_text(runs)} seed(s) per init); thick lines: their mean.")
    return _save(fig, out, caption, dpi)


def _volume(array, name: str) -> np.ndarray:
    """A 3D array, from (X, Y, Z) or channel-first (1, X, Y, Z)."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape {array.shape}")
    return array


def _overlay(labels: np.ndarray, class_colours: Mapping[int, str]) -> np.ndarray:
    """An RGBA image: each class opaque in its colour, background transparent."""
    rgba = np.zeros((*labels.shape, 4))
    for label, colour in class_colours.items():
        rgba[labels == label] = (*to_rgb(colour), 1.0)
    return rgba


@_styled
def qualitative_slices(image, reference, predictions: Mapping[str, np.ndarray], classes: Mapping[int, str],
                       out: str | Path = "qualitative", *, colours: Mapping[str, str] | None = None,
                       dpi: int = DPI) -> FigureFiles:
    """What the inits' segmentations look like against the reference on one case: where they miss or over-segment.

    One axial slice (the last axis; the slice with the most reference foreground), the image in grey (1st-99th
    percentile window) with the labels overlaid, each class opaque in the colour its legend entry shows (a
    translucent overlay mixes each colour with the grey below it, so that no class would look like its legend
    entry); the reference first, then one panel per init framed in the init's colour. Arrays are (X, Y, Z) or
    (1, X, Y, Z); X runs left to right, Y bottom to top.
    """
    image, reference = _volume(image, "image"), _volume(reference, "reference")
    panels = {"reference": reference, **{init: _volume(pred, init) for init, pred in predictions.items()}}
    wrong = [name for name, labels in panels.items() if labels.shape != image.shape]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: shape differs from the image's {image.shape}")
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    frames = {"reference": "black", **_colours(colours, predictions)}
    class_colours = {label: CLASS_PALETTE[i % len(CLASS_PALETTE)] for i, label in enumerate(sorted(classes))}
    plane = image[:, :, z].T
    low, high = np.percentile(plane, [1, 99])

    fig, axes = _subplots(len(panels), width=2.3 * len(panels) + 0.5, height=3.0)
    for ax, (name, labels) in zip(axes, panels.items()):
        ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
        ax.imshow(_overlay(labels[:, :, z].T, class_colours), origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set(visible=True, edgecolor=frames[name], linewidth=2)
    fig.legend(handles=[Patch(color=class_colours[label], label=classes[label])
                        for label in class_colours], loc="outside lower center", ncols=min(len(classes), 6))

    caption = (f"Axial slice {z} of {image.shape[2]} (the slice with the most reference foreground): the image in "
               f"grey with labels overlaid in the legend's colours; the reference, then the prediction of each init "
               f"({', '.join(predictions)}).")
    return _save(fig, out, caption, dpi)


@_styled
def significance_heatmap(matrix: pd.DataFrame, out: str | Path = "significance", *, alpha: float = 0.05,
                         title: str | None = None, dpi: int = DPI) -> FigureFiles:
    """Which pairs of inits differ beyond chance on one dataset and label fraction.

    ``matrix`` is :func:`ssl3d.analysis.stats.significance_matrix`'s: Holm-corrected p-values of every pair of rows,
    NaN on the diagonal and where a pair could not be tested. Colour is −log10 p (darker: stronger evidence); each
    cell prints its p-value, in bold below ``alpha``; untested cells are hatched grey.
    """
    p = matrix.to_numpy(dtype=float)
    fig, (ax,) = _subplots(1, width=1.0 * len(matrix) + 3.2, height=0.8 * len(matrix) + 1.6)
    ax.set_facecolor("0.92")
    strength = np.ma.masked_invalid(-np.log10(np.clip(p, 1e-3, 1)))
    image = ax.imshow(strength, cmap="Blues", vmin=0, vmax=3, interpolation="nearest")
    untested = np.isnan(p) & ~np.eye(len(p), dtype=bool)
    for i, j in zip(*np.nonzero(untested)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.6", linewidth=0))
    for i, j in np.ndindex(p.shape):
        if i != j:
            bold = {"fontweight": "bold"} if p[i, j] < alpha else {}
            ax.text(j, i, format_p(p[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if p[i, j] < 0.01 else "black", **bold)
    ticks = np.arange(len(matrix))
    ax.set_xticks(ticks, labels=matrix.columns, rotation=30, ha="right")
    ax.set_yticks(ticks, labels=matrix.index)
    ax.grid(False)
    ax.set_title(title or "paired Wilcoxon, Holm-corrected p")
    fig.colorbar(image, ax=ax, label="−log10 p (Holm)", shrink=0.8)

    caption = (f"Holm-corrected p-values of two-sided paired Wilcoxon signed-rank tests between every pair of inits "
               f"on the same test cases (each case averaged over an init's runs first; Holm over the "
               f"{int(np.count_nonzero(~np.isnan(p[np.triu_indices(len(p), 1)])))} tested pairs). Darker cells are "
               f"stronger evidence of a difference; bold: p < {alpha:g}. The matrix is symmetric and shows no direction: the leaderboard "
               f"says which init is higher. Hatched cells could not be tested (fewer than {MIN_PAIRS} cases whose "
               f"values differ).")
    return _save(fig, out, caption, dpi)


def _cd_groups(ranks: np.ndarray, cd: float) -> list[tuple[int, int]]:
    """Maximal runs of consecutive (sorted) ranks whose spread is below the critical difference: inits that the
    Nemenyi test does not tell apart, as (first, last) index pairs."""
    groups = []
    for first in range(len(ranks)):
        last = max(j for j in range(first, len(ranks)) if ranks[j] - ranks[first] < cd)
        if last > first and not any(a <= first and last <= b for a, b in groups):
            groups.append((first, last))
    return groups


def _fit_labels(fig: Figure, ax, left: float, right: float) -> None:
    """Set the x limits of ``ax`` so that its texts right-aligned at ``left`` and left-aligned at ``right`` (data
    coordinates) lie inside the axes, however long they are.

    A text's width is fixed in pixels, not in data units, so the limits solve ``span = (right - left) + (L + R) ·
    span / W`` for the widest texts of each side (L, R pixels) and the axes' width W; the figure is widened first
    where those texts would leave less than 4 inches between them. The texts must be out of the layout
    (``in_layout=False``), or the layout would shrink the axes around them.
    """
    renderer = fig.canvas.get_renderer()
    widths = {align: max((text.get_window_extent(renderer).width + 4 for text in ax.texts if text.get_ha() == align),
                         default=0) for align in ("left", "right")}
    fig.set_figwidth(max(fig.get_figwidth(), 4.0 + (widths["left"] + widths["right"]) / fig.dpi))
    fig.get_layout_engine().execute(fig)
    per_pixel = (right - left) / (ax.get_window_extent(renderer).width - widths["left"] - widths["right"])
    ax.set_xlim(left - widths["right"] * per_pixel, right + widths["left"] * per_pixel)


@_styled
def critical_difference(result: Mapping, out: str | Path = "critical_difference", *, dpi: int = DPI) -> FigureFiles:
    """Which inits rank differently across datasets, beyond what the Nemenyi test attributes to chance.

    ``result`` is :func:`ssl3d.analysis.stats.friedman_nemenyi`'s. A Demšar (2006) critical-difference diagram:
    average ranks on the axis (1 = best, left), the critical difference as a bar, and thick lines joining inits
    whose average ranks differ by less than it. Drawn by hand: no plotting library for CD diagrams is a dependency.
    """
    ranks = result["ranks"].sort_values()
    names, values, k = list(ranks.index), ranks.to_numpy(dtype=float), int(result["k"])
    half = (len(names) + 1) // 2
    edges = (0.6, max(k, 1 + result["cd"]) + 0.4)  # where the label lines end, right of the bar however long
    fig, (ax,) = _subplots(1, width=8.0, height=1.6 + 0.32 * half + 0.12 * len(names))
    ax.hlines(0, 1, k, color="black", linewidth=1)
    for tick in range(1, k + 1):
        ax.vlines(tick, 0, 0.08, color="black", linewidth=1)
        ax.text(tick, 0.14, str(tick), ha="center", va="bottom", in_layout=False)
    ax.plot([1, 1 + result["cd"]], [0.55, 0.55], color="black", linewidth=2, solid_capstyle="butt")
    ax.text(1 + result["cd"] / 2, 0.62, f"CD = {result['cd']:.2f}", ha="center", va="bottom", in_layout=False)
    for i, (name, rank) in enumerate(zip(names, values)):
        left = i < half
        depth = -0.35 * ((i if left else len(names) - 1 - i) + 1)
        edge = edges[0] if left else edges[1]
        ax.plot([rank, rank, edge], [0, depth, depth], color="0.2", linewidth=0.8)
        ax.plot([rank], [0], marker="o", color="black", markersize=4)
        ax.text(edge + (-0.05 if left else 0.05), depth, f"{name} ({rank:.2f})", ha="right" if left else "left",
                va="center", in_layout=False)
    for level, (first, last) in enumerate(_cd_groups(values, result["cd"])):
        ax.plot([values[first] - 0.03, values[last] + 0.03], [-0.12 - 0.1 * level] * 2, color="black", linewidth=3,
                solid_capstyle="butt", label="not significantly different" if level == 0 else None)
    ax.set_ylim(-0.35 * (half + 1), 1.0)
    ax.axis("off")
    ax.set_title("average rank across blocks (1 = best)")
    _fit_labels(fig, ax, edges[0] - 0.05, edges[1] + 0.05)

    caption = (f"Average rank of each init over {result['n_blocks']} blocks (a block is one dataset × label "
               f"fraction; 1 = best). Friedman χ² = {result['statistic']:.2f}, p = {result['p']:.3g}. Inits joined "
               f"by a thick line differ by less than the Nemenyi critical difference (CD = {result['cd']:.2f} at "
               f"α = {result['alpha']:g}, the bar) and are not significantly different. With few blocks the test "
               f"has little power: an absent difference is not evidence of equivalence.")
    return _save(fig, out, caption, dpi)

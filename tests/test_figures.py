"""The report figures on synthetic tables: files written, captions, and the series each figure must show."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb, to_rgba
from matplotlib.container import BarContainer

from ssl3d.evaluate.columns import PER_CASE_COLUMNS
from ssl3d.analysis.stats import friedman_nemenyi, runs_cases_bootstrap_ci, significance_matrix
from ssl3d.report.figures import (SCRATCH_COLOUR, critical_difference, init_colours, label_efficiency,
                                  metric_against_compute, pretrain_step_times, qualitative_slices, region_size_curve,
                                  significance_heatmap, training_curves)

DPI = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LINES = [("scratch", "unet"), ("scratch", "hybridmim_unet"), ("byol", "unet"), ("hybridmim", "hybridmim_unet")]
FRACTIONS = [0.1, 0.5, 1.0]


def per_case_table() -> pd.DataFrame:
    """byol = scratch + 0.1 on every case; hybridmim = scratch + 0.05 + 0.01 * seed (mean gain 0.06)."""
    rows = []
    for (init, backbone), fraction, seed, case, target in itertools.product(
            LINES, FRACTIONS, range(3), range(3), ["liver", "spleen"]):
        for subset in range(1 if fraction == 1 else 2):
            value = 0.5 + 0.3 * fraction + 0.02 * seed + 0.05 * subset + 0.01 * case
            value += {"scratch": 0.0, "byol": 0.1, "hybridmim": 0.05 + 0.01 * seed}[init]
            rows.append({"dataset": "toy", "case_id": f"c{case}", "target": target, "metric": "dice", "value": value,
                         "init": init, "backbone": backbone, "protocol": "finetune", "label_fraction": fraction,
                         "subset": subset, "seed": seed, "run_id": f"{init}-{backbone}-{fraction}-{subset}-{seed}",
                         "empty_reference": False, "empty_prediction": False, "empty_policy": "both_empty=nan"})
    return pd.DataFrame(rows, columns=PER_CASE_COLUMNS)


def step_logs() -> tuple[dict, dict]:
    """Three pre-training runs of 40 steps; the first 10 and the 10 after a resume at step 20 are slow (warm-up)."""
    logs, manifests = {}, {}
    for variant, backbone, seed in [("byol", "unet", 0), ("hybridmim", "hybridmim_unet", 0),
                                    ("hybridmim", "hybridmim_unet", 1)]:
        step = np.arange(1, 41)
        slow = (step <= 10) | ((step > 20) & (step <= 30))
        logs[f"{variant}{seed}"] = pd.DataFrame({
            "step": step, "loss": 1.0 / step, "loss_rec": 1.0 / step, "lr": 1e-3,
            "data_s": np.where(slow, 5.0, 0.010), "forward_s": 0.020, "backward_s": 0.030,
            "peak_memory_mb": 100.0 + step})
        manifests[f"{variant}{seed}"] = {"config": {"variant": variant, "method": variant, "backbone": {"name": backbone},
                                                    "seed": seed},
                                         "device": "cpu: test", "resumed_from_step": 20}
    return logs, manifests


def train_logs(fractions=(0.5,)) -> tuple[dict, dict]:
    logs, manifests = {}, {}
    runs = [("scratch", "unet", 0), ("scratch", "unet", 1), ("byol", "unet", 0), ("byol", "unet", 1),
            ("hybridmim", "hybridmim_unet", 0)]
    for (init, backbone, seed), fraction in itertools.product(runs, fractions):
        step = np.arange(1, 21)
        name = f"{init}_{seed}_{fraction}"
        logs[name] = pd.DataFrame({"step": step, "loss": 1.0 / step + 0.01 * seed, "lr": 0.01,
                                   "val_dice": [0.5 + s / 100 if s % 5 == 0 else "" for s in step]})
        manifests[name] = {"config": {"init": init, "backbone": {"name": backbone}, "seed": seed, "dataset": "toy",
                                      "label_fraction": fraction}}
    return logs, manifests


def assert_written(result, *texts):
    assert result.png.read_bytes().startswith(PNG_MAGIC)
    svg = result.svg.read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for text in texts:
        assert text in svg, text
    assert result.caption and result.caption.endswith(".")
    assert sorted(p.name for p in result.png.parent.iterdir()) == sorted([result.png.name, result.svg.name])


def labelled_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_init_colours_keep_scratch_grey_and_ignore_it_when_numbering():
    colours = init_colours(["scratch", "byol", "hybridmim"])
    assert colours["scratch"] == SCRATCH_COLOUR and len(set(to_rgb(SCRATCH_COLOUR))) == 1
    assert colours["byol"] == init_colours(["byol", "hybridmim"])["byol"] != colours["hybridmim"]
    assert len(set(init_colours([f"m{i}" for i in range(12)]).values())) == 13


def test_label_efficiency(tmp_path):
    result = label_efficiency(per_case_table(), "toy", out=tmp_path / "label_efficiency", dpi=DPI)
    assert_written(result, "byol (unet)", "scratch (hybridmim_unet)", "hybridmim (hybridmim_unet)")
    ax, ax_delta = result.figure.axes
    legend = [text.get_text() for text in result.figure.legends[0].get_texts()]
    assert sorted(legend) == sorted(f"{init} ({backbone})" for init, backbone in LINES)
    assert ax.get_xscale() == "log"  # 0.1 to 1 spans a decade

    lines = labelled_lines(ax)
    np.testing.assert_allclose(lines["scratch (unet)"].get_ydata(), 0.5 + 0.3 * np.array(FRACTIONS) + 0.02
                               + [0.025, 0.025, 0] + 0.01)  # seeds 0-2 and subsets 0-1 averaged, cases 0-2
    deltas = labelled_lines(ax_delta)
    assert set(deltas) == {"byol (unet)", "hybridmim (hybridmim_unet)"}  # no scratch line in the Δ panel
    np.testing.assert_allclose(deltas["byol (unet)"].get_ydata(), 0.1)
    np.testing.assert_allclose(deltas["hybridmim (hybridmim_unet)"].get_ydata(), 0.06)
    assert "95% bootstrap interval of that mean resampling both the runs and the test cases" in result.caption


def test_figures_show_display_names_where_given(tmp_path):
    titles = {"byol": "BYOL", "hybridmim": "HybridMIM"}
    result = label_efficiency(per_case_table(), "toy", out=tmp_path / "a" / "label_efficiency", titles=titles,
                              dpi=DPI)
    legend = {text.get_text() for text in result.figure.legends[0].get_texts()}
    assert legend == {"scratch (unet)", "scratch (hybridmim_unet)", "BYOL (unet)", "HybridMIM (hybridmim_unet)"}
    steps = pretrain_step_times(*step_logs(), out=tmp_path / "b" / "steps", titles=titles, dpi=DPI)
    assert [tick.get_text() for tick in steps.figure.axes[0].get_xticklabels()] == ["BYOL\nunet",
                                                                                 "HybridMIM\nhybridmim_unet"]
    curves = training_curves(*train_logs(), out=tmp_path / "c" / "curves", titles=titles, dpi=DPI)
    assert {text.get_text() for text in curves.figure.legends[0].get_texts()} >= {"BYOL (unet)"}


def test_label_efficiency_rejects_a_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="dataset 'other'"):
        label_efficiency(per_case_table(), "other", out=tmp_path / "x", dpi=DPI)


def test_pretrain_step_times_stack_three_parts_and_skip_warmup(tmp_path):
    logs, manifests = step_logs()
    result = pretrain_step_times(logs, manifests, out=tmp_path / "steps", dpi=DPI)
    assert_written(result, "data wait", "byol", "hybridmim")
    ax_time, ax_memory = result.figure.axes
    bars = [c for c in ax_time.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and all(len(c.patches) == 2 for c in bars)  # data, forward, backward for each method
    heights = np.array([[patch.get_height() for patch in c.patches] for c in bars])
    np.testing.assert_allclose(heights, [[10, 10], [20, 20], [30, 30]])  # ms: the slow warm-up steps are gone
    assert [patch.get_height() for patch in ax_memory.patches] == [140.0, 140.0]
    assert "first 10 steps" in result.caption
    with pytest.raises(ValueError, match="none left after skipping 40"):
        pretrain_step_times(logs, manifests, out=tmp_path / "steps", warmup=40, dpi=DPI)


def test_region_size_curve_marks_full_volume_and_ratios(tmp_path):
    table = pd.DataFrame([{"region_size": size, "seconds": size ** 3 * 1e-6 * (1 + 0.01 * i)}
                          for size in (16, 24, 32) for i in (-1, 0, 1)])
    result = region_size_curve(table, out=tmp_path / "region", dpi=DPI)
    assert_written(result, "full volume (32³)")
    (ax,) = result.figure.axes
    full = labelled_lines(ax)["full volume (32³)"]
    assert list(full.get_xdata()) == [32]
    assert sorted(text.get_text() for text in ax.texts) == ["2.37×", "8.00×"]
    assert "8.00× at 16³" in result.caption


def test_training_curves_thin_lines_per_run_and_one_mean_per_init(tmp_path):
    logs, manifests = train_logs()
    result = training_curves(logs, manifests, out=tmp_path / "curves", dpi=DPI)
    assert_written(result, "byol (unet)")
    ax_loss, ax_dice = result.figure.axes
    legend = {text.get_text() for text in result.figure.legends[0].get_texts()}
    assert legend == {"scratch (unet)", "byol (unet)", "hybridmim (hybridmim_unet)"}
    for axis in (ax_loss, ax_dice):
        assert len(axis.get_lines()) == len(logs) + 3
    np.testing.assert_allclose(labelled_lines(ax_dice)["byol (unet)"].get_xdata(), [5, 10, 15, 20])
    with pytest.raises(ValueError, match="one dataset and label fraction"):
        training_curves(*train_logs(fractions=(0.5, 1.0)), out=tmp_path / "mixed", dpi=DPI)


def test_an_init_has_one_colour_across_figures(tmp_path):
    colours = init_colours(["scratch", "hybridmim", "byol"])
    efficiency = label_efficiency(per_case_table(), "toy", out=tmp_path / "a" / "eff", colours=colours, dpi=DPI)
    curves = training_curves(*train_logs(), out=tmp_path / "b" / "curves", colours=colours, dpi=DPI)
    for init, backbone in LINES:
        label = f"{init} ({backbone})"
        colour = to_hex(labelled_lines(efficiency.figure.axes[0])[label].get_color())
        assert colour == colours[init]
        if init == "scratch":
            assert colour == SCRATCH_COLOUR
        if label in labelled_lines(curves.figure.axes[1]):
            assert to_hex(labelled_lines(curves.figure.axes[1])[label].get_color()) == colour
    # without a map, figures showing the same pre-trained inits agree too
    default = label_efficiency(per_case_table(), "toy", out=tmp_path / "c" / "eff", dpi=DPI)
    steps = pretrain_step_times(*step_logs(), out=tmp_path / "d" / "steps", dpi=DPI)
    memory = [to_hex(patch.get_facecolor()) for patch in steps.figure.axes[1].patches]
    assert memory == [to_hex(labelled_lines(default.figure.axes[0])[label].get_color())
                      for label in ("byol (unet)", "hybridmim (hybridmim_unet)")]


def test_qualitative_slices_one_panel_per_init_and_the_reference(tmp_path):
    shape = (16, 12, 6)
    image = np.random.default_rng(0).normal(size=(1, *shape))
    reference = np.zeros(shape, dtype=np.uint8)
    reference[4:10, 3:8, 2:5] = 1
    reference[2:12, 2:10, 4] = 2  # slice 4 has the most foreground
    predictions = {"scratch": np.roll(reference, 1, axis=0), "byol": reference.copy(), "hybridmim": reference * 0}
    result = qualitative_slices(image, reference, predictions, {1: "liver", 2: "spleen"}, out=tmp_path / "qual",
                                dpi=DPI)
    assert_written(result, "liver", "spleen", "reference", "hybridmim")
    axes = result.figure.axes
    assert len(axes) == len(predictions) + 1
    assert [ax.get_title() for ax in axes] == ["reference", "scratch", "byol", "hybridmim"]
    assert all(len(ax.images) == 2 for ax in axes)
    overlay = axes[0].images[1].get_array()
    assert overlay.shape == (shape[1], shape[0], 4) and (overlay[..., 3] > 0).sum() == 10 * 8
    assert to_hex(axes[1].spines["left"].get_edgecolor()) == SCRATCH_COLOUR
    assert "slice 4 of 6" in result.caption
    with pytest.raises(ValueError, match="byol: shape differs"):
        qualitative_slices(image, reference, {"byol": reference[:-1]}, {1: "liver"}, out=tmp_path / "bad", dpi=DPI)


def test_label_efficiency_names_inits_without_a_scratch_run_to_pair_with(tmp_path):
    table = per_case_table()
    table = table[~((table["init"] == "scratch") & (table["backbone"] == "hybridmim_unet"))]
    result = label_efficiency(table, "toy", out=tmp_path / "eff", dpi=DPI)
    assert set(labelled_lines(result.figure.axes[1])) == {"byol (unet)"}
    assert result.caption.endswith("No scratch run to pair with on their backbone: hybridmim.")


def band(ax, label: str) -> np.ndarray:
    """The (x, y) vertices of the band drawn with the labelled line ``label`` (each line is followed by its band)."""
    return ax.collections[list(labelled_lines(ax)).index(label)].get_paths()[0].vertices


def test_the_runs_by_cases_bootstrap_keeps_both_sources_of_noise():
    same_runs = np.array([[0.6, 0.7, 0.8], [0.6, 0.7, 0.8]])
    runs_differ = np.array([[0.5, 0.6, 0.7], [0.7, 0.8, 0.9]])  # the same cases, the runs 0.2 apart
    ci = runs_cases_bootstrap_ci(runs_differ, n_resamples=2000)
    assert ci["mean"] == pytest.approx(0.7) and 0.5 <= ci["low"] < 0.7 < ci["high"] <= 0.9
    assert runs_cases_bootstrap_ci(runs_differ, n_resamples=2000) == ci  # seeded
    narrower = runs_cases_bootstrap_ci(same_runs, n_resamples=2000)
    assert ci["low"] < narrower["low"] and narrower["high"] < ci["high"]
    with_nan = runs_cases_bootstrap_ci([[0.5, math.nan], [0.7, 0.9]], n_resamples=200)
    assert with_nan["mean"] == pytest.approx(0.7) and not math.isnan(with_nan["low"])
    assert math.isnan(runs_cases_bootstrap_ci([[0.5]])["low"])


def test_label_efficiency_bands_resample_runs_and_cases(tmp_path):
    table = per_case_table()
    result = label_efficiency(table, "toy", out=tmp_path / "eff", n_resamples=500, dpi=DPI)
    vertices = band(result.figure.axes[0], "byol (unet)")
    runs = table[(table["init"] == "byol") & (table["label_fraction"] == 1.0)]
    expected = runs_cases_bootstrap_ci(runs.groupby(["run_id", "case_id"])["value"].mean().unstack(),
                                       n_resamples=500)
    at_one = vertices[np.isclose(vertices[:, 0], 1.0), 1]
    assert (at_one.min(), at_one.max()) == pytest.approx((expected["low"], expected["high"]))
    assert "(500 resamples, percentile)" in result.caption


def test_label_efficiency_bands_of_two_disagreeing_runs_stay_between_their_values(tmp_path):
    """A t-interval over two runs is ±12.7 standard errors: two seeds 0.3 apart gave a band from Dice 0 to 1."""
    table = per_case_table()
    table = table[(table["seed"] < 2) & (table["subset"] == 0)].copy()
    byol = table["init"] == "byol"
    table.loc[byol & (table["seed"] == 0), "value"] -= 0.3
    result = label_efficiency(table, "toy", out=tmp_path / "two", n_resamples=500, dpi=DPI)
    for fraction in FRACTIONS:
        values = table.loc[byol & (table["label_fraction"] == fraction), "value"]
        vertices = band(result.figure.axes[0], "byol (unet)")
        edges = vertices[np.isclose(vertices[:, 0], fraction), 1]
        assert values.min() <= edges.min() < edges.max() <= values.max()


def test_significance_heatmap_prints_every_tested_pair_and_hatches_the_untested(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 10)
    per_case = pd.DataFrame([
        {"dataset": "toy", "case_id": f"c{i}", "target": "liver", "metric": "dice", "value": value, "init": init,
         "backbone": "unet", "protocol": "finetune", "label_fraction": 1.0, "subset": 0, "seed": 0,
         "run_id": init, "empty_reference": False, "empty_prediction": False, "empty_policy": "nan"}
        for init, values in (("scratch", base), ("byol", base + 0.1 + rng.normal(0, 0.01, 10)),
                             ("mg", base + rng.normal(0, 0.05, 10)), ("few", base[:3]))
        for i, value in enumerate(values)], columns=PER_CASE_COLUMNS)
    matrix = significance_matrix(per_case, "toy", 1.0)
    result = significance_heatmap(matrix, out=tmp_path / "significance", dpi=DPI)
    assert_written(result, "byol", "few")
    (ax, _colour_bar) = result.figure.axes
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    names = list(matrix.index)
    for i, j in itertools.permutations(range(len(names)), 2):
        p = matrix.iloc[i, j]
        expected = "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"
        assert texts[i, j].get_text() == expected
        assert (texts[i, j].get_fontweight() == "bold") == (p < 0.05)
    few = names.index("few")
    assert all(math.isnan(p) for p in matrix.iloc[few]) and len(ax.patches) == 2 * (len(names) - 1)
    assert "3 tested pairs" in result.caption


def test_critical_difference_joins_only_inits_closer_than_the_cd(tmp_path):
    scores = pd.DataFrame({"best": [0.9, 0.91, 0.88, 0.92, 0.9, 0.93], "tie_a": [0.7, 0.72, 0.71, 0.69, 0.7, 0.73],
                           "tie_b": [0.71, 0.71, 0.7, 0.7, 0.71, 0.72], "worst": [0.5, 0.4, 0.45, 0.5, 0.42, 0.4]})
    result = friedman_nemenyi(scores)
    drawn = critical_difference(result, out=tmp_path / "cd", dpi=DPI)
    assert_written(drawn, "best", "tie_a", "worst", f"CD = {result['cd']:.2f}")
    (ax,) = drawn.figure.axes
    cd_bar = [line for line in ax.get_lines() if list(line.get_ydata()) == [0.55, 0.55]]
    assert len(cd_bar) == 1 and np.ptp(cd_bar[0].get_xdata()) == pytest.approx(result["cd"])
    groups = [line.get_xdata() for line in ax.get_lines() if line.get_linewidth() == 3]
    ranks = result["ranks"]
    joined = [{name for name, rank in ranks.items() if xs[0] < rank < xs[1]} for xs in groups]
    assert {"tie_a", "tie_b"} <= set().union(*joined)
    assert not any({"best", "worst"} <= group for group in joined)
    assert ranks["best"] == 1 and ranks["worst"] == 4


@pytest.mark.parametrize("n_inits, n_blocks", [(3, 6), (12, 2)])
def test_critical_difference_keeps_its_bar_and_labels_inside_the_axes(tmp_path, n_inits, n_blocks):
    names = [f"a long pre-training method name {i} (swinunetr)" for i in range(n_inits)]
    scores = pd.DataFrame(np.random.default_rng(n_inits).random((n_blocks, n_inits)), columns=names)
    result = friedman_nemenyi(scores)
    if n_inits == 12:
        assert result["cd"] > n_inits - 1  # a bar longer than the rank axis
    drawn = critical_difference(result, out=tmp_path / "cd", dpi=DPI)
    (ax,) = drawn.figure.axes
    canvas = FigureCanvasAgg(drawn.figure)
    canvas.draw()
    box = ax.get_window_extent(canvas.get_renderer())
    for text in ax.texts:
        extent = text.get_window_extent(canvas.get_renderer())
        assert (box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0
                and extent.y1 <= box.y1 + 1), text.get_text()
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    points = np.concatenate([line.get_xydata() for line in ax.get_lines()]
                            + [np.concatenate(collection.get_segments()) for collection in ax.collections])
    assert left <= points[:, 0].min() and points[:, 0].max() <= right
    assert bottom <= points[:, 1].min() and points[:, 1].max() <= top


def test_qualitative_overlays_use_the_legend_colours(tmp_path):
    shape = (16, 12, 6)
    reference = np.zeros(shape, dtype=np.uint8)
    reference[2:7, 2:6, 3] = 1
    reference[9:14, 5:10, 3] = 2
    image = np.random.default_rng(0).normal(size=shape)
    result = qualitative_slices(image, reference, {"byol": reference.copy()}, {1: "liver", 2: "spleen"},
                                out=tmp_path / "qual", dpi=DPI)
    legend = result.figure.legends[0]
    colours = {text.get_text(): patch.get_facecolor() for text, patch in zip(legend.get_texts(),
                                                                               legend.get_patches())}
    assert colours["liver"] != colours["spleen"]
    canvas = FigureCanvasAgg(result.figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba()) / 255
    for ax in result.figure.axes:
        for name, voxel in (("liver", (4, 3)), ("spleen", (11, 7))):  # (x, y) inside the class, on slice 3
            x, y = ax.transData.transform(voxel)
            drawn = pixels[int(result.figure.bbox.height - y), int(x)]
            assert drawn == pytest.approx(to_rgba(colours[name]), abs=2 / 255), (ax.get_title(), name)


def compute_board(hours: dict) -> pd.DataFrame:
    """Leaderboard rows of one dataset: each init (pre-training device-hours ``hours[init]``) at every fraction."""
    return pd.DataFrame([{"protocol": "finetune", "dataset": "toy", "label_fraction": fraction, "init": init,
                          "backbone": "unet", "dice": 0.5 + fraction / 4 + i / 100, "pretrain_device_hours": h,
                          "device_type": "cuda"}
                         for fraction in FRACTIONS for i, (init, h) in enumerate(hours.items())])


def test_dice_against_compute_puts_scratch_at_0_and_spans_decades_on_a_log_axis(tmp_path):
    colours = init_colours(["scratch", "byol", "hybridmim", "old"])
    board = compute_board({"scratch": 0.0, "byol": 3.0, "hybridmim": 400.0, "old": math.nan})
    result = metric_against_compute(board, "toy", out=tmp_path / "compute", devices=["cuda: H100"], colours=colours,
                                    dpi=DPI)
    assert_written(result, "pre-training GPU-hours", "no pre-training", "10% labels", "100% labels")
    ax = result.figure.axes[0]
    assert ax.get_xscale() == "symlog" and ax.xaxis.get_transform().linthresh == 1  # 0 to 1, then decades
    assert len(labelled_lines(ax)) == len(FRACTIONS)
    for points in ax.collections:  # one scatter per fraction, each point in its init's colour
        assert points.get_offsets()[:, 0].tolist() == [0.0, 3.0, 400.0]
        assert [to_hex(c) for c in points.get_facecolors()] == [colours[i] for i in ("scratch", "byol", "hybridmim")]
    assert "on cuda: H100" in result.caption and "left out: old" in result.caption
    linear = metric_against_compute(board[board.init != "hybridmim"], "toy", out=tmp_path / "linear",
                                    devices=["cuda: H100"], dpi=DPI)
    assert linear.figure.axes[0].get_xscale() == "linear"
    only_scratch = board[board.init.isin(["scratch", "old"])]
    assert metric_against_compute(only_scratch, "toy", out=tmp_path / "none", devices=[], dpi=DPI) is None

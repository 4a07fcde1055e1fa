"""The report's own tables and inputs: the reproduction-status matrix, the config's report block, and which runs a
results folder contributes. The page itself is built end to end in test_workflow.py; here it is built from a
synthetic results folder (models stubbed) to check what it learns from the registry and that protocols never mix."""

import importlib.util
import json
import sys
from types import SimpleNamespace

import markupsafe
import numpy as np
import pandas as pd
import pytest
import torch

from ssl3d.manifest import device_description
from ssl3d.pretrain import registry
from ssl3d.report import build, figures

from ssl3d.report.build import ReportOptions, read_results, reproduction_status
from ssl3d.report.published import published_tables
from ssl3d.report.figures import region_size_table

from conftest import REPO
from test_stats import rows, table
from test_tables import FakeSSL


def cells(*lines):
    return pd.DataFrame([{"paper": paper, "table": name, "status": status, "outside_ci": outside}
                         for paper, name, status, outside in lines])


def test_reproduction_status_counts_statuses_and_ci_per_table_in_published_order():
    status = reproduction_status(cells(
        ("pgl", "Table 1", "not run", pd.NA), ("pgl", "Table 1", "paper scale", True),
        ("hybridmim", "Table 2", "paper scale", False), ("hybridmim", "Table 2", "paper scale", False),
        ("hybridmim", "Table 2", "paper scale", pd.NA), ("hybridmim", "Table 2", "method not implemented", pd.NA),
        ("hdssl", "Table 3", "not run", pd.NA)))
    assert list(zip(status.paper, status.table)) == [("hybridmim", "Table 2"), ("pgl", "Table 1"),
                                                     ("hdssl", "Table 3")]  # the papers' order, not alphabetical
    assert status.columns.name is None  # crosstab's "status" would be a blank column on the page
    assert status[status.paper != "hdssl"].set_index("table").to_dict("index") == {
        "Table 2": {"paper": "hybridmim", "not run": 0, "paper scale": 3, "method not implemented": 1,
                    "inside CI": 2, "outside CI": 0},
        "Table 1": {"paper": "pgl", "not run": 1, "paper scale": 1, "method not implemented": 0,
                    "inside CI": 0, "outside CI": 1}}


def test_report_options_come_from_the_config_block():
    options = ReportOptions.from_config({"tier": "paper", "aliases": {"ours": ["hybridmim", "losses=L_pr"],
                                                                      "hm": "hybridmim"}})
    assert options.paper_aliases() == {"ours": ("hybridmim", "losses=L_pr"), "hm": "hybridmim"}
    assert ReportOptions.from_config(None).tier == "demo"
    with pytest.raises(ValueError, match="report.tier must be one of"):
        ReportOptions.from_config({"tier": "full"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['teir'\]"):
        ReportOptions.from_config({"teir": "paper"})


def manifest(run_id, **config):
    return {"run_id": run_id, "config_hash": run_id, "config": {"backbone": {"name": "unet"}, **config}}


def test_only_the_runs_behind_the_per_case_table_are_read(tmp_path):
    per_case = table(rows("scratch", [0.5, 0.6]), rows("byol", [0.6, 0.7]))
    per_case.to_csv(tmp_path / "per_case.csv", index=False)
    folders = {"finetune/a": manifest("scratch-unet-0-0", init="scratch"),
               "finetune/b": manifest("byol-unet-0-0", init="byol", pretrained="p1"),
               "finetune/old": manifest("old", init="byol", pretrained="p0"),  # an earlier config's run
               "pretrain/p": manifest("p1", method="byol"), "pretrain/q": manifest("p0", method="byol")}
    for folder, content in folders.items():
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "manifest.json").write_text(json.dumps(content))
    results = read_results(tmp_path)
    assert sorted(results.manifests) == ["finetune/a", "finetune/b", "pretrain/p"]
    assert set(results.by_run_id()) == {"scratch-unet-0-0", "byol-unet-0-0", "p1"}
    (tmp_path / "finetune/b/manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no manifest for run\(s\) \['byol-unet-0-0'\]"):
        read_results(tmp_path)


def test_hybridmim_runs_with_several_reconstruction_sizes_give_the_region_size_table():
    def run(size, backbone="hybridmim_unet", method="hybridmim"):
        config = {"method": method, "backbone": {"name": backbone}, "method_config": {}}
        return {"run_id": f"{method}{size}{backbone}", "config": config,  # the resolved settings:
                "method_config": {"reconstruction_size": size, "patch_size": [64, 64, 64]}}

    log = pd.DataFrame({"step": range(1, 31), "data_s": 0.01, "forward_s": 0.1, "backward_s": 0.2})
    manifests = {"pretrain/a": run(32), "pretrain/b": run(None), "pretrain/c": run(32, backbone="swinunetr"),
                 "pretrain/d": run(None, method="models_genesis")}
    region = region_size_table(manifests, {run: log for run in manifests}, 10, "hybridmim")
    assert sorted(region.region_size.unique()) == [32, 64]  # None: the whole 64³ crop
    assert set(region.backbone) == {"hybridmim_unet"} and len(region) == 2 * 20  # 10 warm-up steps skipped
    assert region.seconds.to_numpy() == pytest.approx(0.31)
    assert region_size_table({"pretrain/a": run(32)}, {"pretrain/a": log}, 10, "hybridmim") is None


# --- a page from a synthetic results folder -------------------------------------------------------------------

CASES = np.linspace(0.5, 0.85, 8)
# protocol -> init -> shift of its Dice; hybridmim wins fine-tuning, fake_ssl probing
SHIFTS = {"finetune": {"scratch": 0.0, "hybridmim": 0.06, "fake_ssl": 0.03},
          "probe": {"scratch": -0.1, "hybridmim": -0.04, "fake_ssl": 0.02}}
PRETRAINED = {("hybridmim", "finetune"): "pt-h32", ("hybridmim", "probe"): "pt-h64", ("fake_ssl", "finetune"): "pt-f",
              ("fake_ssl", "probe"): "pt-f"}
# run id -> the compute its manifest records; the others were written before manifests recorded it
ON_GPU = {"device": "cuda: test GPU", "device_type": "cuda"}
COMPUTE = {"pt-h32": {**ON_GPU, "device_count": 2, "device_seconds": 7200.0},  # 1 h on 2 GPUs
           "pt-h64": {**ON_GPU, "device_count": 1, "device_seconds": 36000.0},
           **{run: {**ON_GPU, "device_count": 1, "device_seconds": 1800.0}
              for run in ("scratch-finetune", "hybridmim-finetune", "fake_ssl-finetune", "hybridmim-probe",
                          "fake_ssl-probe")}}


def write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


DATA = {"dataset": "d", "data": {"source": "folder", "images": "/scans/images"}, "recipe": "demo_ct"}


def pretraining(run_id, method, size=None):
    resolved = {"batch_size": 4, "patch_size": [64, 64, 64], **({} if size is None else {"reconstruction_size": size})}
    config = {"method": method, "variant": method, "backbone": {"name": "unet"}, "pool": [DATA], "seed": 0,
              "steps": 30, "method_config": {}}
    return {"run_id": run_id, "config_hash": run_id, "method_version": "1", "device": "cuda: test GPU",
            "precision": "bfloat16 autocast", **COMPUTE.get(run_id, {}), "method_config": resolved, "config": config}


def results_folder(folder):
    """per_case.csv of three inits under two protocols, their fine-tuning manifests, and three pre-training runs
    (HybridMIM at two reconstruction sizes, fake_ssl) with step logs."""
    groups = []
    for protocol, shifts in SHIFTS.items():
        for init, shift in shifts.items():
            values = np.clip(CASES + shift + 0.01 * np.sin(np.arange(8) * (1 + shift)), 0, 1)
            one = table(rows(init, values))
            groups.append(one.assign(protocol=protocol, run_id=f"{init}-{protocol}"))
    per_case = pd.concat(groups, ignore_index=True)
    per_case.to_csv(folder / "per_case.csv", index=False)
    for (init, protocol), run in per_case.groupby(["init", "protocol"]).run_id.first().items():
        config = {**DATA, "init": init, "backbone": {"name": "unet"}, "label_fraction": 0.5, "protocol": protocol,
                  "seed": 0, "splits": {"subsets": 1}, "steps": 20, "batch_size": 2, "patch_size": [32, 32, 16],
                  **({"pretrained": PRETRAINED[init, protocol]} if init != "scratch" else {})}
        write_json(folder / "finetune" / run / "manifest.json",
                   {"run_id": run, "config_hash": run, "config": config, "wall_seconds": 12.5,
                    **COMPUTE.get(run, {})})
    (folder / "finetune" / "scratch-finetune" / "finetune.benchmark.tsv").write_text(
        "s\th:m:s\tmax_rss\n20.25\t0:00:20\t500.0\n")  # Snakemake's: the whole job
    for run_id, method, size, seconds in (("pt-h32", "hybridmim", 32, 0.1), ("pt-h64", "hybridmim", None, 0.4),
                                          ("pt-f", "fake_ssl", None, 0.2)):
        write_json(folder / "pretrain" / run_id / "manifest.json", pretraining(run_id, method, size))
        pd.DataFrame({"step": range(1, 31), "data_s": 0.01, "forward_s": seconds, "backward_s": seconds,
                      "peak_memory_mb": 100.0}).to_csv(folder / "pretrain" / run_id / "step_log.csv", index=False)


def official_comparison(folder, method: str, ratio: float):
    """A result file of ``benchmarks/official_compare.py`` (written by its own ``summarise``) for ``method``, our
    steps ``ratio`` times the official ones in channels_last_3d order through torch.compile."""
    spec = importlib.util.spec_from_file_location("official_compare", REPO / "benchmarks" / "official_compare.py")
    official_compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = official_compare  # its dataclasses look their module up
    spec.loader.exec_module(official_compare)
    official = [1.0, 1.2, 0.8]
    measured = {"seconds": {"official": official, "ours": [ratio * s for s in official]},
                "optimizer_seconds": {"official": [0.01] * 3, "ours": [0.01] * 3},
                "peak_mib": {"official": 3600, "ours": 2900}, "last_loss": {"official": 0.1, "ours": 0.1},
                "flops": {"official": 500e9, "ours": 500e9}}
    args = SimpleNamespace(scale=1.0, threads=2, precision="auto", channels_last=True, compile=True, repeats=3,
                           warmup=1, anomaly=False, official=folder)
    path = folder / f"{method}.json"
    write_json(path, official_compare.summarise(method, (64, 64, 32), 6, args, measured))
    return path


def build_page(tmp_path, monkeypatch):
    """The report of ``results_folder`` with fake_ssl registered and the qualitative figure (which loads trained
    models) drawn from a synthetic case by a stub that records what it was asked for; returns the report's folder,
    its page and the stub's record."""
    known = {**registry.methods(), FakeSSL.name: FakeSSL}
    monkeypatch.setattr(registry, "methods", lambda: known)
    asked = []

    def qualitative(results, protocol, dataset, out, colours, titles):
        inits = results.per_case[results.per_case.protocol == protocol].init
        asked.append((protocol, dataset, sorted(inits)))
        label = np.zeros((12, 10, 4), dtype=np.uint8)
        label[2:8, 3:7, 1:3] = 1
        predictions = {titles[init]: np.roll(label, shift, axis=0) for shift, init in enumerate(inits.unique())}
        return figures.qualitative_slices(np.indices(label.shape).sum(axis=0), label, predictions, {1: "organ"},
                                          out, colours={titles[init]: colours[init] for init in inits.unique()},
                                          dpi=40), dataset
    monkeypatch.setattr(build, "_qualitative", qualitative)
    results = tmp_path / "results" / "x"
    results.mkdir(parents=True)
    results_folder(results)
    comparisons = [official_comparison(tmp_path, method, 0.8) for method in ("hybridmim_unet", "models_genesis")]
    index = build.build_report(results, tmp_path / "reports" / "x", build.ReportOptions(n_resamples=200),
                               comparisons=comparisons)
    return index.parent, index.read_text(), asked


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Built once: the tests read it and change nothing."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return build_page(tmp_path_factory.mktemp("page"), monkeypatch)


def test_the_page_has_one_leaderboard_per_protocol_ranked_within_it(page):
    report, html, asked = page
    board = pd.read_csv(report / "tables" / "leaderboard.csv")
    assert list(board.protocol.unique()) == ["finetune", "probe"]
    for protocol, best in (("finetune", "hybridmim"), ("probe", "fake_ssl")):
        block = board[board.protocol == protocol]
        assert list(block["rank"]) == [1, 2, 3] and block.iloc[0].init == best
    markdown = (report / "tables" / "leaderboard.md").read_text()
    assert "## Protocol `finetune`" in markdown and "## Protocol `probe`" in markdown and "| FakeSSL " in markdown
    leaderboard = html[html.index('id="leaderboard"'):html.index('id="summary"')]
    assert leaderboard.index("Protocol <code>finetune</code>") < leaderboard.index("Protocol <code>probe</code>")
    assert leaderboard.count("<td>FakeSSL</td>") == 2 and "<td>fake_ssl</td>" not in leaderboard
    # tests and figures are per protocol: one significance matrix, label-efficiency and qualitative figure each
    for stem in ("d", "probe_d"):  # named like runs: the protocol where it is not finetune
        assert (report / "tables" / f"significance_{stem}_0p5.csv").is_file()
        assert (report / "figures" / f"label_efficiency_{stem}.png").is_file()
    assert asked == [("finetune", "d", sorted(["scratch", "hybridmim", "fake_ssl"] * 8)),
                     ("probe", "d", sorted(["scratch", "hybridmim", "fake_ssl"] * 8))]


def test_the_methods_section_comes_from_the_registry(page):
    report, html, _ = page
    methods = html[html.index('<h2 id="methods">'):html.index('<h2 id="leaderboard">')]
    for text in ("FakeSSL", FakeSSL.paper, "version 3", FakeSSL.description(), "HybridMIM",
                 registry.methods()["hybridmim"].paper, "No pre-training"):
        assert str(markupsafe.escape(text)) in methods
    listed = pd.read_csv(report / "tables" / "methods.csv")
    assert list(listed.init) == ["scratch", "hybridmim", "fake_ssl"]
    assert list(listed.title) == ["scratch", "HybridMIM", "FakeSSL"]


def test_hybridmim_declares_the_region_size_figure_and_the_page_draws_it_under_pretraining_cost(page):
    report, html, _ = page
    assert registry.methods()["hybridmim"].figures == ("region_size_curve",)
    assert "region_size_curve" in figures.METHOD_FIGURES
    assert (report / "figures" / "hybridmim_region_size_curve.svg").is_file()
    cost = html[html.index('<h2 id="pre-training-cost">'):]
    assert "HybridMIM time per step against reconstruction size" in cost.split("<h2 ")[1]
    assert "fake_ssl_" not in html  # declares no figure


def section(html, name):
    """The page's section ``name``: from its heading to the next one (or the end)."""
    start = html.index(f'<h2 id="{name}">')
    end = html.find("<h2 ", start + 1)
    return html[start:end if end > 0 else None]


def test_the_page_states_the_experiment_its_runs_were_configured_with(page):
    report, html, _ = page
    grid = pd.read_csv(report / "tables" / "experiment_finetune.csv", dtype=str).set_index("setting")["value"]
    assert grid.to_dict() == {"datasets": "d (your folder /scans/images, recipe demo_ct)",
                              "protocols": "finetune, probe", "backbones": "unet", "label fractions": "0.5",
                              "subset draws": "1", "seeds": "0", "steps": "20", "batch size": "2",
                              "patch size": "32×32×16"}
    entries = pd.read_csv(report / "tables" / "experiment_pretrain.csv", dtype=str).set_index("entry")
    assert list(entries.index) == ["fake_ssl", "hybridmim"]  # in the order of the run folders
    assert entries.loc["hybridmim"].to_dict() == {  # two runs, one line: the settings they share
        "method": "hybridmim", "backbone": "unet", "datasets": "d (your folder /scans/images, recipe demo_ct)",
        "seeds": "0", "steps": "30", "batch size": "4", "patch size": "64×64×64"}
    experiment = section(html, "experiment")
    for text in ("<td>32×32×16</td>", "<td>finetune, probe</td>", "<h3>Pre-training</h3>", "<td>64×64×64</td>"):
        assert text in experiment
    assert html.index('id="experiment"') < html.index('id="status"')


def test_method_descriptions_are_shown_unfolded(page):
    _, html, _ = page
    methods = section(html, "methods")
    assert str(markupsafe.escape(FakeSSL.description())) in methods and "<details" not in methods


def test_no_table_has_a_blank_column(page):
    _, html, _ = page
    assert "<th></th>" not in section(html, "status")
    assert "<th></th>" not in html[html.index('<h2 id="experiment">'):html.index('<h2 id="papers">')]


def test_the_run_table_names_which_time_it_shows(page):
    report, html, _ = page
    runs = pd.read_csv(report / "tables" / "runs.csv").set_index("run")
    assert "wall_seconds" not in runs
    assert runs.loc[runs["stage"] == "pretrain", "precision"].eq("bfloat16 autocast").all()
    assert runs.loc["scratch-finetune", ["loop_seconds", "job_seconds"]].tolist() == [12.5, 20.25]
    assert runs.loc["hybridmim-finetune", "loop_seconds"] == 12.5 and np.isnan(runs.loc["hybridmim-finetune",
                                                                                        "job_seconds"])
    table = section(html, "runs")
    assert "<th>loop_seconds</th>" in table and "<th>job_seconds</th>" in table
    assert "loop_seconds: the training loop" in table and "job_seconds: the whole Snakemake job" in table


def test_a_custom_experiment_folds_the_paper_tables_that_cannot_apply(page):
    _, html, _ = page
    n = len(published_tables())
    summary = f"{n} of {n} published tables are on datasets this experiment does not run (it runs d)"
    status = section(html, "status")
    assert status.index("<details><summary>" + summary) < status.index("<table")  # the status table is folded
    papers = html[html.index('<h2 id="papers">'):html.index('<h2 id="runs">')]
    folded = papers.index(f'<details class="folded"><summary>{summary}')
    assert papers.count("<details") == n + 1 and papers.index("<details") == folded  # every table inside the fold


def test_only_tables_on_a_dataset_of_the_experiment_apply():
    cells = pd.DataFrame({"paper": ["pgl", "pgl", "pgl", "hdssl"], "table": ["Table 1", "Table 1", "Table 2", "Table 1"],
                          "dataset": ["btcv", "msd_liver", "msd_liver", "amos_mri"]})
    applies = build._applies(cells, {"btcv"})
    assert applies.to_dict() == {("pgl", "Table 1"): True, ("pgl", "Table 2"): False, ("hdssl", "Table 1"): False}
    assert build._folded_summary(applies, {"btcv"}).startswith("2 of 3 published tables")
    assert build._folded_summary(applies[applies], {"btcv"}) == ""


def test_the_label_efficiency_caption_says_what_its_band_is(page):
    _, html, _ = page
    caption = html[html.index('<h2 id="label-efficiency">'):].split("</figcaption>")[0]
    assert "bootstrap interval" in caption and "resampling both the runs and the test cases" in caption


def test_the_leaderboard_adds_up_device_hours_and_a_figure_sets_dice_against_pretraining_compute(page):
    report, html, _ = page
    board = pd.read_csv(report / "tables" / "leaderboard.csv").set_index(["protocol", "init"])
    # hybridmim fine-tuning: pt-h32's 1 h on 2 GPUs, then a 0.5 h fine-tuning run
    assert board.loc[("finetune", "hybridmim"), ["pretrain_device_hours", "device_hours"]].tolist() == [2.0, 2.5]
    assert board.loc[("probe", "hybridmim"), "device_hours"] == 10.5
    assert board.loc[("finetune", "scratch"), ["pretrain_device_hours", "device_hours"]].tolist() == [0.0, 0.5]
    # fake_ssl's pre-training and scratch's probe run recorded no compute (older manifests): unknown, not free
    assert board.loc[("finetune", "fake_ssl"), ["pretrain_device_hours", "device_hours"]].isna().all()
    assert np.isnan(board.loc[("probe", "scratch"), "device_hours"])
    leaderboard = section(html, "leaderboard")
    assert "<th>GPU-hours</th>" in leaderboard and "<td>2.5</td>" in leaderboard
    runs = pd.read_csv(report / "tables" / "runs.csv").set_index("run")
    assert runs.loc["pt-h32", "device_seconds"] == 7200 and np.isnan(runs.loc["pt-f", "device_seconds"])
    cost = section(html, "pre-training-cost")
    for protocol, stem in (("finetune", "compute_d"), ("probe", "compute_probe_d")):
        assert (report / "figures" / f"{stem}.svg").is_file() and f'src="figures/{stem}.png"' in cost
        caption = cost[cost.index(f"Dice against pre-training compute · {protocol} · d"):].split("</figcaption>")[0]
        assert "measured from the runs" in caption and "on cuda: test GPU" in caption
        assert "left out: FakeSSL" in caption


def test_the_step_time_against_the_official_code_is_shown_for_the_methods_pretrained(page):
    """The comparisons of benchmarks/official_compare.py: HybridMIM's (pre-trained here) with its ratio, spread and
    numerics; Models Genesis' (not in this experiment) left out."""
    report, html, _ = page
    speed = section(html, "official-speed")
    assert "hybridmim_unet" in speed and "models_genesis" not in speed
    assert "<td>0.800 [0.800, 0.800]</td>" in speed and "float32, channels_last_3d, torch.compile" in speed
    table = pd.read_csv(report / "tables" / "official_speed.csv")
    assert list(table.comparison) == ["hybridmim_unet"] and list(table["peak MiB official / ours"]) == ["3600 / 2900"]
    assert list(table["GFLOP/s official / ours"]) == ["500 / 625"]  # 500 GFLOP in a median 1.0 s and 0.8 s
    # the machine it ran on, with the vector instructions of PyTorch's CPU kernels (AVX2, AVX512, ...)
    assert table.machine[0] == device_description(torch.device("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in table.machine[0]

"""The report's own tables and inputs: the reproduction-status matrix, the config's report block, and which runs a
results folder contributes. The page itself is built end to end in test_workflow.py."""

import json

import pandas as pd
import pytest

from ssl3d.report.build import ReportOptions, read_results, reproduction_status

from test_stats import rows, table


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
    from ssl3d.report.build import ExperimentResults, _region_size_table

    def run(size, backbone="hybridmim_unet", method="hybridmim"):
        config = {"method": method, "backbone": {"name": backbone}, "patch_size": [64, 64, 64]}
        return {"run_id": f"{method}{size}{backbone}", "config": config, "method_config": {"reconstruction_size": size}}

    log = pd.DataFrame({"step": range(1, 31), "data_s": 0.01, "forward_s": 0.1, "backward_s": 0.2})
    manifests = {"pretrain/a": run(32), "pretrain/b": run(None), "pretrain/c": run(32, backbone="swinunetr"),
                 "pretrain/d": run(None, method="models_genesis")}
    results = ExperimentResults("x", table(), {}, manifests, {run: log for run in manifests}, {}, {})
    region = _region_size_table(results, 10)
    assert sorted(region.region_size.unique()) == [32, 64]  # None: the whole 64³ crop
    assert set(region.backbone) == {"hybridmim_unet"} and len(region) == 2 * 20  # 10 warm-up steps skipped
    assert region.seconds.to_numpy() == pytest.approx(0.31)
    assert _region_size_table(ExperimentResults("x", table(), {}, {"pretrain/a": run(32)}, {"pretrain/a": log},
                                                {}, {}), 10) is None

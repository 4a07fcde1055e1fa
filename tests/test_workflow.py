"""The Snakemake workflow end to end on the micro config (``config/experiments/micro.yaml``) in a temporary
directory: its per-case table, summaries, manifests and weight transfer, what a rerun plans, and the report.
Other DAGs: ``test_workflow_dags.py``; config checks, plans and profiles: ``test_workflow_config.py``."""

import json
import re

import numpy as np
import pandas as pd
import psutil
import pytest

from ssl3d.evaluate.columns import PER_CASE_COLUMNS

from conftest import MICRO, needs_job_server, snakemake


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("micro")
    result = snakemake(workdir, MICRO)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_per_case_table(micro_run):
    table = pd.read_csv(micro_run / "results" / "micro" / "per_case.csv")
    assert list(table.columns) == PER_CASE_COLUMNS
    # 3 inits x 2 fractions x 2 seeds = 12 runs, each: 2 test cases x 6 organs x 4 metrics
    assert len(table) == 12 * 2 * 6 * 4
    assert table["run_id"].nunique() == 12
    assert set(table["label_fraction"]) == {0.5, 1.0} and set(table["seed"]) == {0, 1}
    assert set(table["init"]) == {"scratch", "models_genesis", "byol"} and set(table["protocol"]) == {"finetune"}
    assert set(table["target"]) == {"spleen", "kidney_right", "kidney_left", "liver", "stomach", "aorta"}
    dice = table[table["metric"] == "dice"]["value"]
    assert dice.between(0, 1).all()
    # a miss is scored, not dropped: with both_empty=nan no reference is empty, so no value is NaN
    assert not table["empty_reference"].any() and table["value"].notna().all()
    assert set(table["empty_policy"]) == {"both_empty=nan;one_empty_distance=max"}


@pytest.mark.slow
@needs_job_server
def test_the_jobs_ran_in_the_runs_job_server_which_ended_with_it(micro_run):
    served = (micro_run / "logs" / "job_server.log").read_text()
    assert len(re.findall(r"^job \d+: ssl3d --threads \d+ finetune ", served, re.MULTILINE)) == 12
    assert len(re.findall(r"^job \d+: ssl3d --threads \d+ pretrain ", served, re.MULTILINE)) == 2
    assert not [process for process in psutil.process_iter(["cmdline", "cwd"])
                if "ssl3d.jobserver" in (process.info["cmdline"] or []) and process.info["cwd"] == str(micro_run)]


@pytest.mark.slow
def test_summary_and_manifests(micro_run):
    summary = pd.read_csv(micro_run / "results" / "micro" / "summary.csv")
    cells = summary[(summary["target"] == "mean") & (summary["metric"] == "dice") & (summary["label_fraction"] == 1.0)]
    assert sorted(cells["init"]) == ["byol", "models_genesis", "scratch"]
    assert (cells["n_seeds"] == 2).all() and np.isfinite(cells["sd"]).all()
    markdown = (micro_run / "results" / "micro" / "summary.md").read_text()
    assert "### Dice" in markdown and " ± " in markdown and "both_empty=nan" in markdown
    manifests = sorted((micro_run / "results" / "micro" / "finetune").glob("phantom_scratch_*/manifest.json"))
    assert len(manifests) == 4
    manifest = json.loads(manifests[0].read_text())
    for key in ("run_id", "config_hash", "config", "git_commit", "packages", "device", "seed", "wall_seconds",
                "steps_per_second", "peak_memory_mb"):
        assert key in manifest, key
    assert manifest["run_id"] in manifests[0].parent.name
    assert manifest["packages"]["torch"].startswith("2.13.0")


@pytest.mark.slow
def test_pretraining_feeds_fine_tuning_through_the_verified_transfer(micro_run):
    pretrain = micro_run / "results" / "micro" / "pretrain"
    for method, decoder in (("models_genesis", 1.0), ("byol", 0.0)):
        (run,) = pretrain.glob(f"{method}_unet_seed0_*")
        log = pd.read_csv(run / "step_log.csv")
        assert list(log["step"]) == [1, 2, 3, 4] and {"data_s", "forward_s", "backward_s"} <= set(log.columns)
        assert json.loads((run / "manifest.json").read_text())["transfer"]["fractions"]["decoder"] == decoder
        finetuned_runs = sorted((micro_run / "results" / "micro" / "finetune").glob(f"phantom_{method}_unet_*"))
        assert len(finetuned_runs) == 4  # 2 fractions x 2 seeds
        for finetuned in finetuned_runs:
            config = json.loads((finetuned / "config.json").read_text())
            assert config["inputs"]["pretrained"].endswith(f"{run.name}/pretrained.pt")
            transfer = json.loads((finetuned / "manifest.json").read_text())["transfer"]
            assert transfer["fractions"]["encoder"] == 1.0 and transfer["fractions"]["decoder"] == decoder


@pytest.mark.slow
def test_a_cosmetic_config_edit_plans_nothing(micro_run):
    """Reordered keys, and a dataset's label_fractions equal to the global ones, change no run and no data stage."""
    edited = json.loads(json.dumps(MICRO))
    for section in (edited, edited["datasets"]["phantom"], edited["splits"], edited["finetune"],
                    edited["evaluation"]["nsd_tolerance_mm"]):
        items = list(section.items())
        section.clear()
        section.update(reversed(items))
    edited["datasets"]["phantom"]["label_fractions"] = MICRO["splits"]["label_fractions"]
    assert "Nothing to be done" in snakemake(micro_run, edited, "-n", sort_keys=False).stdout


@pytest.mark.slow
def test_rerun_has_nothing_to_do_and_an_override_makes_new_runs(micro_run):
    assert "Nothing to be done" in snakemake(micro_run, MICRO, "-n").stdout
    changed = {**MICRO, "finetune": {**MICRO["finetune"], "steps": 7}}
    dry = snakemake(micro_run, changed, "-n", "--rerun-triggers", "mtime")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "finetune" in dry.stdout and "rule prepare:" not in dry.stdout and "pretrain " not in dry.stdout


@pytest.mark.slow
def test_the_report_links_every_figure_and_table_and_regenerates_without_training(micro_run):
    report = micro_run / "reports" / "micro"
    page = (report / "index.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"#][^"]*)"', page))
    assert [link for link in links if not (report / link).is_file()] == []
    shown = {link.removeprefix("figures/").removesuffix(".png") for link in links if link.endswith(".png")}
    assert shown == {"label_efficiency_phantom", "training_curves_phantom_0p5", "training_curves_phantom_1",
                     "pretrain_step_times", "qualitative_phantom", "critical_difference",
                     "compute_phantom"}  # 2 test cases: no p-values
    assert page.count("<figcaption>") == len(shown)
    runs = pd.read_csv(report / "tables" / "runs.csv")
    assert sorted(runs.value_counts("stage").items()) == [("finetune", 12), ("pretrain", 2)]
    assert all((report / "manifests" / stage / f"{run}.json").is_file() for stage, run in zip(runs.stage, runs.run))
    assert len(pd.read_csv(report / "tables" / "leaderboard.csv")) == 3 * 2  # inits x label fractions
    cells = pd.read_csv(report / "tables" / "paper_tables.csv")
    assert set(cells.status) <= {"not run", "method not implemented", "metric not measured",  # no paper dataset here
                                 "components not recoverable"}
    speed = pd.read_csv(report / "tables" / "official_speed.csv")  # the checkout's benchmarks/results/official/
    assert set(speed.comparison) == {"models_genesis"} and 'id="official-speed"' in page  # of the methods run here

    (report / "index.html").unlink()
    result = snakemake(micro_run, MICRO, "--forcerun", "report", "--", "reports/micro")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.search(r"Job stats:\n(.*?)\ntotal", result.stdout + result.stderr, re.S).group(1)
    assert re.findall(r"^(\w+)\s+\d+$", jobs, re.M) == ["report"]
    assert (report / "index.html").is_file()

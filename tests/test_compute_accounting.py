"""Compute accounting: manifests record device type, device count and device-seconds, and a leaderboard row adds
up what one result cost, each pre-training run counted once. The page's column and figure are checked in
test_report_build.py, the figure's axis in test_figures.py."""

import math

import pytest
import torch

from ssl3d.analysis.aggregate import hours_title
from ssl3d.finetune.train import finetune
from ssl3d.io import read_json
from ssl3d.manifest import run_manifest
from ssl3d.pretrain.loop import pretrain
from ssl3d.report.tables import leaderboard

from conftest import pretrain_config, run_config
from test_stats import rows, table


def test_pretraining_and_finetuning_manifests_record_their_compute(tiny_index, tiny_splits, tmp_path):
    pretrain(pretrain_config(tmp_path / "pre.json", tiny_index), tmp_path / "pre")
    finetune(run_config(tmp_path / "fine.json", tiny_index, tiny_splits, steps=2, val_every=2, checkpoint_every=2),
             tmp_path / "fine")
    for stage in ("pre", "fine"):
        manifest = read_json(tmp_path / stage / "manifest.json")
        assert (manifest["device_type"], manifest["device_count"]) == ("cpu", 1)  # one process: no torchrun
        assert manifest["device_seconds"] == pytest.approx(manifest["wall_seconds"], abs=0.01)
        assert manifest["device_seconds"] > 0


def test_device_seconds_are_the_loop_seconds_on_every_device(monkeypatch):
    monkeypatch.setattr("ssl3d.manifest.world_size", lambda: 4)  # a torchrun run of four processes
    manifest = run_manifest({"seed": 0}, "r", torch.device("cpu"), wall_seconds=1.5)
    assert (manifest["device_count"], manifest["device_seconds"]) == (4, 6.0)
    assert run_manifest({"seed": 0}, "r", torch.device("cpu"))["device_seconds"] is None  # no loop timed


def finetuning(run_id, init, pretrained=None, seconds=360.0):
    config = {"init": init, **({"pretrained": pretrained} if pretrained else {})}
    return {"run_id": run_id, "config": config, "device_type": "cuda", "device_seconds": seconds}


def pretraining(run_id, seconds):
    return {"run_id": run_id, "config": {"method": "byol"}, "method_version": "1", "device_type": "cuda",
            "device_seconds": seconds}


def per_case():
    """byol: three fine-tuning runs, two from pre-training p1 and one from p2; scratch: two runs."""
    return table(rows("byol", [0.7, 0.8] * 3), rows("byol", [0.7, 0.7] * 3, seed=1),
                 rows("byol", [0.8, 0.8] * 3, subset=1), rows("scratch", [0.6, 0.7] * 3),
                 rows("scratch", [0.6, 0.6] * 3, seed=1))


def manifests(**changes):
    found = {"byol-unet-0-0": finetuning("byol-unet-0-0", "byol", "p1"),
             "byol-unet-0-1": finetuning("byol-unet-0-1", "byol", "p2"),
             "byol-unet-1-0": finetuning("byol-unet-1-0", "byol", "p1"),
             "scratch-unet-0-0": finetuning("scratch-unet-0-0", "scratch", seconds=720.0),
             "scratch-unet-0-1": finetuning("scratch-unet-0-1", "scratch", seconds=1080.0),
             "p1": pretraining("p1", 3600.0), "p2": pretraining("p2", 7200.0)}
    return {run_id: manifest for run_id, manifest in {**found, **changes}.items() if manifest is not None}


def hours(board, init, column="device_hours"):
    return board.set_index("init").loc[init, column]


def test_a_row_costs_its_mean_pretraining_run_once_plus_its_mean_finetuning_run():
    board = leaderboard(per_case(), manifests(), n_resamples=200)
    # (p1 + p2) / 2, each once though p1 starts two of the three runs, + the mean fine-tuning run
    assert hours(board, "byol", "pretrain_device_hours") == pytest.approx(1.5)
    assert hours(board, "byol") == pytest.approx(1.5 + 0.1)
    assert hours(board, "scratch", "pretrain_device_hours") == 0 and hours(board, "scratch") == pytest.approx(0.25)
    assert set(board.device_type) == {"cuda"}


def test_compute_a_manifest_did_not_record_is_unknown_not_free():
    old = {key: value for key, value in pretraining("p2", 0).items() if not key.startswith("device")}
    board = leaderboard(per_case(), manifests(p2=old), n_resamples=200)
    assert math.isnan(hours(board, "byol", "pretrain_device_hours")) and math.isnan(hours(board, "byol"))
    assert hours(board, "scratch") == pytest.approx(0.25)
    board = leaderboard(per_case(), manifests(**{"scratch-unet-0-1": None}), n_resamples=200)
    assert math.isnan(hours(board, "scratch")) and hours(board, "scratch", "pretrain_device_hours") == 0
    without = leaderboard(per_case(), n_resamples=200)  # no manifests at all: only scratch's 0 is known
    assert without.device_hours.isna().all() and math.isnan(hours(without, "byol", "pretrain_device_hours"))


def test_hours_are_named_after_the_devices_they_ran_on():
    assert hours_title(["cuda", "cuda", None]) == "GPU-hours"
    assert hours_title(["cpu"]) == "CPU-hours"
    assert hours_title(["cuda", "cpu"]) == hours_title(["mixed"]) == hours_title([None]) == "device-hours"

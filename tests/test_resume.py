"""A fine-tuning or pre-training job killed midway resumes from its last checkpoint and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from ssl3d.evaluate.metrics import EmptyPolicy
from ssl3d.evaluate.run import evaluate_run

from conftest import pretrain_config, run_config

STEPS = dict(steps=24, checkpoint_every=4, val_every=6)


def finetune_cli(config, out):
    return [sys.executable, "-m", "ssl3d", "--threads", "1", "finetune", "--run-config", str(config), "--out", str(out),
            "--log-every", "1"]


def kill_after_checkpoint(command, out, stop=signal.SIGKILL, timeout=120) -> int:
    """Send ``stop`` to the job once its first checkpoint is written; its exit status."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert process.poll() is None, f"finished before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(stop)
    return process.wait()


@pytest.mark.slow
def test_killed_run_resumes_and_matches_uninterrupted(tiny_index, tiny_splits, tmp_path):
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, **STEPS)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(finetune_cli(config, straight), check=True, capture_output=True)

    kill_after_checkpoint(finetune_cli(config, resumed), resumed)
    assert not (resumed / "model.pt").exists()  # nothing final was written by the killed job
    saved_step = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["state"]["step"]
    assert 0 < saved_step < STEPS["steps"]
    rerun = subprocess.run(finetune_cli(config, resumed), check=True, capture_output=True, text=True)
    assert f"resuming test from step {saved_step}" in rerun.stderr

    a = torch.load(straight / "model.pt", weights_only=False)
    b = torch.load(resumed / "model.pt", weights_only=False)
    assert a["selected_step"] == b["selected_step"] and a["validation_dice"] == b["validation_dice"]
    for name, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][name]), name
    logs = [pd.read_csv(out / "train_log.csv") for out in (straight, resumed)]
    trained = ["step", "loss", "loss_dice", "loss_ce", "lr", "val_dice"]  # the rest are timings
    pd.testing.assert_frame_equal(logs[0][trained], logs[1][trained])
    assert {"data_s", "forward_s", "backward_s", "peak_memory_mb"} <= set(logs[0].columns)

    tables = [pd.read_csv(evaluate_run(config, out / "model.pt", out / "per_case.csv", 2.0, EmptyPolicy()))
              for out in (straight, resumed)]
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.slow
def test_checkpoint_of_another_run_is_refused(tiny_index, tiny_splits, tmp_path):
    out = tmp_path / "run"
    kill_after_checkpoint(finetune_cli(run_config(tmp_path / "a.json", tiny_index, tiny_splits, run_id="a", **STEPS),
                                       out), out)
    other = run_config(tmp_path / "b.json", tiny_index, tiny_splits, run_id="b", **STEPS)
    result = subprocess.run(finetune_cli(other, out), capture_output=True, text=True)
    assert result.returncode == 1
    assert "checkpoint of run a, not b; delete it to start over" in result.stderr


def pretrain_cli(config, out):
    return [sys.executable, "-m", "ssl3d", "--threads", "1", "pretrain", "--run-config", str(config), "--out",
            str(out), "--log-every", "1"]


# BYOL only: its resumable state (online and EMA target networks, the momentum schedule, LARS) holds everything a
# restoration method such as Models Genesis has; another method would time the same engine path again (~50 s).
@pytest.mark.slow
@pytest.mark.parametrize("method", ["byol"])
def test_killed_pretraining_resumes_and_matches_uninterrupted(method, tiny_index, tmp_path):
    config = pretrain_config(tmp_path / "config.json", tiny_index, method, f"pre-{method}", steps=12,
                             checkpoint_every=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(pretrain_cli(config, straight), check=True, capture_output=True)
    kill_after_checkpoint(pretrain_cli(config, resumed), resumed)
    assert not (resumed / "pretrained.pt").exists()
    subprocess.run(pretrain_cli(config, resumed), check=True, capture_output=True)

    a = torch.load(straight / "pretrained.pt", weights_only=False)["state_dict"]
    b = torch.load(resumed / "pretrained.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    logs = [pd.read_csv(out / "step_log.csv") for out in (straight, resumed)]
    losses = [column for column in logs[0].columns if column.startswith("loss")]
    pd.testing.assert_frame_equal(logs[0][["step", *losses, "lr"]], logs[1][["step", *losses, "lr"]])
    assert {"data_s", "forward_s", "backward_s", "peak_memory_mb"} <= set(logs[0].columns)
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["transfer"]["fractions"]["encoder"] == 1.0


def test_a_pool_takes_the_unlabelled_cases_or_all_of_them(tiny_index):
    from ssl3d.pretrain.loop import pretraining_pool

    files, channels = pretraining_pool([str(tiny_index)], ["unlabelled"])
    assert len(files) == 1 and channels == 1  # the tiny phantom: 5 labelled + 1
    assert len(pretraining_pool([str(tiny_index)] * 2, ["unlabelled", "all"])[0]) == 1 + 6

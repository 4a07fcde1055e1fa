"""Pre-training on several processes (ssl3d.distributed): two processes with half the batch each follow the
one-process trajectory and hold the same weights (EMA targets included), only rank 0 writes, and a torchrun run
killed after its checkpoint resumes on the same trajectory. Gloo on CPU; the batch-norm trajectory needs
SyncBatchNorm, which torch has on CUDA only."""

import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl3d.data.sampling import StepShards
from ssl3d.io import read_json

from conftest import pretrain_config

BASICUNET = {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]}  # instance norm: no statistics across samples
STEPS = 12


def write_config(path, tiny_index, method: str) -> str:
    return str(pretrain_config(path, tiny_index, method, f"pre-{method}", {"patch_size": [32, 32, 32], "batch_size": 4},
                               backbone=BASICUNET, steps=STEPS, checkpoint_every=3))


def process(rank: int, world: int, port: int, config: str, out: str) -> None:
    """One of ``world`` processes of a run on CPU, joined by gloo; saves its method's parameters and the files it
    moved into place (every write of the suite ends in an ``os.replace``, ``ssl3d.io``) to ``<out>.rank<r>.pt``."""
    import ssl3d.pretrain.loop as loop

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    built, moved, build, replace = [], [], loop.build_method, os.replace
    loop.build_method = lambda *args: built.append(build(*args)) or built[-1]
    os.replace = lambda src, dst: moved.append(os.path.relpath(dst, out)) or replace(src, dst)
    loop.pretrain(config, out, log_every=1)
    os.replace = replace
    torch.save({"parameters": {name: param.detach().cpu() for name, param in built[0].named_parameters()},
                "moved": moved}, f"{out}.rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(world: int, config: str, out) -> tuple[pd.DataFrame, list[dict]]:
    """The step log of a run on ``world`` processes, and each process's record."""
    mp.spawn(process, args=(world, free_port(), config, str(out)), nprocs=world)
    return (pd.read_csv(out / "step_log.csv"),
            [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(world)])


def loss_difference(one: pd.DataFrame, two: pd.DataFrame) -> float:
    losses = [column for column in one.columns if column.startswith("loss")]
    assert list(two["step"]) == list(one["step"]) == list(range(1, STEPS + 1))
    return float((one[losses] - two[losses]).abs().to_numpy().max())


def assert_same_parameters(records: list[dict]) -> None:
    first, second = (record["parameters"] for record in records)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_each_process_takes_its_share_of_every_step_batch():
    assert list(StepShards(1, 3, 4)) == list(range(4, 12))  # steps 2 and 3 of batch 4, on one process
    assert [list(StepShards(1, 3, 4, rank, 2)) for rank in range(2)] == [[4, 5, 8, 9], [6, 7, 10, 11]]
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 processes"):
        StepShards(0, 3, 6, 0, 4)


@pytest.fixture(scope="module")
def genesis(tiny_index, tmp_path_factory):
    """Models Genesis on the instance-norm UNet, batch 4: on one process, and on two with 2 samples each."""
    folder = tmp_path_factory.mktemp("genesis")
    config = write_config(folder / "config.json", tiny_index, "models_genesis")
    return config, run(1, config, folder / "one"), run(2, config, folder / "two"), folder / "two"


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(genesis):
    # only the order of float32 sums differs (two half-batch means, their gradients summed by gloo): the losses
    # were 1.1e-8 apart at most over the 12 steps, while they change by 1e-3 to 1e-1 from one step to the next
    _, (one, _), (two, records), _ = genesis
    assert loss_difference(one, two) < 1e-5
    assert_same_parameters(records)


def cli(config: str, out, device: str = "cpu", processes: int = 2) -> list[str]:
    """``ssl3d pretrain`` as the workflow runs it: one process, or ``processes`` under torchrun."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [sys.executable, *(torchrun if processes > 1 else []), "-m", "ssl3d", "--threads", "1", "pretrain",
            "--run-config", config, "--out", str(out), "--device", device, "--log-every", "1"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm has CUDA kernels only; nccl, a GPU each")
def test_with_sync_batch_norm_two_gpus_follow_the_one_gpu_trajectory(tiny_index, tmp_path):
    # BYOL's projector and predictor normalise over the batch: per process that would be over 2 samples, not 4
    # (up to 0.28 apart on CPU, without SyncBatchNorm); bf16 autocast rounds the two runs' activations apart
    config = write_config(tmp_path / "config.json", tiny_index, "byol")
    for processes in (1, 2):
        subprocess.run(cli(config, tmp_path / str(processes), "cuda", processes), check=True, capture_output=True)
    assert loss_difference(*(pd.read_csv(tmp_path / str(n) / "step_log.csv") for n in (1, 2))) < 5e-2


@pytest.mark.slow
def test_every_process_ends_with_the_same_weights_and_only_rank_0_writes(tiny_index, tmp_path):
    # BYOL: its EMA target, outside DDP's reduction, is updated on each process from the same online weights; on
    # CPU its batch norm normalises each process's half of the batch (no SyncBatchNorm), which the weights share
    config = write_config(tmp_path / "config.json", tiny_index, "byol")
    log, records = run(2, config, tmp_path / "run")
    assert_same_parameters(records)
    assert any(name.startswith("target.") for name in records[0]["parameters"])
    assert records[1]["moved"] == []
    assert set(records[0]["moved"]) == {"checkpoints/last.pt", "pretrained.pt", "step_log.csv", "manifest.json"}
    assert len(log) == STEPS and read_json(tmp_path / "run" / "manifest.json")["device_count"] == 2


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_on_the_same_trajectory(genesis, tmp_path):
    config, _, (uninterrupted, _), straight = genesis
    out = tmp_path / "resumed"
    job = subprocess.Popen(cli(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists():
        assert job.poll() is None, f"finished before it could be killed: {job.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    job.terminate()  # as a scheduler ends a job: torchrun passes SIGTERM on to its processes and waits for them
    job.wait()
    assert not (out / "pretrained.pt").exists()

    rerun = subprocess.run(cli(config, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("resuming pre-models_genesis from step") == 1  # rank 0 alone logs progress
    resumed = pd.read_csv(out / "step_log.csv")
    trained = "^(step|loss|lr)"  # the rest are timings
    pd.testing.assert_frame_equal(resumed.filter(regex=trained), uninterrupted.filter(regex=trained))
    a, b = (torch.load(folder / "pretrained.pt", weights_only=False)["state_dict"] for folder in (straight, out))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints", "manifest.json", "pretrained.pt",
                                                           "step_log.csv"]

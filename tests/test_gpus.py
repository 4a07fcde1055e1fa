"""Distinct GPUs for concurrent local jobs (ssl3d.gpus), with fake device ids: no GPU is needed to claim one."""

import os
import subprocess
import sys
import time

import pytest

CLAIM = ("import os, sys, time; from ssl3d.gpus import claim_gpus; claim_gpus(int(sys.argv[2]), poll_s=0.05); "
         "print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[1]))")


def start(tmp_path, hold_s: float, devices: str = "3,5", count: int = 1) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices, "SSL3D_GPU_LOCKS": str(tmp_path / "locks")}
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(hold_s), str(count)], env=env, stdout=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_concurrent_jobs_get_distinct_devices_and_a_killed_job_frees_its_device(tmp_path):
    first, second = start(tmp_path, 30), start(tmp_path, 30)
    claimed = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert claimed == {"3", "5"}
    third = start(tmp_path, 0)
    time.sleep(1.0)
    assert third.poll() is None  # both devices claimed: it waits
    first.kill()  # a crashed job: the kernel drops its lock
    first.wait()
    assert third.stdout.readline().strip() in claimed and third.wait(timeout=30) == 0
    second.kill()
    second.wait()


@pytest.mark.slow
def test_a_multi_gpu_job_claims_its_devices_and_its_command_holds_them(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SSL3D_GPU_LOCKS": str(tmp_path / "locks")}
    job = subprocess.Popen([sys.executable, "-m", "ssl3d.gpus", "2", sys.executable, "-c",
                            "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"],
                           env=env, stdout=subprocess.PIPE, text=True)
    pair = set(job.stdout.readline().strip().split(","))
    other = start(tmp_path, 0, "0,1,2,3", count=2)
    assert len(pair) == 2 and set(other.stdout.readline().strip().split(",")) == {"0", "1", "2", "3"} - pair
    other.wait()
    job.kill()
    job.wait()


def test_as_many_offered_devices_as_wanted_or_none_need_no_claim(tmp_path, monkeypatch):
    from ssl3d.gpus import claim_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert claim_gpus(1, tmp_path) == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_gpus(1, tmp_path) == []


def test_fewer_offered_devices_than_wanted_is_an_error_not_an_oversubscribed_job(tmp_path, monkeypatch):
    from ssl3d.gpus import claim_gpus, main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError, match=r"asks for 4 GPUs and the machine offers 1 \(0: CUDA_VISIBLE_DEVICES"):
        claim_gpus(4, tmp_path)
    with pytest.raises(SystemExit, match=r"^ssl3d\.gpus: this job asks for 2 GPUs"):
        main(["2", "true"])

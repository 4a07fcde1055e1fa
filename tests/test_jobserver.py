"""A command run by the job server's worker behaves as it does in its own process: same output, exit status and
results; signals reach the worker, a killed client takes its worker with it, and without a server the command
runs in its own process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch

from ssl3d import jobserver

from conftest import needs_job_server, run_config
from test_resume import finetune_cli, kill_after_checkpoint

# prints, at the client's exit, whether the client imported torch itself (it does not when a worker ran the command)
CLIENT = ("import atexit, sys; atexit.register(lambda: print('client imported torch:', 'torch' in sys.modules, "
          "file=sys.stderr)); from ssl3d.cli import run; sys.argv[0] = 'ssl3d'; run()")


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    jobserver.start(tmp_path_factory.mktemp("server") / "server.log")
    yield jobserver._server
    jobserver.stop()


def ssl3d(*args, served=True, **kwargs):
    env = dict(os.environ) if served else {**os.environ, jobserver.VARIABLE: "off"}
    return subprocess.run([sys.executable, "-c", CLIENT, *args], capture_output=True, text=True, env=env, **kwargs)


def workers_end(server, timeout=20):
    """The server's monitors and workers have all ended (each monitor ends with its worker)."""
    deadline = time.monotonic() + timeout
    while psutil.Process(server.pid).children(recursive=True):
        assert time.monotonic() < deadline, "a worker outlived its job"
        time.sleep(0.05)


@needs_job_server
def test_commands_print_and_fail_as_in_their_own_process(job_server):
    served, alone = ssl3d("methods"), ssl3d("methods", served=False)
    assert "client imported torch: False" in served.stderr and "client imported torch: True" in alone.stderr
    assert served.returncode == alone.returncode == 0 and served.stdout == alone.stdout and "hybridmim" in served.stdout
    served, alone = ssl3d("no-such-command"), ssl3d("no-such-command", served=False)
    assert served.returncode == alone.returncode == 2 and "invalid choice: 'no-such-command'" in served.stderr


@needs_job_server
def test_without_a_usable_server_the_command_runs_in_its_own_process(job_server, tmp_path):
    served = json.loads(os.environ[jobserver.VARIABLE])
    gone, other = {**served, "socket": str(tmp_path / "gone")}, {**served, "identity": "another checkout"}
    for setting in (json.dumps(gone), json.dumps(other), "0", ""):  # "0", "": set by a user, no server started
        result = subprocess.run([sys.executable, "-c", CLIENT, "methods"], capture_output=True, text=True,
                                env={**os.environ, jobserver.VARIABLE: setting})
        assert result.returncode == 0 and "client imported torch: True" in result.stderr


@needs_job_server
@pytest.mark.slow
def test_a_served_run_matches_its_own_process_through_signals_and_resumes(job_server, tiny_index, tiny_splits,
                                                                          tmp_path):
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, steps=16, checkpoint_every=4, val_every=8)
    alone, served = tmp_path / "alone", tmp_path / "served"
    subprocess.run(finetune_cli(config, alone), check=True, capture_output=True,
                   env={**os.environ, jobserver.VARIABLE: "off"})
    for stop in (signal.SIGTERM, signal.SIGKILL):  # Snakemake stopping a job; the client killed outright
        shutil.rmtree(served / "checkpoints", ignore_errors=True)  # each killed after a checkpoint of its own
        assert kill_after_checkpoint(finetune_cli(config, served), served, stop) == -stop
        workers_end(job_server)
        assert not (served / "model.pt").exists()
    rerun = subprocess.run(finetune_cli(config, served), check=True, capture_output=True, text=True)
    assert "resuming test from step" in rerun.stderr

    logs = [pd.read_csv(out / "train_log.csv") for out in (alone, served)]
    trained = ["step", "loss", "loss_dice", "loss_ce", "lr", "val_dice"]
    pd.testing.assert_frame_equal(logs[0][trained], logs[1][trained])
    weights = [torch.load(out / "model.pt", weights_only=False)["weights"] for out in (alone, served)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.parametrize("lacking", ["a temporary folder", "pidfds"])
def test_a_server_that_cannot_start_leaves_the_jobs_to_run_alone(lacking, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(jobserver.VARIABLE, raising=False)
    monkeypatch.setattr(jobserver, "_server", None)  # this module's server, if started, is not this test's
    if lacking == "pidfds":  # Linux before 5.3, other systems
        monkeypatch.delattr("os.pidfd_open")
    else:
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
    jobserver.start(tmp_path / "server.log")
    assert jobserver._server is None and jobserver.VARIABLE not in os.environ
    assert "no job server" in capsys.readouterr().err


def test_a_worker_takes_the_threads_a_new_process_would_take_from_its_environment():
    """The server's libraries loaded with its own thread counts (all cores); a job's worker runs with its job's."""
    code = ("import os, threadpoolctl, torch; os.environ['OMP_NUM_THREADS'] = '1'; "
            "from ssl3d.jobserver import threads_from_environment; threads_from_environment(); "
            "print(torch.get_num_threads(), sorted({pool['num_threads'] for pool in threadpoolctl.threadpool_info()}))")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["1", "[1]"]


def test_a_request_split_anywhere_by_the_socket_is_read_whole():
    """A request whose first read holds only part of its length (the streams' descriptors end a read)."""
    request = {"argv": ["methods"], "cwd": "/"}
    body = json.dumps(request).encode()
    message = jobserver.STATUS.pack(len(body)) + body
    client, server = socket.socketpair()
    server.settimeout(10)  # a reader that lost bytes waits for them: fail, not hang
    with client, server:
        socket.send_fds(client, [message[:2]], [0, 1, 2])
        client.sendall(message[2:])
        received, fds = jobserver._receive(server)
        for fd in fds:
            os.close(fd)
    assert received == request and len(fds) == 3

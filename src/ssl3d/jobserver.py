"""Local jobs start as forks of one process that has already imported torch and MONAI.

Why: every Snakemake job is ``python -m ssl3d ...``, and importing torch, MONAI and torch._dynamo (which every torch
optimizer imports when it is built) takes about 6 s on 2 cores, half of a demo fine-tuning job; the demo runs 40
jobs. A local run of the workflow therefore starts one server (the Snakefile's ``onstart``) that imports them once;
``python -m ssl3d`` finds it through ``SSL3D_JOB_SERVER`` and hands it the command line, working directory,
environment and standard streams, and the server forks a worker that runs the command as the process would have
(its own random seeds, signals and exit status). The client exits as the worker did; a signal it receives (Snakemake
stopping a job, Ctrl-C) goes on to the worker, and a client that dies, even by SIGKILL, takes its worker with it.
A demo fine-tuning job takes 6.5 s instead of 11.8 (median), the demo 162 s instead of 273, with the same results
(``benchmarks/demo_wall_time.py`` with and without ``SSL3D_JOB_SERVER=off``, 2 AVX-512 cores). Snakemake's
``benchmark:`` files time a served job whole but measure the memory and CPU of its client only (the step logs and
manifests record the worker's own peak memory).

Where no server serves the process (a command typed by hand, a cluster node, a ``--use-conda`` environment, another
Python or checkout, a GPU job, torchrun's processes, a system without pidfds: Linux before 5.3, macOS) the command
runs in its own process as before: CUDA must not be initialised before a fork, and a GPU job's start-up is small
beside its training. ``SSL3D_JOB_SERVER=off`` turns the server off.

Hand-written: multiprocessing's forkserver serves the pools of one parent program, not independent command lines.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

VARIABLE = "SSL3D_JOB_SERVER"
# what the commands of the workflow's jobs import (torch._dynamo: when their optimizer is built)
PRELOAD = ("torch", "torch._dynamo", "monai", "ssl3d.data.acquire", "ssl3d.data.cache", "ssl3d.finetune.train",
           "ssl3d.pretrain.loop", "ssl3d.evaluate.run", "ssl3d.analysis.aggregate", "ssl3d.report.build")
STATUS = struct.Struct("!i")
# imports make millions of long-lived objects: a collection every 50,000 new objects, not Python's 700 (ssl3d.cli.run)
GC_THRESHOLD = 50_000
_server: subprocess.Popen | None = None  # the server this process started


def identity() -> str:
    """Which Python and which checkout a process runs: a client uses only a server that runs the same."""
    import ssl3d

    return json.dumps([sys.prefix, sys.version, str(Path(ssl3d.__file__).parent), os.environ.get("PYTHONPATH")])


def available() -> bool:
    """Whether a server can run here: its monitors wait for their workers on pidfds (Linux 5.3 and later)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def start(log: Path) -> None:
    """Start a server for this process's jobs (they inherit ``SSL3D_JOB_SERVER``); it preloads in the background
    (jobs that connect meanwhile wait for it, no longer than they would import) and ends with this process."""
    global _server
    if os.environ.get(VARIABLE) == "off":
        return
    if not available():
        print("note: no job server (it needs pidfds: Linux 5.3 or later); each job starts its own Python",
              file=sys.stderr)
        return
    try:
        path = os.path.join(tempfile.mkdtemp(prefix="ssl3d-jobs-"), "socket")  # short: at most 107 characters
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as stream:
            _server = subprocess.Popen([sys.executable, "-m", "ssl3d.jobserver", path, str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=stream, stderr=stream, start_new_session=True)
    except OSError as err:  # no temporary folder or log: the jobs run on their own
        print(f"note: no job server ({err}); each job starts its own Python", file=sys.stderr)
        return
    os.environ[VARIABLE] = json.dumps({"socket": path, "identity": identity()})


def stop() -> None:
    """Stop the server that :func:`start` started, if any (jobs still running finish: their workers outlive it),
    and remove its socket."""
    global _server
    if _server is None:
        return
    _server.terminate()
    _server.wait()
    _server = None
    shutil.rmtree(Path(json.loads(os.environ.pop(VARIABLE))["socket"]).parent, ignore_errors=True)


def serve(path: str, parent: int) -> None:
    """Listen first, so that jobs can queue while the imports run; serve while the starting process lives."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    gc.set_threshold(GC_THRESHOLD)
    start = time.perf_counter()
    for name in PRELOAD:
        importlib.import_module(name)
    print(f"serving {path}: imported {', '.join(PRELOAD)} in {time.perf_counter() - start:.1f} s", flush=True)
    gc.freeze()  # out of the collector's sight, so that no worker's collection copies their pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors
    listener.settimeout(1.0)
    while os.getppid() == parent:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        _fork(listener, _monitor, connection)
        connection.close()


def _fork(close: socket.socket, child, *args) -> int:
    """Fork; the child closes its copy of ``close``, runs ``child(*args)`` and exits, whatever it raises (it must
    never return into its parent's code)."""
    pid = os.fork()
    if pid == 0:
        try:
            close.close()
            child(*args)
        finally:
            os._exit(1)
    return pid


def _read(connection: socket.socket, size: int, data: bytes = b"") -> bytes:
    """``size`` bytes from the connection, of which ``data`` were read already."""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the other end closed the connection")
        data += chunk
    return data


def _read_int(connection: socket.socket) -> int:
    return STATUS.unpack(_read(connection, STATUS.size))[0]


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """A client's request (length, then JSON) and the standard streams that came with it."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    data = _read(connection, STATUS.size, data)
    size = STATUS.unpack(data[:STATUS.size])[0]
    return json.loads(_read(connection, STATUS.size + size, data)[STATUS.size:]), fds


def _monitor(connection: socket.socket) -> None:
    """One job: fork its worker, tell the client the worker's pid, kill the worker if the client goes away (the
    client sends nothing more, so its end of the connection turns readable only when it closes), and send the
    client the worker's wait status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _receive(connection)
    worker = _fork(connection, _work, request, fds)
    for fd in fds:
        os.close(fd)
    print(f"job {worker}: ssl3d {' '.join(request['argv'][1:])}", flush=True)
    with contextlib.suppress(OSError):  # a client gone already: the select below sees it
        connection.sendall(STATUS.pack(worker))
    ended = os.pidfd_open(worker)
    if ended not in select.select([connection, ended], [], [])[0]:
        os.kill(worker, signal.SIGKILL)
    _, status = os.waitpid(worker, 0)
    print(f"job {worker}: exit status {os.waitstatus_to_exitcode(status)}", flush=True)
    with contextlib.suppress(OSError):
        connection.sendall(STATUS.pack(status))
    os._exit(0)


def _work(request: dict, fds: list[int]) -> None:
    """Become the process that ``python -m ssl3d`` would have started, run the command and exit."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # the job's TMPDIR, not the server's
    sys.argv = request["argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import numpy
    import torch

    random.seed()  # a new process's generators: Python's and numpy's from the system's entropy, torch's at its
    numpy.random.seed()  # fixed default
    torch.manual_seed(torch.initial_seed())
    threads_from_environment()
    from ssl3d.cli import main

    code = 1
    try:
        code = main(sys.argv[1:])
    except SystemExit as err:  # argparse: --help, a bad argument
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
    except BaseException:  # the traceback a process would print, into the job's log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def threads_from_environment() -> None:
    """The threads of OpenMP (torch's CPU kernels) and of the BLAS (numpy's) that a new process would take from
    ``OMP_NUM_THREADS`` (Snakemake sets it per job): those libraries read it when they load, which in a worker
    was in the server."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import threadpoolctl
        import torch

        threadpoolctl.threadpool_limits(int(threads))
        torch.set_num_threads(int(threads))


def run_in_server(argv: list[str]) -> int | None:
    """Run ``ssl3d <argv>`` in a worker of the server and return its exit code, or end this process as a signal
    ended the worker; None where no server serves this process (the caller then runs the command itself)."""
    if any(arg.startswith("cuda") for arg in argv) or "LOCAL_RANK" in os.environ:
        return None
    try:
        server = json.loads(os.environ.get(VARIABLE, "off"))
    except ValueError:  # unset, off, or a value that no server wrote
        return None
    if not isinstance(server, dict) or server.get("identity") != identity():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(server["socket"])
        request = json.dumps({"argv": sys.argv[:1] + argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(connection, [STATUS.pack(len(request)) + request], [0, 1, 2])
        worker = _read_int(connection)
    except OSError:
        return None  # the server is gone or could not start (its log says why): this process runs the command

    def forward(number, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, number)

    for forwarded in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(forwarded, forward)
    try:
        code = os.waitstatus_to_exitcode(_read_int(connection))
    except OSError:
        print(f"ssl3d: the job server ended before job {worker} did", file=sys.stderr)
        return 1
    if code < 0:  # end as the worker did, so that the caller sees the signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))

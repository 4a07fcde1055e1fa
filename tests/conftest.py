"""Shared fixtures: a tiny phantom dataset, preprocessed and split, built once per test session; a loopback HTTP
server for the download tests (nothing ever reaches the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from ssl3d import jobserver
from ssl3d.data.cache import preprocess_dataset
from ssl3d.data.phantom import write_phantom_dataset
from ssl3d.data.recipes import get_recipe
from ssl3d.data.splits import make_splits
from ssl3d.io import write_json

REPO = Path(__file__).resolve().parents[1]
# One real CT with organ labels, committed with its attribution (tests/data/totalsegmentator-example/README.md).
SHARED_CT = REPO / "tests" / "data" / "totalsegmentator-example"
# The papers' text extractions are not redistributed with the suite: the checks of the published numbers against
# them run where they are (../shared/papers beside the checkout, as in CI, or $SSL3D_PAPERS) and skip elsewhere.
SHARED_PAPERS = Path(os.environ.get("SSL3D_PAPERS", REPO.parent / "shared" / "papers"))
MICRO = yaml.safe_load((REPO / "config" / "experiments" / "micro.yaml").read_text())
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())  # shared: copy it before editing
TINY_SHAPE = (64, 64, 32)
TINY_RECIPE = {"name": "tiny_ct", "spacing": [4.0, 4.0, 4.0], "crop_foreground_above": -500, "window": [-175, 250]}


# The job server needs pidfds (Linux 5.3 and later): elsewhere the workflow runs every job in its own process, which
# the rest of the suite covers, and there is no served job to check.
needs_job_server = pytest.mark.skipif(not jobserver.available(), reason="the job server needs pidfds (Linux 5.3 or "
                                      "later), which this system lacks: it does not start here and every job runs in "
                                      "its own process, as the other workflow tests check")


# Modules whose tests are independent and long, with no module-scoped fixture: spread test by test (below).
SPREAD = {"test_backbone_contract.py", "test_cli.py", "test_engine.py", "test_method_contract.py", "test_released.py",
          "test_resume.py", "test_workflow_config.py", "test_workflow_dags.py"}


def pytest_configure(config):
    """Each of pytest-xdist's workers computes with its share of the cores: two workers of two threads each on two
    cores spend their time waiting for each other's threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    torch.set_num_threads(max((os.cpu_count() or 1) // workers, 1))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (the README's command), with the modules in ``SPREAD`` handed out test by test: a module
    is one work unit so that its module-scoped fixtures (the micro workflow run, the distributed runs) are built once,
    but whole long modules scheduled last kept one worker busy alone for minutes. xdist hands out the units with most
    tests first, then the single tests in collection order (:func:`pytest_collection_modifyitems`)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndSpreadTests(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if Path(module).name in SPREAD else module

    return ModulesAndSpreadTests(config, log)


def pytest_collection_modifyitems(items):
    """The spread ``slow`` tests first: the longest single tests start early and the short ones fill in at the end,
    so the two workers finish together. Every other module's tests keep their order, next to each other."""
    items.sort(key=lambda item: item.path.name not in SPREAD or item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_labelled=5, n_unlabelled=1, seed=0, shape=TINY_SHAPE, spacing=(2.0, 2.0, 3.0))
    return root


@pytest.fixture(scope="session")
def tiny_index(phantom_root, tmp_path_factory) -> Path:
    return preprocess_dataset(phantom_root, get_recipe(TINY_RECIPE), tmp_path_factory.mktemp("cache") / "phantom")


@pytest.fixture(scope="session")
def tiny_splits(tiny_index) -> Path:
    cases = [case_id for case_id, case in json.loads(tiny_index.read_text())["cases"].items() if case["labelled"]]
    path = tiny_index.parent / "splits.json"
    write_json(path, make_splits(cases, seed=0, n_validation=1, n_test=1, label_fractions=[0.5, 1.0], n_subsets=1))
    return path


def run_config(path: Path, index: Path, splits: Path, run_id: str = "test", **overrides) -> Path:
    """A run config as the workflow writes it, for a few steps of a very small UNet."""
    spec = {
        "dataset": "phantom", "protocol": "finetune", "init": "scratch", "label_fraction": 1.0, "subset": 0,
        "seed": 0, "backbone": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0}, "steps": 12, "batch_size": 2,
        "patch_size": [24, 24, 16], "pos_neg_ratio": [1, 1], "val_every": 6, "checkpoint_every": 4,
        "inference": {"roi_size": [24, 24, 16], "overlap": 0.25, "sw_batch_size": 2},
        **overrides,
    }
    write_json(path, {"run_id": run_id, "spec": spec, "inputs": {"cache": str(index), "splits": str(splits)}})
    return path


def pretrain_config(path: Path, index: Path, method: str = "models_genesis", run_id: str = "pre",
                    method_config: dict | None = None, **overrides) -> Path:
    """A pre-training run config as the workflow writes it: ``method`` on a very small BasicUNet over the phantom
    pool of the cache ``index``, 32³ regions two at a time unless ``method_config`` says otherwise."""
    spec = {"method": method, "method_config": method_config or {"patch_size": [32, 32, 32], "batch_size": 2},
            "backbone": {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]}, "seed": 0, "steps": 2,
            "checkpoint_every": 2, "pool": [{"dataset": "phantom", "data": {}}], **overrides}
    write_json(path, {"run_id": run_id, "spec": spec, "inputs": {"caches": [str(index)]}})
    return path


class Server(ThreadingHTTPServer):
    """Serves ``files`` by path; records each request's Range header; can drop a response after some bytes."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []  # the Range header of every request, None when absent
        self.honour_range = True
        self.drop_after: int | None = None  # applies to the next response only

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self):
        self.server.ranges.append(self.headers.get("Range"))
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and self.server.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.drop_after is not None:
            body, self.server.drop_after = body[:self.server.drop_after], None
        self.wfile.write(body)  # the connection closes when the handler returns (HTTP/1.0)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # never route loopback requests through a proxy from the environment
    server = Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def rewrite(path: Path, change) -> None:
    """Save ``change(voxels)`` in place of the NIfTI at ``path``, keeping its geometry (a file edited in place)."""
    image = nib.load(path)
    voxels = change(np.asarray(image.dataobj).copy())
    header = image.header.copy()
    header.set_data_dtype(voxels.dtype)
    nib.save(nib.Nifti1Image(voxels, image.affine, header), path)


def snakemake(workdir: Path, config: dict, *args, sort_keys: bool = True) -> subprocess.CompletedProcess:
    """The workflow on ``config`` (written to ``workdir/config.yaml``) in ``workdir`` on 2 cores, output captured."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=sort_keys))
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(path), "--cores", "2", *args],
                          capture_output=True, text=True)

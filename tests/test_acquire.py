"""The data stages end to end on a loopback server: fetch -> verify -> extract -> convert -> preprocess, with a
tiny MSD-layout archive built here and a registry entry pointing at it (the ``server`` fixture of conftest); and
the errors of each stage."""

import hashlib
import io
import shutil
import tarfile

import pytest
import yaml

from ssl3d.data import acquire
from ssl3d.data.cache import preprocess_dataset, read_index
from ssl3d.data.dataset import read_dataset
from ssl3d.data.fetch import ManualDataMissing, VerificationError
from ssl3d.data.phantom import write_phantom_dataset
from ssl3d.data.recipes import get_recipe
from ssl3d.data.registry import read_registry

from conftest import TINY_RECIPE


def msd_tar(tmp_path) -> bytes:
    """A Decathlon-style task archive (Task99_Tiny/dataset.json, imagesTr, labelsTr, imagesTs) of real phantom
    volumes, with the macOS junk the real tars carry."""
    write_phantom_dataset(tmp_path / "Task99_Tiny", n_labelled=3, n_unlabelled=1, seed=0, shape=(48, 48, 24),
                          spacing=(2.0, 2.0, 3.0))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "Task99_Tiny", arcname="Task99_Tiny")
        junk = tarfile.TarInfo("Task99_Tiny/imagesTr/._phantom_000.nii.gz")
        junk.size = 4
        tar.addfile(junk, io.BytesIO(b"\x00\x05\x16\x07"))
    return buffer.getvalue()


@pytest.fixture
def registry(server, tmp_path, monkeypatch):
    """Two entries in a registry file of the real schema: an automatic archive on the loopback server and a
    manual dataset; ``acquire`` reads them instead of the suite's registry."""
    data = msd_tar(tmp_path / "build")
    server.files["Task99_Tiny.tar"] = data
    entries = {
        "tiny": {"title": "tiny task", "used_by": [{"paper": "hybridmim", "role": "downstream"}], "modality": "CT",
                 "access": "automatic", "licence": "CC-BY-SA 4.0", "redistributable": True, "size_gb": None,
                 "archives": [{"name": "Task99_Tiny.tar", "urls": [server.url("Task99_Tiny.tar")], "size": len(data),
                               "md5": None, "sha256": hashlib.sha256(data).hexdigest()}],
                 "layout": "msd", "labels": {0: "background"}, "expected": {"labelled": 3, "unlabelled": 1}},
        "handmade": {"title": "a manual dataset", "used_by": [{"paper": "pgl", "role": "downstream"}],
                     "modality": "CT", "access": "manual", "licence": "by agreement", "redistributable": False,
                     "size_gb": None, "archives": [], "layout": "images_folder", "labels": {0: "background"},
                     "expected": {"labelled": 0, "unlabelled": 2}, "verify": {"*.nii.gz": 2},
                     "instructions": "Register at example.org, download scans.zip and unpack it."},
    }
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(entries))
    known = read_registry(path)
    monkeypatch.setattr(acquire, "get_entry", lambda name: known[name])
    return known


def test_fetch_verify_extract_convert_preprocess(registry, tmp_path, server):
    root = tmp_path / "data"
    verified = acquire.fetch_dataset("tiny", {"source": "registry"}, root)
    assert verified == root / "sources" / "tiny" / "verified.json"
    dataset_json = acquire.prepare_dataset("tiny", {"source": "registry"}, root)
    dataset = read_dataset(dataset_json.parent)
    assert len(dataset.labelled) == 3 and len(dataset.unlabelled) == 1  # the ._ file is gone
    index = preprocess_dataset(dataset_json.parent, get_recipe(TINY_RECIPE), root / "preprocessed" / "tiny")
    assert len(read_index(index)["cases"]) == 4
    requests = len(server.ranges)
    acquire.fetch_dataset("tiny", {"source": "registry"}, root)  # verified archives are not downloaded again
    assert len(server.ranges) == requests
    shutil.rmtree(root / "sources" / "tiny")  # what Snakemake does before a forced rerun of the fetch job
    assert acquire.fetch_dataset("tiny", {"source": "registry"}, root) == verified
    assert len(server.ranges) == requests  # the kept folder still had the verified archive and its extraction
    assert read_dataset(acquire.prepare_dataset("tiny", {"source": "registry"}, root).parent).labelled


def test_a_corrupt_download_stops_before_anything_is_marked_verified(registry, tmp_path, server):
    server.files["Task99_Tiny.tar"] = server.files["Task99_Tiny.tar"][:-1] + b"!"
    with pytest.raises(VerificationError, match="sha256"):
        acquire.fetch_dataset("tiny", {"source": "registry"}, tmp_path / "data")
    sources = tmp_path / "data" / "sources" / "tiny"
    assert not (sources / "verified.json").exists() and not (sources / "Task99_Tiny.tar").exists()


def test_a_manual_dataset_is_verified_where_the_user_put_it_or_named_with_its_instructions(registry, tmp_path):
    copy = tmp_path / "my_copy"
    with pytest.raises(ManualDataMissing, match=r"handmade: no copy found at .*my_copy.*\n.*example.org"):
        acquire.fetch_dataset("handmade", {"source": "registry", "path": str(copy)}, tmp_path / "data")
    copy.mkdir()
    write_phantom_dataset(tmp_path / "gen", n_labelled=3, n_unlabelled=0, seed=0, shape=(48, 48, 24))
    for n in range(2):
        (copy / f"scan{n}.nii.gz").write_bytes((tmp_path / "gen" / "imagesTr" / f"phantom_00{n}.nii.gz").read_bytes())
    acquire.fetch_dataset("handmade", {"source": "registry", "path": str(copy)}, tmp_path / "data")
    assert (tmp_path / "data" / "manifests" / "handmade.json").exists()  # trust on first use
    dataset = read_dataset(acquire.prepare_dataset("handmade", {"source": "registry"}, tmp_path / "data").parent)
    assert [case.case_id for case in dataset.unlabelled] == ["scan0", "scan1"]
    (copy / "scan1.nii.gz").write_bytes(b"changed")
    with pytest.raises(VerificationError, match="scan1.nii.gz"):
        acquire.fetch_dataset("handmade", {"source": "registry", "path": str(copy)}, tmp_path / "data")


def test_your_own_folder_becomes_a_dataset(tmp_path):
    write_phantom_dataset(tmp_path / "mine", n_labelled=3, n_unlabelled=1, seed=0, shape=(48, 48, 24))
    settings = {"source": "folder", "images": str(tmp_path / "mine" / "imagesTr"),
                "labels": str(tmp_path / "mine" / "labelsTr")}
    dataset = read_dataset(acquire.prepare_dataset("mine", settings, tmp_path / "data").parent)
    assert len(dataset.labelled) == 3 and not dataset.unlabelled

"""Download, verification and safe extraction, against tiny archives served from a loopback HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from ssl3d.data.fetch import (DownloadError, FetchError, ManualDataMissing, UnsafeArchiveError, VerificationError,
                              download, safe_extract, verify_file, verify_manual)

# MSD layout, with the macOS junk the real tars carry
MSD = {
    "Task09_Spleen/dataset.json": json.dumps({"name": "Spleen", "training": [
        {"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}]}).encode(),
    "Task09_Spleen/imagesTr/spleen_1.nii.gz": gzip.compress(b"not really a nifti image " * 40, mtime=0),
    "Task09_Spleen/labelsTr/spleen_1.nii.gz": gzip.compress(b"not really a nifti label " * 40, mtime=0),
    "Task09_Spleen/imagesTr/._spleen_1.nii.gz": b"\x00\x05\x16\x07AppleDouble",
    "__MACOSX/Task09_Spleen/._dataset.json": b"\x00\x05\x16\x07AppleDouble",
}
KEPT = sorted(name for name in MSD if "._" not in name)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, target in (links or {}).items():  # links first, so that members can be written through them
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def archive(server) -> tuple[str, bytes, dict]:
    data = tar_bytes(MSD)
    server.files["Task09_Spleen.tar.gz"] = data
    pins = {"size": len(data), "md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    return server.url("Task09_Spleen.tar.gz"), data, pins


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_download_verifies_and_lands(server, archive, tmp_path):
    url, data, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    assert download([url], dest, **pins) == dest
    assert dest.read_bytes() == data
    assert leftovers(tmp_path) == [dest.name]
    assert verify_file(dest, **pins) == {"file": str(dest), **pins}
    # already there and verified: no second request
    assert download([url], dest, **pins) == dest
    assert len(server.ranges) == 1


@pytest.mark.parametrize("wrong", ["size", "md5", "sha256"])
def test_wrong_pin_raises_and_leaves_nothing(archive, tmp_path, wrong):
    url, data, pins = archive
    pins[wrong] = pins[wrong] + 1 if wrong == "size" else "0" * len(pins[wrong])
    dest = tmp_path / "Task09_Spleen.tar.gz"
    with pytest.raises(VerificationError) as err:
        download([url], dest, **pins)
    message = str(err.value)
    assert str(dest) in message and f"expected {pins[wrong]}" in message and "different version" in message
    if wrong != "size":
        assert f"got {hashlib.new(wrong, data).hexdigest()}" in message
    assert leftovers(tmp_path) == []


def test_existing_file_that_fails_is_not_overwritten(server, archive, tmp_path):
    url, _, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    dest.write_bytes(b"something else")
    with pytest.raises(VerificationError, match="Delete it and re-run"):
        download([url], dest, **pins)
    assert dest.read_bytes() == b"something else" and server.ranges == []


def test_truncated_download_resumes_with_range(server, archive, tmp_path):
    url, data, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    server.drop_after = 100
    with pytest.raises(DownloadError, match="re-run to resume"):
        download([url], dest, **pins)
    assert leftovers(tmp_path) == [dest.name + ".part"]
    assert (tmp_path / (dest.name + ".part")).read_bytes() == data[:100]
    download([url], dest, **pins)
    assert server.ranges == [None, "bytes=100-"]
    assert dest.read_bytes() == data and leftovers(tmp_path) == [dest.name]


def test_server_ignoring_range_restarts(server, archive, tmp_path):
    url, data, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    server.drop_after = 100
    with pytest.raises(DownloadError):
        download([url], dest, **pins)
    server.honour_range = False
    download([url], dest, **pins)
    assert server.ranges == [None, "bytes=100-"]
    assert dest.read_bytes() == data


def test_unsatisfiable_range_restarts(server, archive, tmp_path):
    """A .part as long as the file, with no size pinned (a run stopped while hashing): the server answers 416."""
    url, data, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    (tmp_path / (dest.name + ".part")).write_bytes(data)
    download([url], dest, sha256=pins["sha256"])
    assert server.ranges == [f"bytes={len(data)}-", None]
    assert dest.read_bytes() == data


def test_mirror_fallback(server, archive, tmp_path):
    url, data, pins = archive
    dest = tmp_path / "Task09_Spleen.tar.gz"
    server.files["other.tar.gz"] = b"another release"
    # a 404, then a mirror serving something else (deleted), then the good one
    download([server.url("missing.tar.gz"), server.url("other.tar.gz"), url], dest, **pins)
    assert dest.read_bytes() == data and leftovers(tmp_path) == [dest.name]
    with pytest.raises(DownloadError, match="404") as err:
        download([server.url("missing.tar.gz"), server.url("gone.tar.gz")], tmp_path / "x.tar.gz", **pins)
    assert "missing.tar.gz" in str(err.value) and "gone.tar.gz" in str(err.value)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_extract_drops_macos_junk(tmp_path, kind):
    archive = tmp_path / f"Task09_Spleen.{'tar.gz' if kind == 'tar' else 'zip'}"
    archive.write_bytes(tar_bytes(MSD) if kind == "tar" else zip_bytes(MSD))
    dest = tmp_path / "extracted"
    files = safe_extract(archive, dest)
    assert files == [dest / name for name in KEPT]
    assert sorted(path.relative_to(dest).as_posix() for path in dest.rglob("*") if path.is_file()) == KEPT
    assert not (dest / "__MACOSX").exists()
    assert (dest / KEPT[0]).read_bytes() == MSD[KEPT[0]]
    assert leftovers(tmp_path) == [archive.name, "extracted"]


def test_zip_link_inside_is_kept(tmp_path):
    archive = tmp_path / "links.zip"
    archive.write_bytes(zip_bytes({"data/a.txt": b"a"}, links={"data/b.txt": "a.txt"}))
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/data/b.txt").is_symlink() and (tmp_path / "out/data/b.txt").read_bytes() == b"a"


@pytest.mark.parametrize("kind, member", [("tar", "../evil"), ("zip", "/abs/evil"), ("zip", "../evil"),
                                          ("zip-link", "data/evil"), ("zip-link-chain", "d/evil")])
def test_unsafe_member_raises_and_extracts_nothing(tmp_path, kind, member):
    good = {"Task09_Spleen/dataset.json": b"{}"}
    archive = tmp_path / "work" / "bad.archive"
    archive.parent.mkdir()
    if kind == "tar":
        archive.write_bytes(tar_bytes({**good, member: b"pwned"}))
    elif kind == "zip":
        archive.write_bytes(zip_bytes({**good, member: b"pwned"}))
    elif kind == "zip-link":
        archive.write_bytes(zip_bytes(good, links={member: "../../evil"}))
    else:  # each link stays inside when it is made, but once x -> . exists, d -> x/.. points at the parent
        archive.write_bytes(zip_bytes({**good, member: b"pwned"}, links={"d": "x/..", "x": "."}))
    dest = tmp_path / "work" / "extracted"
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(member))):
        safe_extract(archive, dest)
    assert leftovers(archive.parent) == ["bad.archive"]
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()


def test_extract_refuses_non_empty_dest(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"x.txt": b"x"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FetchError, match="not empty"):
        safe_extract(archive, tmp_path / "out")
    assert leftovers(tmp_path / "out") == ["keep.txt"]


def test_verify_manual_counts_then_trust_on_first_use(tmp_path):
    root = tmp_path / "RawData"
    for folder, stem in (("img", "img"), ("label", "label")):
        for case in (1, 2):
            path = root / "Training" / folder / f"{stem}{case:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{stem} {case}".encode())
    (root / "Training/img/._img0001.nii.gz").write_bytes(b"junk")  # not counted
    manifest = tmp_path / "manifests" / "btcv.json"

    with pytest.raises(VerificationError) as err:
        verify_manual(root, {"Training/img/*.nii.gz": 3, "Training/label/*.nii.gz": 2}, manifest)
    assert "Training/img/*.nii.gz: expected 3, found 2" in str(err.value)
    assert "Training/label/*.nii.gz: expected 2, found 2" in str(err.value)
    assert not manifest.exists()

    expected = {"Training/img/*.nii.gz": 2, "Training/label/*.nii.gz": 2}
    first = verify_manual(root, expected, manifest)
    assert first["status"] == "written"
    written = json.loads(manifest.read_text())
    assert sorted(written) == ["Training/img/img0001.nii.gz", "Training/img/img0002.nii.gz",
                               "Training/label/label0001.nii.gz", "Training/label/label0002.nii.gz"]
    assert written["Training/img/img0001.nii.gz"] == {"size": 5, "sha256": hashlib.sha256(b"img 1").hexdigest()}
    assert verify_manual(root, expected, manifest)["status"] == "verified"

    (root / "Training/img/img0001.nii.gz").write_bytes(b"img X")  # same size, other content
    (root / "Training/label/label0002.nii.gz").rename(root / "Training/label/label0009.nii.gz")
    with pytest.raises(VerificationError) as err:
        verify_manual(root, expected, manifest)
    message = str(err.value)
    assert "changed: Training/img/img0001.nii.gz" in message
    assert "missing: Training/label/label0002.nii.gz" in message
    assert "extra: Training/label/label0009.nii.gz" in message


def test_manual_data_missing_message(tmp_path):
    err = ManualDataMissing("btcv", tmp_path / "RawData", "Join the challenge on Synapse, then download RawData.zip.")
    assert isinstance(err, FetchError)
    assert str(err) == f"btcv: no copy found at {tmp_path / 'RawData'}.\nJoin the challenge on Synapse, then " \
                       "download RawData.zip."

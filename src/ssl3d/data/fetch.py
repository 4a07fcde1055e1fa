"""Download, verify and safely extract dataset archives; verify manually placed copies.

The suite's data are multi-gigabyte archives from S3, Zenodo and Hugging Face, plus copies that the user has to
place by hand. The library helpers fall short here (reference notes, datasets.md §2): MONAI's ``download_url``
cannot resume, skips an existing extraction folder without re-verifying it, and extracts with no path-traversal
guard; torch-em lists sha256 values but calls its download with ``checksum=None``; amid verifies nothing. So this
module does four things by hand, with the standard library:

* **Resume.** Bytes go to ``<dest>.part``; a later call continues it with an HTTP ``Range`` request (and starts over
  when the server ignores ``Range``), so a dropped connection 20 GB into LUNA16 costs nothing. The ``.part`` name is
  fixed rather than random (unlike :func:`ssl3d.io.atomic_path`) so that the next run can find it.
* **Verify, then rename.** Size first (cheap), then md5 and sha256 in one read pass; only a file that matches is
  renamed to ``dest``, so ``dest`` existing means "verified" and a mismatch leaves nothing behind.
* **Safe extraction.** tar through ``tarfile``'s ``filter="data"``, zip through an explicit path check (zipfile has
  no filter); macOS junk (``._*``, ``__MACOSX/``, found in the MSD tars and the AMOS zip) is dropped; everything is
  unpacked into a sibling folder that is renamed onto ``dest`` only when complete.
* **Trust on first use** for manual data (BTCV, BraTS, FLARE, ...) that have no published hashes: file counts are
  checked, and the first verification writes a manifest of sizes and sha256 values that the user commits; later
  runs compare against it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from tqdm import tqdm

from ssl3d.io import read_json, write_json

log = logging.getLogger(__name__)

_OTHER_VERSION = ("the mirror may serve a different version than the one pinned (check the release, then update "
                  "the registry's size/md5/sha256).")
_AGAIN = f"Delete it and re-run to fetch it again; if the mismatch persists, {_OTHER_VERSION}"
_DELETED = f"The download was deleted; re-run to fetch it again. If the mismatch persists, {_OTHER_VERSION}"


class FetchError(RuntimeError):
    """Base class of this module's errors."""


class DownloadError(FetchError):
    """No mirror delivered the file (network errors, HTTP errors, dropped connections)."""


class VerificationError(FetchError):
    """A file's size or hash, or a manual copy's file counts or manifest, do not match what was expected."""


class UnsafeArchiveError(FetchError):
    """An archive member would be written outside the extraction folder."""


class ManualDataMissing(FetchError):
    """A dataset that the suite cannot download is not where the configuration says it is."""

    def __init__(self, name: str, expected_path: Path, instructions: str):
        super().__init__(f"{name}: no copy found at {expected_path}.\n{instructions}")
        self.name = name
        self.expected_path = expected_path
        self.instructions = instructions


# ---------------------------------------------------------------------------------------------------------------
# verification


def verify_file(path: Path, size: int | None = None, md5: str | None = None, sha256: str | None = None) -> dict:
    """Check ``path`` against the given size and hashes; return ``{"file", "size", "md5", "sha256"}`` as computed."""
    return _check(Path(path), size, md5, sha256, str(path), _AGAIN)


def _check(path: Path, size: int | None, md5: str | None, sha256: str | None, label: str, fix: str) -> dict:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise VerificationError(f"{label}: size mismatch: expected {size} bytes, got {actual}. {fix}")
    with _bar(actual, f"hashing {path.name}") as bar:
        digests = _digest(path, bar, ("md5", "sha256"))
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None and digests[algorithm] != expected.lower():
            raise VerificationError(f"{label}: {algorithm} mismatch: expected {expected.lower()}, "
                                    f"got {digests[algorithm]}. {fix}")
    return {"file": str(path), "size": actual, **digests}


def _digest(path: Path, bar: tqdm, algorithms: tuple[str, ...]) -> dict[str, str]:
    """All ``algorithms`` in one read pass (md5 only as a checksum, hence ``usedforsecurity=False`` for FIPS)."""
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            for digest in hashes.values():
                digest.update(block)
            bar.update(len(block))
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def _bar(total: int | None, desc: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# download


def download(urls: list[str], dest: Path, size: int | None = None, md5: str | None = None,
             sha256: str | None = None, *, timeout: float = 60, chunk: int = 1 << 20) -> Path:
    """Download ``dest`` from the first of ``urls`` (mirrors, in order) that delivers it, resuming a ``.part``.

    A file that fails verification is deleted and the next mirror tried; a mirror that fails in transit leaves its
    ``.part`` for the next mirror (or the next run) to resume. An existing ``dest`` is verified, never overwritten.
    """
    dest = Path(dest)
    if dest.exists():
        _check(dest, size, md5, sha256, str(dest), _AGAIN)
        return dest
    if not urls:
        raise ValueError(f"{dest.name}: no URL to download it from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    mismatch = False
    for url in urls:
        label = f"{dest} (from {url})"
        try:
            _fetch(url, part, size, timeout, chunk, label)
            record = _check(part, size, md5, sha256, label, _DELETED)
        except VerificationError as err:
            part.unlink(missing_ok=True)
            failures.append(str(err))
            mismatch = True
        except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"{url}: {err}")
            log.warning("%s: %s", dest.name, failures[-1])
        else:
            os.replace(part, dest)
            if md5 is None and sha256 is None:
                log.warning("%s: no hash pinned, so only its size (if given) was checked; its sha256 is %s: "
                            "add it to the registry", dest.name, record["sha256"])
            return dest
    tried = "\n  ".join(failures)
    if mismatch:
        raise VerificationError(f"{dest}: no mirror delivered a file that verifies:\n  {tried}")
    kept = f"The partial download {part} is kept; re-run to resume it. " if part.exists() else ""
    raise DownloadError(f"{dest}: every mirror failed:\n  {tried}\n{kept}Check the network, or add a mirror.")


def _fetch(url: str, part: Path, size: int | None, timeout: float, chunk: int, label: str) -> None:
    """Stream ``url`` into ``part``, continuing from its current length where the server honours ``Range``."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # complete: an earlier run stopped between transfer and rename
        part.unlink()
        offset = 0
    try:
        response = urlopen(Request(url, headers={"Range": f"bytes={offset}-"} if offset else {}), timeout=timeout)
    except HTTPError as err:
        if err.code != 416 or not offset:
            raise
        err.close()
        part.unlink()  # 416: the .part is as long as the server's file or longer; with no size to tell, restart
        return _fetch(url, part, size, timeout, chunk, label)
    with response:
        if response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        if size is not None and total != size:  # fail before transferring gigabytes of the wrong file
            raise VerificationError(f"{label}: size mismatch: expected {size} bytes, the server announces {total}; "
                                    + _OTHER_VERSION)
        name = part.name.removesuffix(".part")
        with part.open("ab" if offset else "wb") as out, _bar(total, name, offset) as bar:
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))
    received = part.stat().st_size
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


# ---------------------------------------------------------------------------------------------------------------
# extraction


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a tar (any compression) or zip ``archive`` into ``dest``; return the extracted files, sorted.

    Members outside ``dest`` (absolute paths, ``..``, links pointing out) raise :class:`UnsafeArchiveError`; macOS
    ``._*`` and ``__MACOSX/`` entries are skipped. ``dest`` appears only once everything is extracted.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FetchError(f"{dest} already exists and is not empty; delete it to extract {archive.name} again")
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    partial.mkdir(parents=True)
    try:
        if tarfile.is_tarfile(archive):  # before zip: is_zipfile also accepts a tar that ends with a zip member
            _extract_tar(archive, partial, dest)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, partial, dest)
        else:
            raise FetchError(f"{archive}: neither a tar nor a zip archive; delete it and re-run to download it again")
        os.replace(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return sorted(path for path in dest.rglob("*") if path.is_file())


def _junk(name: str) -> bool:
    """macOS resource forks (``._name``) and Finder metadata (``__MACOSX/``) that ride along in some archives."""
    return any(part == "__MACOSX" or part.startswith("._") for part in PurePosixPath(name).parts)


def _extract_tar(archive: Path, target: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(target, members=(m for m in tar if not _junk(m.name)), filter="data")
        except tarfile.FilterError as err:
            raise _unsafe(archive, err.tarinfo.name, dest, str(err)) from err


def _extract_zip(archive: Path, target: Path, dest: Path) -> None:
    """zipfile has no ``filter``: it silently rewrites ``/abs`` and ``../x`` names, and writes a symlink member as a
    text file holding its target. Reject the first two instead, and create links only where they stay inside (the
    checks of tarfile's data filter)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            if _junk(name):
                continue
            posix = PurePosixPath(name.replace("\\", "/"))
            if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
                raise _unsafe(archive, name, dest, "absolute path or '..'")
            path = target / name
            if not _inside(target, path.parent):
                raise _unsafe(archive, name, dest, "its folder is a link pointing outside")
            if stat.S_ISLNK(info.external_attr >> 16):
                link = zf.read(info).decode()
                if os.path.isabs(link) or not _inside(target, path.parent / link):
                    raise _unsafe(archive, name, dest, f"a link to {link!r}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(link)
            else:
                zf.extract(info, target)


def _inside(root: Path, path: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _unsafe(archive: Path, member: str, dest: Path, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: member {member!r} would be written outside the extraction folder "
                              f"({reason}); nothing was extracted into {dest}. Do not unpack this archive by hand: "
                              "delete it and download it again, from another mirror if it recurs.")


# ---------------------------------------------------------------------------------------------------------------
# manual data


def verify_manual(root: Path, expected: dict[str, int], manifest: Path) -> dict:
    """Check a manually placed copy by file counts, then against a trust-on-first-use sha256 manifest.

    ``expected`` maps glob patterns relative to ``root`` to the number of files each must match (macOS ``._*`` and
    ``__MACOSX`` files are not counted). Without ``manifest``, the matched files' sizes and sha256 are written to it
    (``status: "written"``; commit it); with one, every changed, missing or extra file raises.
    """
    root, manifest = Path(root), Path(manifest)
    matched = {pattern: sorted(path for path in root.glob(pattern)
                               if path.is_file() and not _junk(path.relative_to(root).as_posix()))
               for pattern in expected}
    counts = {pattern: len(paths) for pattern, paths in matched.items()}
    if counts != expected:
        table = "\n".join(f"  {pattern}: expected {expected[pattern]}, found {counts[pattern]}" for pattern in expected)
        raise VerificationError(f"{root}: the copy does not hold the expected files:\n{table}\nPoint the "
                                "configuration's path at the folder these patterns are relative to, and check that "
                                "the copy is complete (re-copy or re-download what is missing).")
    files = {path.relative_to(root).as_posix(): path for paths in matched.values() for path in paths}
    current = {}
    with _bar(sum(path.stat().st_size for path in files.values()), f"hashing {root.name}") as bar:
        for relpath in sorted(files):
            path = files[relpath]
            current[relpath] = {"size": path.stat().st_size, "sha256": _digest(path, bar, ("sha256",))["sha256"]}
    record = {"root": str(root), "counts": counts, "manifest": str(manifest)}
    if not manifest.exists():
        write_json(manifest, current)
        log.warning("%s: first verification; wrote the manifest %s: commit it", root, manifest)
        return {**record, "status": "written"}
    recorded = read_json(manifest)
    problems = {
        "changed": sorted(rel for rel in current.keys() & recorded.keys() if current[rel] != recorded[rel]),
        "missing": sorted(recorded.keys() - current.keys()),
        "extra": sorted(current.keys() - recorded.keys()),
    }
    if any(problems.values()):
        listing = "\n".join(f"  {kind}: {', '.join(rels)}" for kind, rels in problems.items() if rels)
        raise VerificationError(f"{root} differs from the manifest {manifest} written when it was first verified:\n"
                                f"{listing}\nRestore the original files (re-copy or re-download them); if the copy "
                                f"was deliberately replaced by another release, delete {manifest}, re-run, and commit "
                                "the new manifest.")
    return {**record, "status": "verified"}

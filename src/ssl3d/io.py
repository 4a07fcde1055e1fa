"""Atomic file output.

Every artefact the suite writes goes through here: the content is written to a temporary file in the
destination folder and renamed into place, so a killed job never leaves a half-written file that a later
step (or a Snakemake rerun) would mistake for a finished one; a folder output (a data stage's) is built in a
staging folder and renamed into place the same way. A write that fails (a full disk, a read-only folder)
likewise leaves nothing behind and raises :class:`WriteError`, one line naming the file and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# torch.save's messages when its zip writer cannot write (a full disk): a RuntimeError, not an OSError
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing")


class WriteError(OSError):
    """A file could not be written; the message names it and the fix."""


def describe_os_error(err: OSError | RuntimeError, path: str | os.PathLike | None = None) -> str:
    """One line for a failed file operation: the file (``path``, else the error's), what failed and the fix."""
    path = path or getattr(err, "filename", None)
    text = getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
    reason = " ".join(text.splitlines()[0].split())  # torch may append a C++ stack trace
    code = getattr(err, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make its folder writable (or choose another output folder) and re-run"
    elif code == errno.ENOSPC or any(marker in reason for marker in _TORCH_WRITE_FAILURES):
        fix = "no space left on device? Free some space and re-run: a re-run resumes from the last checkpoint"
    else:
        fix = "fix the cause and re-run: a re-run resumes from the last checkpoint"
    return f"{path}: {reason}; {fix}"


def _failed_write(err: Exception, tmp: Path) -> bool:
    """Whether ``err``, raised while ``tmp`` was being written, is the write failing rather than something the
    writer read (a converter reads a source volume inside the block)."""
    if isinstance(err, OSError):
        return err.filename is None or Path(os.fsdecode(err.filename)) == tmp
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _TORCH_WRITE_FAILURES)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps the extension that writers such as nibabel use to pick a format (default: the
    extension of ``path``, e.g. ``.nii.gz``). A failed write raises :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    except OSError as err:
        raise WriteError(describe_os_error(err, path)) from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, WriteError) or not _failed_write(err, tmp):
            raise
        raise WriteError(describe_os_error(err, path)) from err
    finally:
        tmp.unlink(missing_ok=True)


def beside(dest: str | os.PathLike, kind: str) -> Path:
    """``.<name>.<kind>`` beside ``dest``: the hidden folders a folder output is built, kept or replaced through
    (``partial``, ``old``; ``kept`` by :func:`open_kept`, ``cases`` by the preprocessing cache)."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.{kind}"


@contextmanager
def built_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder (``.<name>.partial`` beside ``dest``) to build ``dest`` in; once the block
    succeeds it replaces ``dest`` whole. A failure leaves it, and the next run starts it over (what is worth
    keeping across runs goes in a kept folder: :func:`open_kept`)."""
    dest, work = Path(dest), beside(dest, "partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    yield work
    if dest.exists():
        old = beside(dest, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(work, dest)
        shutil.rmtree(old)
    else:
        os.replace(work, dest)


def open_kept(dest: str | os.PathLike, kind: str = "kept") -> Path:
    """The folder where ``dest`` is built and which stays after it (:func:`beside`), made if missing, from links
    to the files of ``dest`` where that exists (made before the kept folder, or without one worth keeping), so they
    are reused and ``dest`` stays whole until :func:`publish_kept` replaces it by links to the kept files.

    Why: Snakemake deletes a folder output before it re-runs the job (a forced rerun, a changed parameter), and a
    killed job leaves half its work; the job finds in the kept folder everything done before (verified downloads,
    converted volumes, preprocessed cases) and redoes only the rest. Deleting both folders frees the space."""
    dest, kept = Path(dest), beside(dest, kind)
    if dest.exists() and not kept.exists():
        _link_tree(dest, kept)
    kept.mkdir(parents=True, exist_ok=True)
    return kept


def _link_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy, dirs_exist_ok=True)


def publish_kept(kept: Path, dest: str | os.PathLike) -> Path:
    """Replace ``dest`` whole by hard links to the files of ``kept`` (copies where the file system has none;
    symbolic links as they are); returns ``dest``."""
    with built_folder(dest) as work:
        _link_tree(kept, work)
    return Path(dest)


@contextmanager
def kept_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield the kept folder of ``dest`` (:func:`open_kept`) to build in; once the block succeeds, ``dest`` is
    published from it."""
    kept = open_kept(dest)
    yield kept
    publish_kept(kept, dest)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no bytes copied), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it and re-run the step that makes it") from err

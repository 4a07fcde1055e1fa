"""Where data live and finding a dataset's files without reading them; the fingerprint of a bring-your-own folder.

Standard library only: the workflow's plan lists a ``source: folder`` dataset's files when it is parsed, so that the
dataset's identity (and every run's that uses it) includes them. A file added, removed or rewritten (its size or
modification time changes) is then a new dataset to the plan: new run identities, a re-run prepare and re-built
cached cases, never results that describe data which no longer exists. The converters share the same listing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

NIFTI = (".nii", ".nii.gz")
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's image naming: case_0000.nii.gz


def data_root() -> Path:
    """Where the suite keeps its data (sources, converted and preprocessed datasets, released weights):
    ``$SSL3D_DATA`` (another disk), else ``data/`` in the working directory."""
    return Path(os.environ.get("SSL3D_DATA") or "data")


def manual_copy(name: str, settings: dict, root: str | Path | None = None) -> Path:
    """Where the user's copy of a manual dataset is: the config's ``path``, else ``<data root>/manual/<name>``."""
    return Path(settings.get("path") or Path(root or data_root()) / "manual" / name)


def is_junk(path: Path) -> bool:
    """macOS metadata that archives carry (``._*`` files, ``__MACOSX`` folders)."""
    return path.name.startswith("._") or path.name == "__MACOSX"


def glob_files(root: Path | None, pattern: str) -> list[Path]:
    """Files matching ``pattern`` (``**`` recurses) below ``root`` (None: ``pattern`` is a full path), sorted, with
    ``._*`` files and anything below ``__MACOSX`` dropped."""
    matches = (Path(root or "", match) for match in glob.glob(pattern, root_dir=root, recursive=True))
    return sorted(path for path in matches if path.is_file() and not any(map(is_junk, [path, *path.parents])))


def niftis_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found")
    return [path for path in glob_files(folder, "*") if path.name.endswith(NIFTI)]


def stem(path: str | Path) -> str:
    """The file name without its NIfTI extension: the case id of an image."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    raise ValueError(f"{path}: expected a .nii or .nii.gz file")


def folder_cases(images: str | Path, labels: str | Path | None = None) -> list[tuple[str, Path, Path | None]]:
    """(case id, image, label or None) of a bring-your-own folder: ``images`` a folder or a glob of NIfTI images,
    ``labels`` a folder of label maps. A label belongs to the image of the same name, or, in nnU-Net's naming, to
    ``<case>_0000.nii.gz`` when it is ``<case>.nii.gz`` (the case id is then ``<case>``, and in a folder of
    ``_0000`` images only, an unlabelled image's too: a label added later keeps its case). Only one channel is read:
    an nnU-Net folder with ``_0001`` images is refused rather than split into unrelated cases."""
    images = str(images)
    paths = glob_files(None, images) if any(char in images for char in "*?[") else niftis_in(Path(images))
    if not paths:
        raise ValueError(f"{images}: no NIfTI image found")
    channels = {path: NNUNET_CHANNEL.match(stem(path)) for path in paths}
    extra = sorted(path.name for path, match in channels.items() if match and match["channel"] != "0000"
                   and any(stem(other) == f"{match['case']}_0000" for other in paths))
    if extra:
        raise ValueError(f"{images}: nnU-Net images of several channels ({', '.join(extra[:3])}, ...); a folder "
                         "dataset reads one channel: keep only the _0000 images, or convert the dataset to 4D NIfTI")
    label_files = {stem(path): path for path in niftis_in(Path(labels))} if labels else {}
    nnunet = all(match and match["channel"] == "0000" for match in channels.values())
    cases = []
    for path in paths:
        match = channels[path]
        case_id = match["case"] if match and (nnunet or match["case"] in label_files) else stem(path)
        cases.append((case_id, path, label_files.pop(case_id, None)))
    if label_files:
        orphan = sorted(label_files.values())
        raise ValueError(f"{orphan[0]}: label without an image of the same name (or <name>_0000) in {images} "
                         f"({len(orphan)} such labels)")
    return cases


def folder_fingerprint(images: str | Path, labels: str | Path | None = None) -> str:
    """A hash of every file of a folder dataset: its path, size and modification time (as make and rsync judge a
    change, without reading tens of GB)."""
    entries = []
    for case_id, image, label in folder_cases(images, labels):
        for path in (image, label):
            if path is not None:
                status = path.stat()
                entries.append([case_id, str(path), status.st_size, status.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]

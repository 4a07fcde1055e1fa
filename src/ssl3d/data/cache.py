"""The per-case preprocessing cache: one ``.npz`` per case, an ``index.json`` written last.

Preprocessing runs once per (recipe, dataset); training jobs only read these files. Each case file carries a key
of everything that made it (the recipe's hash, the data options, and the size and modification time of its image
and label files), so an interrupted preprocessing job resumes where it stopped, and a changed recipe, option or
source file (your own folder edited in place) never serves a stale volume. The dataset's folder is the workflow's
output and exists only complete: it is built beside itself and renamed into place, holding ``index.json`` and hard
links to its cases (copies where the file system has no hard links). The cases themselves are made and kept in
``.<name>.cases`` beside it, because Snakemake deletes a folder output before it re-runs the job: an interrupted
job resumes there, and a rerun after one source file changed rebuilds that case alone. To free a cache's space,
delete both folders.

Every volume is checked here, where each voxel is read anyway, so a bad file fails naming itself instead of as a
NaN loss or a silently empty class later:

* non-finite voxels (NaN, inf) are an error, or, with the dataset option ``nonfinite: <value>``, replaced by that
  value (the index records how many per case);
* a volume with nothing left after the recipe's foreground crop (all air) is an error;
* label values the dataset does not declare (``dataset.json``'s ``labels``) are an error naming the file and the
  values, or, with ``undeclared_labels: background``, set to background (the index records which, per case); a
  ``label_map`` given on the command line maps unlisted values to background by design (TotalSegmentator);
* a labelled case whose label has no foreground is reported in the index (``empty_label``) and the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ssl3d.data.dataset import Case, DataError, check_same_grid, load_label, load_nifti, read_dataset
from ssl3d.io import atomic_path, open_kept, publish_kept, read_json, write_json

if TYPE_CHECKING:  # the recipes import MONAI (seconds): readers of the cache (`ssl3d splits`) skip it
    from ssl3d.data.recipes import Recipe

log = logging.getLogger(__name__)


NONFINITE = "error"
UNDECLARED = ("error", "background")


def case_key(case: Case, recipe: Recipe, options: dict) -> str:
    """What a cached case depends on: the recipe, the data options, and its source files as they are now."""
    files = [[str(path), status.st_size, status.st_mtime_ns]
             for path in (case.image, case.label) if path for status in [path.stat()]]
    return hashlib.sha256(json.dumps([recipe.hash, options, files], sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> tuple[tuple[int, ...], np.ndarray, dict] | None:
    """(shape, spacing, report) of a cached case made with ``key``; None when it is absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            if str(cached["case_key"]) != key:
                return None
            return cached["image"].shape, cached["spacing"], json.loads(str(cached["report"]))
    except Exception:  # an unreadable cache file is simply rebuilt
        return None


def _finite(image: np.ndarray, path: Path, nonfinite: str | float) -> tuple[np.ndarray, int]:
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad and nonfinite == NONFINITE:
        raise DataError(f"{path}: {bad} of {image.size} voxels are NaN or infinite; repair the file, or set the "
                        "dataset's `nonfinite: <value>` to replace them (e.g. -1024 for air in CT)")
    return (np.nan_to_num(image, nan=nonfinite, posinf=nonfinite, neginf=nonfinite) if bad else image), bad


def _declared(label: np.ndarray, path: Path, declared: set[int], undeclared: str) -> tuple[np.ndarray, dict]:
    values, counts = np.unique(label, return_counts=True)
    extra = {int(value): int(count) for value, count in zip(values, counts) if int(value) not in declared}
    if extra and undeclared == "error":
        raise DataError(f"{path}: label values {sorted(extra)} are not declared in dataset.json's labels "
                        f"({sorted(declared)}); declare them (a folder dataset's `labels_map`), or set the "
                        "dataset's `undeclared_labels: background`")
    return (np.where(np.isin(label, list(extra)), 0, label) if extra else label), extra


def preprocess_case(case: Case, recipe: Recipe, label_map: dict[int, int] | None = None,
                    declared: set[int] | None = None, nonfinite: str | float = NONFINITE,
                    undeclared: str = "error") -> tuple[dict[str, np.ndarray], dict]:
    """The recipe's arrays of one case and what the checks found (module docstring); ``declared``: the label
    values the dataset declares, checked before ``label_map`` (None: not checked, a given map says what to keep)."""
    from ssl3d.data.recipes import apply_recipe

    image, affine = load_nifti(case.image, channels=True)
    image, replaced = _finite(image, case.image, nonfinite)
    report = {"nonfinite_replaced": replaced} if replaced else {}
    label = None
    if case.label is not None:
        label, label_affine = load_label(case.label)
        check_same_grid(case.image, image.shape[:3], affine, case.label, label.shape, label_affine)
        if declared is not None:
            label, extra = _declared(label, case.label, declared, undeclared)
            report.update({"undeclared_to_background": extra} if extra else {})
    arrays = apply_recipe(image, affine, recipe, label, label_map)
    threshold = recipe.crop_foreground_above
    if threshold is not None and not ((arrays["image"] if recipe.crop_after_intensity else image) >= threshold).any():
        # MONAI's crop keeps the whole volume when it selects nothing
        raise DataError(f"{case.image}: nothing is left after recipe {recipe.name!r} crops it to voxels >= "
                        f"{threshold}: the volume is empty (all air?); remove the case")
    if label is not None and not arrays["label"].any():
        report["empty_label"] = True
    return arrays, report


def write_case(path: Path, arrays: dict[str, np.ndarray], key: str, report: dict) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, case_key=np.array(key), report=np.array(json.dumps(report)), **arrays)


def load_cached_case(path: str | Path) -> dict[str, np.ndarray]:
    """Image as (C, X, Y, Z) float32 (one-channel volumes are stored 3D), label (if any) as (1, X, Y, Z) uint8,
    plus affine and spacing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cached case not found; re-run the preprocess rule")
    with np.load(path) as cached:
        case = {key: cached[key] for key in cached.files if key not in ("case_key", "report")}
    if case["image"].ndim == 3:
        case["image"] = case["image"][None]
    if "label" in case:
        case["label"] = case["label"][None]
    return case


def mapped_image(path: str | Path) -> np.ndarray:
    """The cached case's image as ``load_cached_case`` gives it, (C, X, Y, Z) float32, but memory-mapped from the
    file instead of read: a pre-training pool of thousands of scans is then held by the operating system's page
    cache, shared by every process that reads it (data-loader workers, the ranks of a multi-GPU run), and a sample
    reads only the pages of its region. Copy-on-write: writing to the array changes a private copy of the pages
    written, never the file.

    Written by hand because ``np.load`` ignores ``mmap_mode`` for ``.npz`` archives: ``np.savez`` stores each array
    as an uncompressed zip member holding a ``.npy`` file, so the array's bytes start at a fixed offset, after the
    member's local zip header (read here: ``zipfile`` gives no data offset) and the ``.npy`` header (numpy's own
    parser). A member that is compressed, which ``write_case`` never makes, is read instead."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("image.npy")
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{path}: not a cached case with an image ({err}); re-run the preprocess rule") from err
    if member.compress_type != zipfile.ZIP_STORED:
        return load_cached_case(path)["image"]
    with open(path, "rb") as file:
        file.seek(member.header_offset + 26)  # the local header's name and extra-field lengths (PKWARE APPNOTE 4.3.7)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        file.seek(member.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        offset = file.tell()
    image = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran_order else "C")
    return image[None] if image.ndim == 3 else image


def preprocess_dataset(dataset_root: str | Path, recipe: Recipe, out_dir: str | Path,
                       label_map: dict[int, int] | None = None, classes: dict[int, str] | None = None,
                       nonfinite: str | float = NONFINITE, undeclared_labels: str = "error") -> Path:
    """Preprocess every case of a dataset into ``out_dir``; returns the path of ``index.json``.

    ``classes`` names the benchmark's classes after ``label_map`` (default: the dataset's own labels, numbered
    0..K in order where its values have gaps, as BraTS's 0/1/2/4: training needs contiguous classes). The index
    records the image channels and, where ``dataset.json`` declares ``regions`` (BraTS's TC / WT / ET, each a
    union of label values), each region as the classes it joins: evaluation scores regions instead of classes.
    ``nonfinite`` and ``undeclared_labels`` are the dataset options of the module docstring; the index records
    them, and per case what they changed.
    """
    if not (nonfinite == NONFINITE or isinstance(nonfinite, (int, float))) or undeclared_labels not in UNDECLARED:
        raise ValueError(f"nonfinite {nonfinite!r} / undeclared_labels {undeclared_labels!r}: want {NONFINITE!r} "
                         f"or a number / one of {UNDECLARED}")
    dataset = read_dataset(dataset_root)
    explicit_map = label_map is not None
    if label_map is None and classes is None and sorted(dataset.labels) != list(range(len(dataset.labels))):
        label_map = {value: index for index, value in enumerate(sorted(dataset.labels))}
        classes = {label_map[value]: name for value, name in dataset.labels.items()}
    to_class = label_map or {value: value for value in dataset.labels}
    regions = {name: sorted(to_class[value] for value in values) for name, values in dataset.regions.items()}
    options = {name: str(value) for name, value in [("nonfinite", nonfinite), ("label_map", label_map),
                                                       ("undeclared_labels", undeclared_labels)]}
    declared = None if explicit_map else set(dataset.labels)
    out_dir = Path(out_dir)
    store = open_kept(out_dir, "cases")  # a cache made before stores existed is linked in: its cases are reused
    cases = {}
    start = time.perf_counter()
    for case in tqdm(dataset.labelled + dataset.unlabelled, desc=f"preprocess {dataset.name} ({recipe.name})"):
        path = store / f"{case.case_id}.npz"
        key = case_key(case, recipe, options)
        cached = _cached(path, key)
        if cached is None:
            arrays, report = preprocess_case(case, recipe, label_map, declared, nonfinite, undeclared_labels)
            write_case(path, arrays, key, report)
            cached = arrays["image"].shape, arrays["spacing"], report
        shape, spacing, report = cached
        if report.get("empty_label"):
            log.warning("%s: the label map has no foreground", case.label)
        channels = shape[0] if len(shape) == 4 else 1
        cases[case.case_id] = {"file": path.name, "labelled": case.label is not None, "channels": channels,
                               "shape": list(shape[-3:]), "spacing": spacing.tolist(), **report}
    counts = {case["channels"] for case in cases.values()}
    if len(counts) > 1:
        raise ValueError(f"{dataset_root}: cases have different numbers of image channels ({sorted(counts)})")
    for stale in {path.name for path in store.glob("*.npz")} - {case["file"] for case in cases.values()}:
        (store / stale).unlink()  # a case the dataset no longer has
    write_json(store / "index.json", {
        "dataset": dataset.name,
        "recipe": recipe.__dict__,
        "recipe_hash": recipe.hash,
        "options": {"nonfinite": nonfinite, "undeclared_labels": undeclared_labels},
        "classes": {str(k): v for k, v in (classes or dataset.labels).items() if int(k) != 0},
        "channels": counts.pop() if counts else 1,
        **({"regions": regions} if regions else {}),
        "seconds": round(time.perf_counter() - start, 3),
        "cases": cases,
    })
    return publish_kept(store, out_dir) / "index.json"


def read_index(cache: str | Path) -> dict:
    """The index of a preprocessed dataset: ``cache`` is its folder (or the ``index.json`` in it)."""
    cache = Path(cache)
    index_path = cache / "index.json" if cache.is_dir() else cache
    index = read_json(index_path)
    index["dir"] = index_path.parent
    return index

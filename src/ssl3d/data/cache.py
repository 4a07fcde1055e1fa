"""The per-case preprocessing cache: one ``.npz`` per case, an ``index.json`` written last.

Preprocessing runs once per (recipe, dataset); training jobs only read these files. Each case file carries the
hash of the recipe that made it, so an interrupted preprocessing job resumes where it stopped and a changed
recipe never serves stale volumes. ``index.json`` marks the dataset complete for Snakemake.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ssl3d.data.dataset import Case, check_same_grid, load_nifti, read_dataset
from ssl3d.data.recipes import Recipe, apply_recipe
from ssl3d.io import atomic_path, read_json, write_json


def _current_geometry(path: Path, recipe: Recipe) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, spacing) of a cached case made by this recipe; None when it is absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            if str(cached["recipe_hash"]) != recipe.hash:
                return None
            return cached["image"].shape, cached["spacing"]
    except Exception:  # an unreadable cache file is simply rebuilt
        return None


def preprocess_case(case: Case, recipe: Recipe, label_map: dict[int, int] | None = None) -> dict[str, np.ndarray]:
    image, affine = load_nifti(case.image, channels=True)
    label = None
    if case.label is not None:
        label, label_affine = load_nifti(case.label)
        check_same_grid(case.image, image.shape[:3], affine, case.label, label.shape, label_affine)
    return apply_recipe(image, affine, recipe, label, label_map)


def write_case(path: Path, arrays: dict[str, np.ndarray], recipe: Recipe) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, recipe_hash=np.array(recipe.hash), **arrays)


def load_cached_case(path: str | Path) -> dict[str, np.ndarray]:
    """Image as (C, X, Y, Z) float32 (one-channel volumes are stored 3D), label (if any) as (1, X, Y, Z) uint8,
    plus affine and spacing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cached case not found; re-run the preprocess rule")
    with np.load(path) as cached:
        case = {key: cached[key] for key in cached.files if key != "recipe_hash"}
    if case["image"].ndim == 3:
        case["image"] = case["image"][None]
    if "label" in case:
        case["label"] = case["label"][None]
    return case


def preprocess_dataset(dataset_root: str | Path, recipe: Recipe, out_dir: str | Path,
                       label_map: dict[int, int] | None = None, classes: dict[int, str] | None = None) -> Path:
    """Preprocess every case of a dataset into ``out_dir``; returns the path of ``index.json``.

    ``classes`` names the benchmark's classes after ``label_map`` (default: the dataset's own labels, numbered
    0..K in order where its values have gaps, as BraTS's 0/1/2/4: training needs contiguous classes). The index
    records the image channels and, where ``dataset.json`` declares ``regions`` (BraTS's TC / WT / ET, each a
    union of label values), each region as the classes it joins: evaluation scores regions instead of classes.
    """
    dataset = read_dataset(dataset_root)
    if label_map is None and classes is None and sorted(dataset.labels) != list(range(len(dataset.labels))):
        label_map = {value: index for index, value in enumerate(sorted(dataset.labels))}
        classes = {label_map[value]: name for value, name in dataset.labels.items()}
    to_class = label_map or {value: value for value in dataset.labels}
    regions = {name: sorted(to_class[value] for value in values) for name, values in dataset.regions.items()}
    out_dir = Path(out_dir)
    cases = {}
    start = time.perf_counter()
    for case in tqdm(dataset.labelled + dataset.unlabelled, desc=f"preprocess {dataset.name} ({recipe.name})"):
        path = out_dir / f"{case.case_id}.npz"
        geometry = _current_geometry(path, recipe)
        if geometry is None:
            arrays = preprocess_case(case, recipe, label_map)
            write_case(path, arrays, recipe)
            geometry = arrays["image"].shape, arrays["spacing"]
        shape = geometry[0]
        channels = shape[0] if len(shape) == 4 else 1
        cases[case.case_id] = {"file": path.name, "labelled": case.label is not None, "channels": channels,
                               "shape": list(shape[-3:]), "spacing": geometry[1].tolist()}
    counts = {case["channels"] for case in cases.values()}
    if len(counts) > 1:
        raise ValueError(f"{dataset_root}: cases have different numbers of image channels ({sorted(counts)})")
    index = out_dir / "index.json"
    write_json(index, {
        "dataset": dataset.name,
        "recipe": recipe.__dict__,
        "recipe_hash": recipe.hash,
        "classes": {str(k): v for k, v in (classes or dataset.labels).items() if int(k) != 0},
        "channels": counts.pop() if counts else 1,
        **({"regions": regions} if regions else {}),
        "seconds": round(time.perf_counter() - start, 3),
        "cases": cases,
    })
    return index


def read_index(index_path: str | Path) -> dict:
    index = read_json(index_path)
    index["dir"] = Path(index_path).parent
    return index

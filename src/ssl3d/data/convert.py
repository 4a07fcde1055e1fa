"""Convert each source dataset's own layout into the one MSD layout the suite reads.

Why: every dataset arrives in its publisher's layout (a Decathlon task, BTCV's ``RawData``, KiTS19's case folders,
BraTS's one-file-per-modality folders, LUNA16's MetaImages, ...). Converting each into the MSD / nnU-Net layout
(``dataset.json`` + ``imagesTr``/``labelsTr``/``imagesTs``) once means that everything downstream has one reader
(:func:`ssl3d.data.dataset.read_dataset`) and no per-dataset branches.

How:

* **Symlinks, not copies.** The sources are tens of GB, so a file that needs no change is linked (absolute link to
  the source file; the link name keeps the source's ``.nii``/``.nii.gz`` extension). New files are written only
  where the data must change: LUNA16's MetaImage -> NIfTI, BraTS's four modalities -> one 4D image.
* **Built aside, kept.** The output is built in a hidden sibling ``.<dest>.kept`` and, when complete, ``dest`` is
  replaced whole by links to its files (``ssl3d.io.open_kept``), so an interrupted conversion never leaves a
  ``dest``, and ``dest`` holds exactly ``dataset.json`` and the files it lists.
* **Resumable.** Converted files are written atomically into the kept folder and stay there: an interrupted run
  keeps only those (links and ``dataset.json`` are removed), and a re-run, even one Snakemake starts by deleting
  ``dest``, reuses them. Delete both folders to force a fresh conversion.
* **Lists, not blind globs.** Where the source lists its files (MSD's and AMOS's ``dataset.json``) the list is read;
  elsewhere file names are matched against the layout's naming scheme. macOS ``._*`` files and ``__MACOSX``
  folders are always dropped. The dataset root may sit up to three folders below ``source`` (an extracted archive
  adds levels); it is found by its layout and must be unique.

Layouts (``convert(layout, source, dest, **options)``); the case id is the image file name without extension:

=================  ==========================================================================================
``msd``            Decathlon ``TaskXX_Name``: ids and file names as its ``dataset.json`` lists them
                   (``spleen_10``); ``training`` labelled, ``test`` unlabelled; the ``"relase"`` key is spelled
                   ``"release"``.
``btcv``           ``RawData/{Training,Testing}``: ids ``img0001`` ..., with labels ``labelsTr/label0001.nii.gz`` as
                   in MONAI's ``dataset_0.json``, whose relative paths therefore resolve in ``dest`` unchanged (the
                   reader pairs image and label by the ``dataset.json`` entry, not by file name).
``kits19``         ``data/case_XXXXX/{imaging,segmentation}.nii.gz``: ids ``case_00000``; cases 0-209 labelled,
                   210-299 unlabelled. Files are linked unchanged: their z-first affine is reoriented to RAS by the
                   recipes.
``brats2020``      ``BraTS20_Training_XXX/``: ids ``BraTS20_Training_001``; one 4D image per case with the
                   modalities on the last axis in MSD Task01 order (FLAIR, T1w, t1gd = T1ce, T2w); labels linked
                   unchanged (0, 1, 2, 4). Case 355's segmentation, named ``W39_1998.09.19_Segm.nii`` in common
                   copies, is used under that name (logged); option ``skip_misnamed_seg=True`` drops the case.
``luna16``         ``subsetN/<SeriesInstanceUID>.mhd``: ids = the SeriesInstanceUID; all unlabelled, converted to
                   NIfTI with SimpleITK (spacing, origin and direction kept).
``amos``           ``amos22/`` with ``dataset.json``: ids ``amos_0001``; option ``modality`` ``"ct"`` (default; ids
                   <= 500) or ``"mri"`` (ids > 500); ``training`` and ``validation`` labelled, ``test`` unlabelled.
``covid19_20``     ``COVID-19-20_v2/{Train,Validation}``: all unlabelled (pre-training), ids = file name
                   (``volume-covid19-A-0003_ct``). Default: the 249 ``*_ct`` volumes. ``faithful=True`` reproduces
                   HybridMIM's glob ``*/*.nii.gz``, which also fed the 199 ``*_seg`` masks as images (448).
``images_folder``  unlabelled images (FLARE21/22, RibFrac, ATM22) matching option ``pattern`` (default
                   ``**/*.nii.gz``) below ``source``; ids = file name. Two files with one name are an error (narrow
                   ``pattern``, e.g. to leave out a label folder).
``folder``         bring your own data: option ``images`` (a folder or a glob; default ``source``), optional
                   ``labels`` (a folder; a label is matched to its image by file name, or in nnU-Net's naming
                   ``case.nii.gz`` to ``case_0000.nii.gz``; images without one are unlabelled), ``labels_map``
                   ({value: name}; default: the values found in the labels), ``modality`` (default ``"CT"``).
                   ``ssl3d.data.files.folder_cases`` lists the cases.
=================  ==========================================================================================
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ssl3d.data.dataset import (AFFINE_TOLERANCE_MM, DataError, case_id_of, check_same_grid, load_label,
                                load_nifti, open_nifti)
from ssl3d.data.files import folder_cases, glob_files, is_junk
from ssl3d.io import atomic_path, open_kept, publish_kept, read_json, write_json

log = logging.getLogger(__name__)

SEARCH_DEPTH = 3  # how many folders below ``source`` a layout's root may sit
BTCV_LABELS = {0: "background", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus",
               6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_veins",
               11: "pancreas", 12: "adrenal_gland_right", 13: "adrenal_gland_left"}
KITS19_LABELS = {0: "background", 1: "kidney", 2: "tumor"}
KITS19_LABELLED = range(210)
BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")  # file suffixes, in MSD Task01 BrainTumour channel order
BRATS_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
BRATS_LABELS = {0: "background", 1: "necrotic_and_non_enhancing_tumour_core", 2: "peritumoral_edema",
                4: "enhancing_tumour"}
# The regions BraTS is scored on (and HybridMIM's Tables 3-4 report), each a union of label values; written to
# dataset.json, so that evaluation scores them instead of the three labels
BRATS_REGIONS = {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}
BRATS_MISNAMED_SEG = "W39_1998.09.19_Segm.nii"  # case 355's segmentation in common copies
AMOS_LAST_CT_ID = 500
BACKGROUND_ONLY = {0: "background"}

_BTCV_IMAGE = re.compile(r"img(\d{4})\.nii\.gz")
_KITS_CASE = re.compile(r"case_(\d{5})")
_BRATS_CASE = re.compile(r"BraTS20_Training_\d{3}")
_LUNA_SUBSET = re.compile(r"subset\d+")
_MHD = re.compile(r"[^.].*\.mhd")
_AMOS_ID = re.compile(r"amos_(\d{4})")
_MSD_KEYS = ("name", "description", "reference", "licence", "license", "release", "relase", "tensorImageSize",
             "modality", "labels")


def write_dataset_json(path: Path, header: dict, training: list[dict], test: list[str]) -> None:
    """An MSD ``dataset.json``: ``header`` (name, modality, labels, ...) then the counts and the file lists."""
    labels = {str(k): v for k, v in sorted(header["labels"].items(), key=lambda item: int(item[0]))}
    write_json(path, {**header, "labels": labels, "numTraining": len(training), "numTest": len(test),
                      "training": training, "test": test})


class _Output:
    """The MSD folder being built in ``.<dest>.kept``; :meth:`finish` publishes it as ``dest``."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.work = open_kept(dest)
        self.training: list[dict] = []
        self.test: list[str] = []
        self.resumed = 0
        self._files: set[str] = set()
        self._origin: dict[str, Path] = {}

    def add(self, case_id: str, image: Path, label: Path | None = None, label_id: str | None = None,
            write: Callable[[Path, Path], None] | None = None) -> None:
        """Emit one case: into ``imagesTr``/``labelsTr`` when it has a ``label``, else into ``imagesTs``.

        The source ``image`` is linked, or, with ``write``, converted by ``write(image, path)`` into a new
        ``.nii.gz``. ``label_id`` names the label file (default: ``case_id``).
        """
        if case_id in self._origin:
            raise DataError(f"{image}: gives case id {case_id!r}, as {self._origin[case_id]} does; case ids must be "
                            "unique")
        self._origin[case_id] = image
        label_rel = None if label is None else self._link("labelsTr", label_id or case_id, label)  # checked first
        folder = "imagesTs" if label is None else "imagesTr"
        if write is None:
            image_rel = self._link(folder, case_id, image)
        else:
            image_rel = self._write(f"{folder}/{case_id}.nii.gz", partial(write, image))
        if label_rel is None:
            self.test.append(image_rel)
        else:
            self.training.append({"image": image_rel, "label": label_rel})

    def _link(self, folder: str, stem: str, target: Path) -> str:
        target = Path(os.path.abspath(target))
        if not target.is_file():
            raise DataError(f"{target}: file not found; the source copy is incomplete")
        rel = f"{folder}/{stem}{target.name[len(case_id_of(target)):]}"
        path = self.work / rel
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)  # left by an interrupted run
        path.symlink_to(target)
        self._files.add(rel)
        return f"./{rel}"

    def _write(self, rel: str, make: Callable[[Path], None]) -> str:
        path = self.work / rel
        self._files.add(rel)
        if _converted(path):
            self.resumed += 1
            return f"./{rel}"
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            make(tmp)
        return f"./{rel}"

    def finish(self, header: dict) -> Path:
        """Write ``dataset.json``, drop what it does not list, and publish the folder as ``dest``."""
        write_dataset_json(self.work / "dataset.json", header, self.training, self.test)
        _prune(self.work, lambda rel, path: rel in self._files or rel == "dataset.json")
        publish_kept(self.work, self.dest)
        if not any(_converted(self.work / rel) for rel in self._files):
            shutil.rmtree(self.work)  # links only: nothing worth keeping
        return self.dest / "dataset.json"

    def abandon(self) -> None:
        """After a failure: keep only the converted files (for a re-run to reuse), nothing if there are none."""
        kept = _prune(self.work, lambda rel, path: _converted(path) and not path.name.startswith(".")
                      and rel != "dataset.json")
        if kept:
            log.warning("%s: conversion interrupted; %d converted files kept in %s for the next run", self.dest,
                        kept, self.work)


def _converted(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _prune(root: Path, keep: Callable[[str, Path], bool]) -> int:
    """Delete the files below ``root`` that ``keep(relative path, path)`` rejects, then empty folders (``root``
    included); returns how many files were kept."""
    kept = 0
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if keep(path.relative_to(root).as_posix(), path):
                kept += 1
            else:
                path.unlink()
        if not os.listdir(folder):
            os.rmdir(folder)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# finding files


def _find_dirs(source: Path, predicate: Callable[[Path], bool]) -> list[Path]:
    """Folders at most ``SEARCH_DEPTH`` below ``source`` (itself included) for which ``predicate`` holds; the search
    does not descend into them."""
    if not source.is_dir():
        raise DataError(f"{source}: source folder not found")
    found, level = [], [source]
    for _ in range(SEARCH_DEPTH + 1):
        below = []
        for folder in level:
            if predicate(folder):
                found.append(folder)
            else:
                below += sorted(child for child in folder.iterdir() if child.is_dir() and not is_junk(child))
        level = below
    return found


def _find_root(source: Path, what: str, predicate: Callable[[Path], bool]) -> Path:
    found = _find_dirs(source, predicate)
    if not found:
        raise DataError(f"{source}: no {what} in it or up to {SEARCH_DEPTH} folders below; point the dataset's "
                        "path at that folder")
    if len(found) > 1:
        raise DataError(f"{source}: several {what} found ({', '.join(map(str, found))}); point the dataset's path "
                        "at one of them")
    return found[0]


def _named(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Entries of ``folder`` whose whole name matches ``pattern``, sorted by name."""
    return sorted(child for child in folder.iterdir() if pattern.fullmatch(child.name))


def _nifti(folder: Path, stem: str) -> Path:
    """``folder/stem.nii.gz``, or ``stem.nii`` if only that exists (some copies are uncompressed)."""
    plain = folder / f"{stem}.nii"
    return plain if plain.is_file() and not (folder / f"{stem}.nii.gz").is_file() else folder / f"{stem}.nii.gz"


def _has_dataset_json(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()


def _listed(root: Path, key: str) -> list[tuple[Path, Path | None]]:
    """(image, label) of each entry of list ``key`` in ``root/dataset.json``, ``._*`` files dropped; entries are
    dicts or plain paths; the label is None for ``test``, required for the other lists."""
    cases = []
    for entry in read_json(root / "dataset.json").get(key, []):
        image, label = (entry, None) if isinstance(entry, str) else (entry["image"], entry.get("label"))
        if Path(image).name.startswith("._"):
            continue
        if key == "test":
            label = None
        elif label is None:
            raise DataError(f"{root / 'dataset.json'}: {key} entry {image} has no label")
        cases.append((root / image, None if label is None else root / label))
    return cases


def _msd_header(meta: dict) -> dict:
    return {("release" if key == "relase" else key): meta[key] for key in _MSD_KEYS if key in meta}


# ---------------------------------------------------------------------------------------------------------------
# written files


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _stack_brats(case: Path, out: Path) -> None:
    """The case's four modalities as one 4D NIfTI, channels on the last axis in ``BRATS_CHANNELS`` order; they must
    share one voxel grid."""
    paths = [_nifti(case, f"{case.name}_{suffix}") for suffix in BRATS_CHANNELS]
    volumes = [load_nifti(path) for path in paths]
    shape, affine = volumes[0][0].shape, volumes[0][1]
    for path, (data, other) in zip(paths, volumes):
        if data.shape != shape or not np.allclose(other, affine, atol=AFFINE_TOLERANCE_MM):
            raise DataError(f"{path}: voxel grid {data.shape} differs from {paths[0]} {shape} (shape or affine); "
                            "the modalities of a case must be co-registered")
    _save_nifti(out, np.stack([data for data, _ in volumes], axis=-1), affine)


def _mhd_to_nifti(mhd: Path, out: Path) -> None:
    try:
        image = sitk.ReadImage(str(mhd))
    except RuntimeError as err:
        raise DataError(f"{mhd}: cannot be read as MetaImage ({err}); re-extract its subset") from err
    sitk.WriteImage(image, str(out), useCompression=True)


# ---------------------------------------------------------------------------------------------------------------
# one function per layout: each emits its cases into ``out`` and returns the dataset.json header


def _msd(source: Path, out: _Output) -> dict:
    root = _find_root(source, "Decathlon task folder (dataset.json + imagesTr/)", _has_dataset_json)
    for key in ("training", "test"):
        for image, label in _listed(root, key):
            out.add(case_id_of(image), image, label)
    return _msd_header(read_json(root / "dataset.json"))


def _btcv(source: Path, out: _Output) -> dict:
    root = _find_root(source, "BTCV RawData folder (Training/img/)", lambda d: (d / "Training" / "img").is_dir())
    for part in ("Training", "Testing"):
        folder = root / part / "img"
        for image in _named(folder, _BTCV_IMAGE) if folder.is_dir() else []:
            number = _BTCV_IMAGE.fullmatch(image.name).group(1)
            label = root / part / "label" / f"label{number}.nii.gz" if part == "Training" else None
            out.add(f"img{number}", image, label, label_id=f"label{number}")
    return {"name": "BTCV", "description": "Multi-Atlas Labeling Beyond the Cranial Vault - Abdomen",
            "modality": {"0": "CT"}, "labels": BTCV_LABELS}


def _kits19(source: Path, out: _Output) -> dict:
    """The kits19 repository's ``data/case_XXXXX/`` tree. The suite's fetch stage delivers the labels (the
    repository archive) and the images (per-case downloads) as two such trees; each case takes its files from
    whichever tree holds them."""
    def is_data(folder: Path) -> bool:
        return any(case.is_dir() for case in _named(folder, _KITS_CASE))

    roots = _find_dirs(source, is_data)
    if not roots:
        raise DataError(f"{source}: no KiTS19 data folder (case_XXXXX/) in it or up to {SEARCH_DEPTH} folders below; "
                        "point the dataset's path at that folder")

    def find(case: str, name: str) -> Path:
        for root in roots:
            if (root / case / name).is_file():
                return root / case / name
        raise DataError(f"{source}: case {case} has no {name} in {', '.join(map(str, roots))}")

    for case in sorted({case.name for root in roots for case in _named(root, _KITS_CASE)}):
        labelled = int(_KITS_CASE.fullmatch(case).group(1)) in KITS19_LABELLED
        out.add(case, find(case, "imaging.nii.gz"), find(case, "segmentation.nii.gz") if labelled else None)
    return {"name": "KiTS19", "description": "Kidney Tumor Segmentation Challenge 2019", "modality": {"0": "CT"},
            "labels": KITS19_LABELS}


def _brats2020(source: Path, out: _Output, skip_misnamed_seg: bool = False) -> dict:
    def is_data(folder: Path) -> bool:
        return any(case.is_dir() for case in _named(folder, _BRATS_CASE))

    root = _find_root(source, "BraTS 2020 training folder (BraTS20_Training_XXX/)", is_data)
    for case in _named(root, _BRATS_CASE):
        seg = _nifti(case, f"{case.name}_seg")
        if not seg.is_file() and (case / BRATS_MISNAMED_SEG).is_file():
            if skip_misnamed_seg:
                log.warning("%s: segmentation named %s (known quirk); case skipped (skip_misnamed_seg)", case.name,
                            BRATS_MISNAMED_SEG)
                continue
            log.warning("%s: segmentation named %s (known quirk); used as its label", case.name, BRATS_MISNAMED_SEG)
            seg = case / BRATS_MISNAMED_SEG
        out.add(case.name, case, seg, write=_stack_brats)
    return {"name": "BraTS2020", "description": "BraTS 2020 training data; channels in MSD Task01 order",
            "tensorImageSize": "4D", "modality": BRATS_MODALITY, "labels": BRATS_LABELS, "regions": BRATS_REGIONS}


def _luna16(source: Path, out: _Output) -> dict:
    subsets = _find_dirs(source, lambda d: bool(_LUNA_SUBSET.fullmatch(d.name)))
    if not subsets:
        raise DataError(f"{source}: no LUNA16 subsetN/ folder in it or up to {SEARCH_DEPTH} folders below")
    scans = sorted((mhd for subset in subsets for mhd in _named(subset, _MHD)),
                   key=lambda mhd: mhd.name)
    for mhd in scans:
        out.add(mhd.name.removesuffix(".mhd"), mhd, write=_mhd_to_nifti)
    return {"name": "LUNA16", "description": "LUNA16 chest CT (subset0-9), unlabelled", "modality": {"0": "CT"},
            "labels": BACKGROUND_ONLY}


def _amos(source: Path, out: _Output, modality: str = "ct") -> dict:
    if modality not in ("ct", "mri"):
        raise ValueError(f"amos: modality must be 'ct' or 'mri', got {modality!r}")
    root = _find_root(source, "AMOS22 folder (dataset.json + imagesTr/)", _has_dataset_json)
    for key in ("training", "validation", "test"):
        for image, label in _listed(root, key):
            match = _AMOS_ID.fullmatch(case_id_of(image))
            if match is None:
                raise DataError(f"{root / 'dataset.json'}: {image} is not named amos_XXXX")
            if (int(match.group(1)) <= AMOS_LAST_CT_ID) == (modality == "ct"):
                out.add(match.group(0), image, label)
    return {**_msd_header(read_json(root / "dataset.json")), "name": f"AMOS22-{modality.upper()}",
            "modality": {"0": "CT" if modality == "ct" else "MRI"}}


def _covid19_20(source: Path, out: _Output, faithful: bool = False) -> dict:
    root = _find_root(source, "COVID-19-20_v2 folder (Train/)", lambda d: (d / "Train").is_dir())
    for image in glob_files(root, "*/*.nii.gz" if faithful else "*/*_ct.nii.gz"):
        out.add(case_id_of(image), image)
    return {"name": "COVID-19-20", "modality": {"0": "CT"}, "labels": BACKGROUND_ONLY,
            "description": "COVID-19-20 CT, unlabelled" + (" (HybridMIM's glob: *_seg masks included as images)"
                                                           if faithful else "")}


def _images_folder(source: Path, out: _Output, pattern: str = "**/*.nii.gz", modality: str = "CT") -> dict:
    if not source.is_dir():
        raise DataError(f"{source}: source folder not found")
    images = glob_files(source, pattern)
    if not images:
        raise DataError(f"{source}: no file matches {pattern!r}")
    for image in images:
        out.add(case_id_of(image), image)
    return {"name": out.dest.name, "modality": {"0": modality}, "labels": BACKGROUND_ONLY}


def _folder(source: Path, out: _Output, images: str | Path | None = None, labels: str | Path | None = None,
            labels_map: dict | None = None, modality: str = "CT") -> dict:
    try:
        cases = folder_cases(images or source, labels)
    except ValueError as err:
        raise DataError(str(err)) from None
    for case_id, image, label in cases:
        if label is not None:
            image_header, label_header = open_nifti(image), open_nifti(label)
            check_same_grid(image, image_header.shape, image_header.affine, label, label_header.shape,
                            label_header.affine)
        out.add(case_id, image, label)
    if labels_map is None:
        values = set().union(*(np.unique(load_label(label)[0]).tolist() for _, _, label in cases if label))
        labels_map = {int(v): f"label_{int(v)}" for v in values - {0}}
    return {"name": out.dest.name, "modality": {"0": modality},
            "labels": {**BACKGROUND_ONLY, **{int(k): str(v) for k, v in labels_map.items()}}}


CONVERTERS: dict[str, Callable[..., dict]] = {
    "msd": _msd, "btcv": _btcv, "kits19": _kits19, "brats2020": _brats2020, "luna16": _luna16, "amos": _amos,
    "covid19_20": _covid19_20, "images_folder": _images_folder, "folder": _folder,
}


def convert(layout: str, source: Path, dest: Path, **options) -> Path:
    """Convert the dataset at ``source`` (in ``layout``) into an MSD folder ``dest``; returns ``dest/dataset.json``.

    ``options`` are the layout's own (see the module docstring); an unknown one is an error.
    """
    if layout not in CONVERTERS:
        raise ValueError(f"unknown dataset layout {layout!r}; known: {', '.join(CONVERTERS)}")
    converter = CONVERTERS[layout]
    try:
        inspect.signature(converter).bind(source, None, **options)
    except TypeError as err:
        raise ValueError(f"layout {layout!r}: {err}; its options: "
                         f"{', '.join(list(inspect.signature(converter).parameters)[2:]) or 'none'}") from None
    source, dest = Path(source), Path(dest)
    out = _Output(dest)
    try:
        header = converter(source, out, **options)
        header["converted_from"] = {"layout": layout, "source": str(source), "options": options}
        dataset_json = out.finish(header)
    except BaseException:
        out.abandon()
        raise
    log.info("%s: %d labelled + %d unlabelled cases from %s (%s layout%s)", dest, len(out.training), len(out.test),
             source, layout, f"; {out.resumed} converted files reused" if out.resumed else "")
    return dataset_json

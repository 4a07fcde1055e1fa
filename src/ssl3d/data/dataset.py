"""Datasets in the MSD / nnU-Net layout, and the checks every case passes before anything uses it.

Phantoms and real datasets share one layout (``dataset.json`` + ``imagesTr``/``labelsTr``/``imagesTs``), so one
reader serves both. The file list comes from ``dataset.json``, never from a glob: MSD archives carry macOS
``._*`` files that a glob would pick up.

A broken file must fail with its name and the fix, not deep inside a transform: ``load_case`` reads every voxel
(a truncated ``.nii.gz`` only fails when decompressed) and checks that image and label share a grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl3d.data.files import stem
from ssl3d.io import read_json

AFFINE_TOLERANCE_MM = 1e-3


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    labels: dict[int, str]
    modality: dict[str, str]
    labelled: tuple[Case, ...]
    unlabelled: tuple[Case, ...]
    regions: dict[str, list[int]] = field(default_factory=dict)  # evaluated target -> the label values it joins

    def case(self, case_id: str) -> Case:
        for case in self.labelled + self.unlabelled:
            if case.case_id == case_id:
                return case
        raise KeyError(f"{self.root / 'dataset.json'}: no case named {case_id!r}")


def case_id_of(path: str | Path) -> str:
    try:
        return stem(path)
    except ValueError as err:
        raise DataError(str(err)) from None


def read_dataset(root: str | Path) -> Dataset:
    """Read ``root/dataset.json``; every listed file must exist."""
    root = Path(root)
    meta = read_json(root / "dataset.json")
    for key in ("name", "labels", "training"):
        if key not in meta:
            raise DataError(f"{root / 'dataset.json'}: missing key {key!r} (MSD layout expects it)")

    def resolve(rel: str) -> Path:
        path = (root / rel).resolve()
        if not path.is_file():
            raise DataError(f"{path}: listed in {root / 'dataset.json'} but missing; restore the file or re-run prepare")
        return path

    labelled = tuple(
        Case(case_id_of(entry["image"]), resolve(entry["image"]), resolve(entry["label"]))
        for entry in meta["training"]
        if not Path(entry["image"]).name.startswith("._")
    )
    unlabelled = tuple(
        Case(case_id_of(rel), resolve(rel)) for rel in meta.get("test", []) if not Path(rel).name.startswith("._")
    )
    return Dataset(
        name=meta["name"],
        root=root,
        labels={int(k): v for k, v in meta["labels"].items()},
        modality=meta.get("modality", {}),
        labelled=labelled,
        unlabelled=unlabelled,
        regions=meta.get("regions", {}),
    )


def _unreadable(path: Path, err: Exception) -> DataError:
    reason = " ".join(str(err).split())  # nibabel's "could the file be damaged?" is on a second line
    return DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {reason}); the file is corrupt or "
                     "truncated: re-copy, re-download or regenerate it")


def open_nifti(path: str | Path) -> nib.spatialimages.SpatialImage:
    """The image at ``path`` with its header read and its voxels not yet (shape and affine are cheap)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, ...)
        raise _unreadable(path, err) from err


def load_nifti(path: str | Path, channels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return (voxels, affine); every voxel is read so that truncation is detected here. ``channels``: an image
    may be 4D, its channels on the last axis (MSD's BrainTumour and the converted BraTS)."""
    img = open_nifti(path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise _unreadable(Path(path), err) from err
    if data.ndim != 3 and not (channels and data.ndim == 4):
        expected = "a 3D volume or a 4D one with channels last" if channels else "a 3D volume"
        raise DataError(f"{path}: expected {expected}, found shape {data.shape}")
    return data, img.affine


def load_label(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_nifti` for a label map, whose values must be whole class numbers: cast to integers, a NaN or a
    0.6 left by interpolation would silently become some class."""
    label, affine = load_nifti(path)
    if np.issubdtype(label.dtype, np.floating):
        bad = label[np.mod(label, 1) != 0]  # NaN and infinity included (their remainder is NaN)
        if bad.size:
            raise DataError(f"{path}: {bad.size} voxels hold label values that are not whole numbers (e.g. "
                            f"{np.unique(bad)[:4].tolist()}); a label map holds class numbers: re-export it with "
                            "nearest-neighbour resampling, as integers")
    return label, affine


def check_same_grid(image_path: Path, image_shape, image_affine, label_path: Path, label_shape, label_affine) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise DataError(f"{label_path}: label shape {tuple(label_shape)} differs from image shape "
                        f"{tuple(image_shape)} of {image_path}; image and label must share one voxel grid")
    if not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE_MM):
        raise DataError(f"{label_path}: label affine differs from the affine of {image_path} "
                        f"(max difference {np.abs(image_affine - label_affine).max():.4g} mm); "
                        "resample the label onto the image grid")


def validate_case(case: Case) -> None:
    """Read the case's files fully and check them; raises DataError naming the file."""
    image, image_affine = load_nifti(case.image, channels=True)
    if case.label is not None:
        label, label_affine = load_label(case.label)
        check_same_grid(case.image, image.shape[:3], image_affine, case.label, label.shape, label_affine)

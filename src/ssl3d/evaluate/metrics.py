"""Per-case, per-class segmentation metrics with an explicit empty-mask policy.

Every number reported by the benchmark comes from :func:`case_metrics`: Dice, IoU,
the 95th-percentile Hausdorff distance (HD95, mm) and the normalised surface Dice
(NSD, tolerance in mm). The overlap and distance computations are MONAI's
(``monai.metrics.compute_dice``, ``compute_iou``, ``compute_hausdorff_distance`` with
``percentile=95`` and ``compute_surface_dice``), applied to one-hot tensors of shape
``(1, C, X, Y, Z)`` with the voxel spacing passed through, so distances are in mm.

Why an empty-mask policy
------------------------
A metric is not defined, or is defined only by convention, when the reference or the
prediction of a class is empty (a structure absent from a scan, resected, or missed
by the model). Libraries disagree on the convention and some return ``inf`` or
``nan`` with only a warning, which then silently changes means across tables
(Metrics Reloaded, Maier-Hein et al. 2024, ask for the convention to be stated).
This module therefore decides the empty cases itself, *before* calling MONAI, from
an :class:`EmptyPolicy` that is recorded in every results table and manifest
(:meth:`EmptyPolicy.as_dict`). MONAI is only ever called on classes where both the
reference and the prediction are non-empty.

The rules, with the defaults and the reasons for them:

* **Exactly one of reference / prediction empty** (a miss or a false detection):
  ``dice = iou = nsd = 0`` always. There is no overlap and no boundary agreement, so
  there is no ambiguity and nothing to configure.
  HD95 depends on ``one_empty_distance``:

  - ``"max"`` (default): HD95 is the image diagonal in mm,
    ``sqrt(sum((shape[i] * spacing[i]) ** 2))``, i.e. the diagonal of the field of
    view (the extent of the image, ``shape`` voxels of ``spacing`` mm each, *not*
    ``shape - 1``). Failures are penalised rather than silently dropped from the
    mean, and because the largest distance between two voxel centres is only
    ``sqrt(sum(((shape[i] - 1) * spacing[i]) ** 2))``, a miss always scores strictly
    worse than any prediction that hits something.
  - ``"nan"``: HD95 is NaN and the case does not count for that class' HD95.

* **Both empty** (the structure is absent and the model correctly predicts nothing),
  depending on ``both_empty``:

  - ``"nan"`` (default, as nnU-Net): every metric is NaN, so the case does not count
    for that class. Absent structures do not inflate the means with free perfect
    scores, and per-class means stay means over cases where the class exists or
    was predicted.
  - ``"perfect"``: ``dice = iou = nsd = 1`` and ``hd95 = 0``.

Every row also carries ``empty_reference`` and ``empty_prediction`` flags, so a
table can be re-aggregated under another policy without recomputing.

Conventions inherited from MONAI (checked in ``tests/test_metrics.py``):

* Surfaces are the edge voxels of each mask (voxels removed by a binary erosion with
  a face-connected structuring element; voxels on the image border count as
  edges). Distances are between edge-voxel centres, scaled by the spacing.
* HD95 is ``max(P95(d(pred -> ref)), P95(d(ref -> pred)))``: the larger of the two
  *directed* 95th percentiles (as in Metrics Reloaded), not the 95th percentile of
  the pooled distances; percentiles use linear interpolation (``torch.quantile``).
* NSD counts a boundary voxel as correct when its distance is ``<= tolerance``
  (inclusive), boundaries are counted in edge voxels (no sub-voxel areas), and with
  ``spacing`` given the tolerance is in mm (MONAI's docstring says "pixels", which is
  only true for unit spacing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

from ssl3d.evaluate.columns import METRICS

__all__ = ["METRICS", "EmptyPolicy", "case_metrics", "image_diagonal_mm"]

_BOTH_EMPTY_CHOICES = ("nan", "perfect")
_ONE_EMPTY_DISTANCE_CHOICES = ("max", "nan")


@dataclass(frozen=True)
class EmptyPolicy:
    """What a metric is when a mask is empty. Recorded in every results table and manifest.

    both_empty: ``"nan"`` (the case does not count for that class, as nnU-Net) or
        ``"perfect"`` (dice = iou = nsd = 1, hd95 = 0).
    one_empty_distance: HD95 when exactly one of reference/prediction is empty:
        ``"max"`` (the image diagonal in mm, ``sqrt(sum((shape * spacing) ** 2))``) or ``"nan"``.

    When exactly one is empty, dice = iou = nsd = 0 always.
    """

    both_empty: str = "nan"
    one_empty_distance: str = "max"

    def __post_init__(self) -> None:
        for field, allowed in (
            ("both_empty", _BOTH_EMPTY_CHOICES),
            ("one_empty_distance", _ONE_EMPTY_DISTANCE_CHOICES),
        ):
            value = getattr(self, field)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(
                    f"EmptyPolicy.{field} must be one of {list(allowed)}, got {value!r}"
                )

    def as_dict(self) -> dict:
        return asdict(self)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image's field of view in mm: ``sqrt(sum((shape[i] * spacing[i]) ** 2))``.

    This is the HD95 given to a miss under ``EmptyPolicy(one_empty_distance="max")``.
    It uses ``shape`` (the extent of the image), not ``shape - 1`` (the largest
    distance between voxel centres), so it is strictly larger than any HD95 that a
    non-empty prediction can get.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} have different lengths")
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _check_label_map(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        # e.g. nibabel's get_fdata(); accepted only when every value is a whole number
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must be an integer label map; got dtype {arr.dtype} with non-integer values")
        return arr
    raise ValueError(f"{name} must be an integer label map; got dtype {arr.dtype}")


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError as err:
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing!r}") from err
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _check_tolerance(target: str, tol) -> float:
    try:
        value = float(tol)
    except (TypeError, ValueError) as err:
        raise ValueError(f"NSD tolerance for target {target!r} must be a number in mm, got {tol!r}") from err
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"NSD tolerance for target {target!r} must be finite and >= 0 mm, got {tol!r}")
    return value


def _resolve_tolerances(
    classes: Mapping[int, str], nsd_tolerance_mm: Mapping[str, float] | float
) -> dict[int, float]:
    if isinstance(nsd_tolerance_mm, Mapping):
        missing = [name for name in classes.values() if name not in nsd_tolerance_mm]
        if missing:
            raise ValueError(
                f"nsd_tolerance_mm has no tolerance for target(s) {missing}; "
                f"it has {sorted(map(str, nsd_tolerance_mm))}"
            )
        return {k: _check_tolerance(name, nsd_tolerance_mm[name]) for k, name in classes.items()}
    return {k: _check_tolerance(name, nsd_tolerance_mm) for k, name in classes.items()}


def _check_classes(classes: Mapping[int, str]) -> list[int]:
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError(f"classes must be a non-empty mapping label index -> target name, got {classes!r}")
    for k, name in classes.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(
                f"class indices must be integers >= 1 (background 0 is excluded by the caller), got {k!r}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"target name for class {k} must be a non-empty string, got {name!r}")
    names = list(classes.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"target names must be unique, got duplicates {duplicates}")
    return sorted(int(k) for k in classes)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    classes: dict[int, str],
    spacing: tuple[float, float, float],
    nsd_tolerance_mm: dict[str, float] | float,
    policy: EmptyPolicy = EmptyPolicy(),
) -> list[dict]:
    """One row per (class, metric): {"target": name, "metric": m, "value": float, "empty_reference": bool, "empty_prediction": bool}.

    pred, ref: integer label maps of the same shape (3D). classes: label index -> target name,
    background (0) excluded by the caller (an index < 1 is a ValueError). spacing: voxel size in mm
    along each axis of the arrays (used for hd95 and nsd). nsd_tolerance_mm: one tolerance for all
    classes or per target name (a missing name is a ValueError naming it; extra names are ignored).
    policy: what the metrics are for empty masks, see the module docstring.

    Rows are ordered by class index, then by ``METRICS`` order. Values are Python floats
    (dice, iou, nsd in [0, 1]; hd95 in mm; NaN where the policy says so).
    """
    if not isinstance(policy, EmptyPolicy):
        raise ValueError(f"policy must be an EmptyPolicy, got {policy!r}")
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got pred {pred.shape} and ref {ref.shape}")
    if pred.ndim != 3:
        raise ValueError(f"pred and ref must be 3D label maps, got shape {pred.shape}")
    pred = _check_label_map("pred", pred)
    ref = _check_label_map("ref", ref)
    spacing_mm = _check_spacing(spacing)
    labels = _check_classes(classes)
    tolerances = _resolve_tolerances(classes, nsd_tolerance_mm)
    diagonal = image_diagonal_mm(ref.shape, spacing_mm)

    values: dict[int, dict[str, float]] = {}
    flags: dict[int, tuple[bool, bool]] = {}
    computed: list[int] = []  # classes where both masks are non-empty: these go to MONAI
    pred_masks: list[np.ndarray] = []
    ref_masks: list[np.ndarray] = []
    nan = float("nan")
    for k in labels:
        p, r = pred == k, ref == k
        empty_ref, empty_pred = not r.any(), not p.any()
        flags[k] = (empty_ref, empty_pred)
        if empty_ref and empty_pred:
            if policy.both_empty == "perfect":
                values[k] = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
            else:
                values[k] = dict.fromkeys(METRICS, nan)
        elif empty_ref or empty_pred:
            hd = diagonal if policy.one_empty_distance == "max" else nan
            values[k] = {"dice": 0.0, "iou": 0.0, "hd95": hd, "nsd": 0.0}
        else:
            computed.append(k)
            pred_masks.append(p)
            ref_masks.append(r)

    if computed:
        # One channel per class, all classes in one call per metric; include_background=True
        # because channel 0 is a real class here, not background.
        y_pred = torch.from_numpy(np.stack(pred_masks)[None].astype(np.float32))
        y = torch.from_numpy(np.stack(ref_masks)[None].astype(np.float32))
        del pred_masks, ref_masks
        dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
        iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(spacing_mm)
        )
        nsd = compute_surface_dice(
            y_pred,
            y,
            class_thresholds=[tolerances[k] for k in computed],
            include_background=True,
            spacing=list(spacing_mm),
        )
        for c, k in enumerate(computed):
            values[k] = {
                "dice": float(dice[0, c]),
                "iou": float(iou[0, c]),
                "hd95": float(hd95[0, c]),
                "nsd": float(nsd[0, c]),
            }

    rows: list[dict] = []
    for k in labels:
        empty_ref, empty_pred = flags[k]
        for m in METRICS:
            rows.append(
                {
                    "target": classes[k],
                    "metric": m,
                    "value": values[k][m],
                    "empty_reference": empty_ref,
                    "empty_prediction": empty_pred,
                }
            )
    return rows

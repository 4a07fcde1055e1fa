"""Tests for ssl3d.evaluate.metrics: hand-computed values and the empty-mask policy.

Every expected value is written out from the geometry so that a reader can check it
without running MONAI.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from ssl3d.evaluate.metrics import METRICS, EmptyPolicy, case_metrics, image_diagonal_mm

# MONAI 1.6.1's own get_edge_surface_distance passes a deprecated argument to get_mask_edges;
# the FutureWarning is MONAI-internal and says nothing about this code.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def table(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["target"], r["metric"]): r["value"] for r in rows}


def flags(rows: list[dict], target: str) -> tuple[bool, bool]:
    (pair,) = {(r["empty_reference"], r["empty_prediction"]) for r in rows if r["target"] == target}
    return pair


def plate_pair(shape, plate_axis, shift, lo=1, hi=7, at=2):
    """Reference: a one-voxel-thin plate perpendicular to `plate_axis` at index `at`,
    spanning [lo, hi) on the two other axes. Prediction: the same plate moved by `shift`
    voxels along `plate_axis`. Every voxel of a thin plate is a surface voxel, and the
    nearest voxel of the other plate is the one straight across, so every surface
    distance (both directions) equals shift * spacing[plate_axis]."""
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    idx_ref = [slice(lo, hi)] * 3
    idx_pred = [slice(lo, hi)] * 3
    idx_ref[plate_axis] = at
    idx_pred[plate_axis] = at + shift
    ref[tuple(idx_ref)] = 1
    pred[tuple(idx_pred)] = 1
    return pred, ref


# --------------------------------------------------------------------------- overlap


def test_overlapping_boxes_dice_and_iou_by_hand():
    ref = np.zeros((12, 12, 12), dtype=np.int16)
    pred = np.zeros((12, 12, 12), dtype=np.int16)
    ref[0:4, 0:5, 0:6] = 1  # |A| = 4*5*6 = 120
    pred[2:6, 1:5, 3:9] = 1  # |B| = 4*4*6 = 96
    # A∩B = [2:4, 1:5, 3:6] -> 2*4*3 = 24;  |A∪B| = 120 + 96 - 24 = 192
    rows = case_metrics(pred, ref, {1: "box"}, (1.0, 1.0, 1.0), 1.0)
    t = table(rows)
    assert t["box", "dice"] == pytest.approx(2 * 24 / (120 + 96))  # = 2/9
    assert t["box", "iou"] == pytest.approx(24 / 192)  # = 1/8
    assert flags(rows, "box") == (False, False)


def test_identical_masks_are_perfect():
    shape = (20, 16, 12)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[3:12, 2:10, 4:9] = 1
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    ref[(zz - 14) ** 2 + (yy - 10) ** 2 + (xx - 6) ** 2 <= 9] = 2
    rows = case_metrics(ref.copy(), ref, {1: "box", 2: "ball"}, (0.7, 1.3, 2.5), 0.5)
    t = table(rows)
    for target in ("box", "ball"):
        assert t[target, "dice"] == 1.0
        assert t[target, "iou"] == 1.0
        assert t[target, "hd95"] == 0.0
        assert t[target, "nsd"] == 1.0
        assert flags(rows, target) == (False, False)


# --------------------------------------------------------------------------- HD95


@pytest.mark.parametrize("k", [1, 3])
def test_hd95_single_voxels_anisotropic_spacing(k):
    spacing = (1.5, 1.0, 3.0)
    shape = (10, 8, 10)
    # offset of k voxels along axis 2 (3.0 mm): distance 3.0*k mm in both directions
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    ref[2, 3, 2] = 1
    pred[2, 3, 2 + k] = 1
    assert table(case_metrics(pred, ref, {1: "v"}, spacing, 1.0))["v", "hd95"] == pytest.approx(3.0 * k)
    # the same offset along axis 0 (1.5 mm): 1.5*k mm
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    ref[2, 3, 2] = 1
    pred[2 + k, 3, 2] = 1
    assert table(case_metrics(pred, ref, {1: "v"}, spacing, 1.0))["v", "hd95"] == pytest.approx(1.5 * k)


@pytest.mark.parametrize("axis, mm_per_voxel", [(0, 1.5), (1, 1.0), (2, 3.0)])
@pytest.mark.parametrize("k", [1, 2])
def test_hd95_thin_plate_shifted_perpendicular(axis, mm_per_voxel, k):
    pred, ref = plate_pair((10, 10, 10), axis, k)
    rows = case_metrics(pred, ref, {1: "plate"}, (1.5, 1.0, 3.0), 100.0)
    # every surface distance is k * spacing[axis], so every percentile is that value
    assert table(rows)["plate", "hd95"] == pytest.approx(k * mm_per_voxel)
    # the plates are disjoint
    assert table(rows)["plate", "dice"] == 0.0


def test_hd95_is_max_of_directed_95th_percentiles_with_outlier():
    """Plate of 16 voxels in both masks plus one stray predicted voxel 10 voxels away.

    spacing[0] = 1.5 mm, so the stray voxel is 10 * 1.5 = 15 mm from the nearest
    reference voxel (2, 3, 2)... (5, 3, 2) -> (15, 3, 2).
    pred -> ref distances: 16 zeros and 15.0 (17 values). Linear-interpolated 95th
    percentile: position 0.95 * (17 - 1) = 15.2, between sorted[15] = 0 and
    sorted[16] = 15, i.e. 0.2 * 15 = 3.0 mm.
    ref -> pred distances: 16 zeros -> 0.
    HD95 = max(3.0, 0.0) = 3.0 mm. (The 95th percentile of the 33 pooled distances
    would be 0, so this pins down the directed-max definition.)
    """
    shape = (18, 8, 6)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[2:6, 2:6, 2] = 1  # 16 voxels, all of them surface voxels
    pred = ref.copy()
    pred[15, 3, 2] = 1
    t = table(case_metrics(pred, ref, {1: "p"}, (1.5, 2.0, 3.0), 2.0))
    assert t["p", "hd95"] == pytest.approx(0.2 * 15.0, rel=1e-5)
    assert t["p", "dice"] == pytest.approx(2 * 16 / (16 + 17))
    assert t["p", "iou"] == pytest.approx(16 / 17)
    # NSD (tolerance 2 mm): correct boundary voxels 16 (pred) + 16 (ref) of 17 + 16
    assert t["p", "nsd"] == pytest.approx((16 + 16) / (17 + 16))


# --------------------------------------------------------------------------- NSD


def test_nsd_plate_shift_below_and_above_tolerance_in_mm():
    spacing = (1.5, 1.0, 3.0)
    # shift by 1 voxel along axis 2 -> every surface distance is 3.0 mm
    pred, ref = plate_pair((10, 10, 10), 2, 1)
    nsd = lambda tol: table(case_metrics(pred, ref, {1: "p"}, spacing, tol))["p", "nsd"]  # noqa: E731
    assert nsd(3.5) == 1.0  # 3.0 mm <= 3.5 mm for every surface voxel
    assert nsd(2.0) == 0.0  # 3.0 mm > 2.0 mm; the shift is 1 voxel, so 2.0 is read as mm, not voxels
    assert nsd(3.0) == 1.0  # the tolerance is inclusive (d <= tau)
    # shift by 1 voxel along axis 1 -> 1.0 mm, below a 2.0 mm tolerance
    pred, ref = plate_pair((10, 10, 10), 1, 1)
    assert table(case_metrics(pred, ref, {1: "p"}, spacing, 2.0))["p", "nsd"] == 1.0
    assert table(case_metrics(pred, ref, {1: "p"}, spacing, 0.5))["p", "nsd"] == 0.0


def test_nsd_per_target_tolerance_dict():
    spacing = (1.0, 1.0, 3.0)
    shape = (10, 20, 10)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    # two thin plates perpendicular to axis 2, each predicted 1 voxel (3.0 mm) too high
    ref[1:7, 1:7, 2], pred[1:7, 1:7, 3] = 1, 1
    ref[1:7, 11:17, 2], pred[1:7, 11:17, 3] = 2, 2
    classes = {1: "liver", 2: "spleen"}
    t = table(case_metrics(pred, ref, classes, spacing, {"liver": 2.0, "spleen": 4.0, "unused": 9.0}))
    assert t["liver", "nsd"] == 0.0  # 3.0 mm > 2.0 mm
    assert t["spleen", "nsd"] == 1.0  # 3.0 mm <= 4.0 mm
    # one number applies to every class
    t = table(case_metrics(pred, ref, classes, spacing, 4.0))
    assert (t["liver", "nsd"], t["spleen", "nsd"]) == (1.0, 1.0)
    with pytest.raises((KeyError, ValueError), match="spleen"):
        case_metrics(pred, ref, classes, spacing, {"liver": 2.0})


# --------------------------------------------------------------------------- empty policy

SHAPE = (10, 20, 30)
SPACING = (1.0, 2.0, 3.0)
# image diagonal = field of view diagonal, shape (not shape - 1) times spacing:
# sqrt((10*1)^2 + (20*2)^2 + (30*3)^2) = sqrt(100 + 1600 + 8100) = sqrt(9800) = 70*sqrt(2)
DIAGONAL = 70.0 * math.sqrt(2.0)


def _empty_cases():
    """Label 1 ("present") is in both masks and identical; label 2 ("absent") is in
    neither; label 3 ("missed") only in the reference; label 4 ("false_pos") only in
    the prediction."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    pred[1:4, 1:4, 1:4] = 1
    ref[6:9, 10:15, 20:25] = 3
    pred[6:9, 2:6, 20:25] = 4
    classes = {1: "present", 2: "absent", 3: "missed", 4: "false_pos"}
    return pred, ref, classes


def test_image_diagonal_uses_shape_times_spacing():
    assert image_diagonal_mm(SHAPE, SPACING) == pytest.approx(DIAGONAL)
    assert DIAGONAL == pytest.approx(98.9949, abs=1e-4)


@pytest.mark.parametrize("both_empty", ["nan", "perfect"])
@pytest.mark.parametrize("one_empty_distance", ["max", "nan"])
def test_empty_policy_branches(both_empty, one_empty_distance, recwarn):
    pred, ref, classes = _empty_cases()
    policy = EmptyPolicy(both_empty=both_empty, one_empty_distance=one_empty_distance)
    rows = case_metrics(pred, ref, classes, SPACING, 2.0, policy)
    t = table(rows)

    assert flags(rows, "present") == (False, False)
    assert flags(rows, "absent") == (True, True)
    assert flags(rows, "missed") == (False, True)  # reference non-empty, prediction empty
    assert flags(rows, "false_pos") == (True, False)  # reference empty, prediction non-empty

    # present and identical: unaffected by the policy
    assert [t["present", m] for m in METRICS] == [1.0, 1.0, 0.0, 1.0]

    # both empty
    if both_empty == "nan":
        assert all(math.isnan(t["absent", m]) for m in METRICS)
    else:
        assert [t["absent", m] for m in METRICS] == [1.0, 1.0, 0.0, 1.0]

    # exactly one empty: dice = iou = nsd = 0 always; hd95 = diagonal or NaN
    for target in ("missed", "false_pos"):
        assert (t[target, "dice"], t[target, "iou"], t[target, "nsd"]) == (0.0, 0.0, 0.0)
        if one_empty_distance == "max":
            assert t[target, "hd95"] == pytest.approx(DIAGONAL)
        else:
            assert math.isnan(t[target, "hd95"])

    # the empty cases are decided here, never handed to MONAI (which would warn about them)
    assert not [w for w in recwarn if "is all 0" in str(w.message)]


def test_default_policy_is_nan_and_max():
    policy = EmptyPolicy()
    assert policy.as_dict() == {"both_empty": "nan", "one_empty_distance": "max"}
    pred, ref, classes = _empty_cases()
    t = table(case_metrics(pred, ref, classes, SPACING, 2.0))
    assert math.isnan(t["absent", "dice"])
    assert t["missed", "hd95"] == pytest.approx(DIAGONAL)


@pytest.mark.parametrize(
    "kwargs, field, bad",
    [
        ({"both_empty": "zero"}, "both_empty", "zero"),
        ({"one_empty_distance": "inf"}, "one_empty_distance", "inf"),
        ({"both_empty": None}, "both_empty", "None"),
    ],
)
def test_bad_policy_value_raises(kwargs, field, bad):
    with pytest.raises(ValueError, match=field) as err:
        EmptyPolicy(**kwargs)
    assert bad in str(err.value)


# --------------------------------------------------------------------------- validation and layout


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        case_metrics(np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 7), np.uint8), {1: "a"}, (1, 1, 1), 1.0)
    assert "(4, 5, 6)" in str(err.value) and "(4, 5, 7)" in str(err.value)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, 1.0, 1.0, 1.0)])
def test_bad_spacing_raises(spacing):
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, {1: "a"}, spacing, 1.0)


def test_other_input_checks():
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(ValueError, match=re.escape("(4, 5)")):  # not 3D
        case_metrics(a[..., 0], a[..., 0], {1: "a"}, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="background"):
        case_metrics(a, a, {0: "bg", 1: "a"}, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        case_metrics(a, a, {1: "a"}, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="integer"):
        case_metrics(a + 0.5, a.astype(float), {1: "a"}, (1, 1, 1), 1.0)
    # whole-number floats (nibabel's get_fdata) are accepted
    b = a.copy()
    b[1:3, 1:3, 1:3] = 1
    t = table(case_metrics(b.astype(np.float64), b.astype(np.float64), {1: "a"}, (1, 1, 1), 1.0))
    assert t["a", "dice"] == 1.0


def test_rows_ordered_by_class_index_then_metric_and_typed():
    pred, ref, _ = _empty_cases()
    classes = {4: "false_pos", 1: "present", 3: "missed", 2: "absent"}  # deliberately unordered
    rows = case_metrics(pred, ref, classes, SPACING, 2.0)
    assert [(r["target"], r["metric"]) for r in rows] == [
        (name, m) for name in ("present", "absent", "missed", "false_pos") for m in METRICS
    ]
    for r in rows:
        assert set(r) == {"target", "metric", "value", "empty_reference", "empty_prediction"}
        assert type(r["value"]) is float
        assert type(r["empty_reference"]) is bool and type(r["empty_prediction"]) is bool


def test_multiclass_case_equals_per_class_cases():
    """All classes go to MONAI in one multi-channel call; each class alone takes MONAI's
    single-channel path. Both must give the same numbers."""
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[2:10, 2:10, 2:8] = 1
    ref[12:22, 4:16, 6:14] = 2
    ref[3:8, 12:18, 10:15] = 3
    pred = np.roll(ref, 1, axis=0)
    pred[rng.random(shape) < 0.01] = 2
    classes = {1: "a", 2: "b", 3: "c"}
    spacing = (0.8, 1.2, 2.5)
    tol = {"a": 1.0, "b": 2.0, "c": 3.0}
    together = table(case_metrics(pred, ref, classes, spacing, tol))
    for k, name in classes.items():
        alone = table(case_metrics(np.where(pred == k, k, 0), np.where(ref == k, k, 0), {k: name}, spacing, tol))
        for m in METRICS:
            assert together[name, m] == pytest.approx(alone[name, m], rel=1e-6), (name, m)
        assert 0.0 < together[name, "dice"] < 1.0

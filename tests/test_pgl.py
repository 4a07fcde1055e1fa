"""PGL's prior-guided alignment, proved on volumes whose voxels hold their own coordinates, and its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl3d.pretrain import optim
from ssl3d.pretrain.bricks.ema import EMATarget
from ssl3d.pretrain.bricks.losses import regression_loss
from ssl3d.pretrain.bricks.views import augment_view, overlap_fraction, overlapping_boxes
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.pgl_align import align, common_region, roi_align
from ssl3d.pretrain.registry import get_method

PATCH = (32, 32, 16)
SPATIAL = (64, 64, 32)  # PGL's region: twice the input size
SPATIAL_ONLY = {"p_noise": 0.0, "p_blur": 0.0, "p_contrast": 0.0, "p_gamma": 0.0}


def coordinate_region() -> np.ndarray:
    """(3, X, Y, Z): each voxel holds its centre's coordinates relative to the region's centre."""
    centres = np.meshgrid(*[np.arange(n) + 0.5 - n / 2 for n in SPATIAL], indexing="ij")
    return np.stack(centres).astype(np.float32)


def identity_encoder_pair(seed: int, stride: int):
    """Two views of the coordinate region with random overlapping crops and flips, "encoded" by average pooling
    at ``stride`` (the map of a linear ramp holds its cell centres' coordinates)."""
    rng = np.random.default_rng(seed)
    boxes = overlapping_boxes(SPATIAL, PATCH, rng)
    views = [augment_view(coordinate_region(), PATCH, rng, box=box, **SPATIAL_ONLY) for box in boxes]
    maps = [F.avg_pool3d(torch.from_numpy(view.image)[None], stride) for view in views]
    boxes = [torch.from_numpy(view.box)[None] for view in views]
    flips = [torch.from_numpy(view.flips)[None] for view in views]
    return maps, boxes, flips, common_region(*boxes)


def inside(box: torch.Tensor, region: torch.Tensor, size, ratio: int = 2) -> torch.Tensor:
    """Bins whose RoIAlign samples all lie at least half a cell inside the map (no border clamping)."""
    per_axis = []
    for axis, n in enumerate(size):
        start, stop = ((region[0, :, axis] - box[0, 0, axis]) * n / box[0, 1, axis]).tolist()
        k = torch.arange(n)
        first, last = start + (k + 0.5 / ratio) * (stop - start) / n, start + (k + 1 - 0.5 / ratio) * (stop - start) / n
        per_axis.append((first >= 0.5) & (last <= n - 0.5))
    x, y, z = per_axis
    return x[:, None, None] & y[None, :, None] & z[None, None, :]


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_aligned_maps_agree(stride):
    flipped_axes, checked = set(), 0
    for seed in range(12):
        maps, boxes, flips, region = identity_encoder_pair(seed, stride)
        flipped_axes |= {axis for f in flips for axis in np.flatnonzero(f[0].numpy())}
        aligned = [align(m, b, f, region) for m, b, f in zip(maps, boxes, flips)]
        # away from the maps' borders the aligned coordinates are equal; at a border RoIAlign clamps to the edge
        # cell, at most half a cell (stride x the crop's 1.4 scale / 2) away
        keep = inside(boxes[0], region, maps[0].shape[2:]) & inside(boxes[1], region, maps[1].shape[2:])
        difference = (aligned[0] - aligned[1])[0]
        if keep.any():
            assert difference[:, keep].abs().max() < 1e-4
            checked += 1
        assert difference.abs().max() <= 0.7 * stride + 1e-4
        assert regression_loss(*aligned).mean() < 0.03
    assert flipped_axes == {0, 1, 2} and checked >= 6  # flips on each axis, interiors in most pairs


def test_roi_align_samples_at_float32_coordinates_on_bf16_maps():
    """Under bf16 autocast (the CUDA default) the maps are bf16; the sampling points must not be: on a 64-cell
    ramp (integers, exact in bf16) each bin reads its own position, not one rounded to bf16's 0.25-cell steps."""
    ramp = torch.arange(64, dtype=torch.float32).view(1, 1, 64, 1, 1).expand(1, 1, 64, 2, 2)
    roi = torch.tensor([[[40.3, 0.0, 0.0], [56.7, 2.0, 2.0]]])
    expected = roi_align(ramp, roi, (8, 1, 1))[0, 0, :, 0, 0]
    bins = 40.3 + (torch.arange(8) + 0.5) * 16.4 / 8  # bin centres in map cells; cell i holds i at i + 0.5
    assert torch.allclose(expected, bins - 0.5, atol=1e-4)
    assert (roi_align(ramp.bfloat16(), roi, (8, 1, 1))[0, 0, :, 0, 0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("switches", [(False, False), (False, True), (True, False)])
def test_without_alignment_the_maps_disagree(switches):
    losses = []
    for seed in range(12):
        maps, boxes, flips, region = identity_encoder_pair(seed, 2)
        aligned = [align(m, b, f, region, *switches) for m, b, f in zip(maps, boxes, flips)]
        losses.append(regression_loss(*aligned).mean().item())
    assert np.mean(losses) > 0.5


def test_boxes_off_the_stride_grid():
    # crops whose start and size are not multiples of the stride, one view flipped on every axis
    region = torch.tensor([[[5.0, 9.0, 3.0], [41.0, 47.0, 21.0]]])
    boxes = [torch.tensor([[[5.0, 3.0, 1.0], [41.0, 44.0, 20.0]]]), torch.tensor([[[0.0, 9.0, 3.0], [45.0, 43.0, 22.0]]])]
    flips = [torch.tensor([[False, False, False]]), torch.tensor([[True, True, True]])]
    source = torch.from_numpy(coordinate_region())[None]
    maps = []
    for box, flip in zip(boxes, flips):
        (x, y, z), (sx, sy, sz) = box[0].int().tolist()
        view = F.interpolate(source[..., x:x + sx, y:y + sy, z:z + sz], size=PATCH, mode="trilinear")
        maps.append(F.avg_pool3d(view.flip((2, 3, 4)) if flip.all() else view, 4))
    aligned = [align(m, b, f, region) for m, b, f in zip(maps, boxes, flips)]
    keep = inside(boxes[0], region, maps[0].shape[2:]) & inside(boxes[1], region, maps[1].shape[2:])
    assert keep.any() and (aligned[0] - aligned[1])[0][:, keep].abs().max() < 1e-4


def test_overlap_rule():
    box = np.array([[0, 0, 0], [10, 10, 10]], dtype=np.float32)
    assert overlap_fraction(box, box) == 1.0
    assert overlap_fraction(box, np.array([[5, 0, 0], [10, 10, 10]], dtype=np.float32)) == 0.5
    assert overlap_fraction(box, np.array([[9.5, 9.5, 9.5], [10, 10, 10]], dtype=np.float32)) < 0.1
    rng = np.random.default_rng(0)
    wide = tuple(3 * n for n in PATCH)
    free = [overlap_fraction(*overlapping_boxes(wide, PATCH, rng, min_overlap=0.0)) for _ in range(200)]
    kept = [overlap_fraction(*overlapping_boxes(wide, PATCH, rng, min_overlap=0.1)) for _ in range(200)]
    assert np.mean(np.array(free) < 0.1) > 0.3 and min(kept) >= 0.1
    with pytest.raises(ValueError, match="overlap by 90%"):
        overlapping_boxes((200, 200, 200), (10, 10, 10), rng, min_overlap=0.9, attempts=5)


def test_loss_is_two_minus_two_cos_and_symmetric():
    u = torch.tensor([[1.0, 2.0, 3.0]])
    assert regression_loss(u, 5 * u).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(u, -u).item() == pytest.approx(4.0)
    v = torch.tensor([[0.0, 1.0, 0.0]])
    assert regression_loss(torch.tensor([[1.0, 0.0, 0.0]]), v).item() == pytest.approx(2.0)
    method = _tiny_pgl()
    batch = method_batch(method)
    terms = method.loss_terms(batch)
    swapped = {**{f"{k}1": batch[f"{k}2"] for k in ("view", "box", "flips")},
               **{f"{k}2": batch[f"{k}1"] for k in ("view", "box", "flips")}}
    method.eval()  # batch norm with running statistics, so both orders see the same normalisation
    assert method.loss_terms(batch)["local"].item() == pytest.approx(method.loss_terms(swapped)["local"].item(),
                                                                     rel=1e-5)
    assert set(terms) == {"local"}


def _tiny_pgl(**overrides):
    cls = get_method("pgl")
    config = make_config(cls.Config, {"patch_size": [16, 16, 16], "batch_size": 2, "projector_hidden": 16,
                                      "predictor_hidden": 16, "projection_dim": 8, **overrides})
    torch.manual_seed(0)
    return cls(config, {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0})


def method_batch(method) -> dict[str, torch.Tensor]:
    region = np.random.default_rng(0).random((1, *method.region_size()), dtype=np.float32)
    samples = [method.make_views(region, np.random.default_rng(seed)) for seed in range(2)]
    return {key: torch.stack([torch.as_tensor(np.asarray(s[key], dtype=np.float32)) for s in samples])
            for key in samples[0]}


def test_views_carry_their_prior():
    method = _tiny_pgl()
    views = method.make_views(np.zeros((1, 32, 32, 32), np.float32), np.random.default_rng(1))
    assert views["view1"].shape == (1, 16, 16, 16) and views["box1"].shape == (2, 3) and views["flips2"].shape == (3,)
    assert overlap_fraction(views["box1"], views["box2"]) >= 0.1
    assert ((views["box1"][1] >= 16 * 1.1 - 0.5) & (views["box1"][1] <= 16 * 1.4 + 0.5)).all()


def test_global_term_and_ablation_switches():
    method = _tiny_pgl(loss_weights={"local": 1.0, "global": 0.5})
    batch = method_batch(method)
    terms = method.loss_terms(batch)
    assert set(terms) == {"local", "global"} and all(torch.isfinite(t) for t in terms.values())
    total = method.total_loss(terms)
    total.backward()
    backbone = method.online.backbone
    assert all(p.grad is not None for name, p in backbone.named_parameters() if backbone.part(name) == "encoder")
    assert all(p.grad is None for p in method.target.parameters())
    local = {switches: _tiny_pgl(align_flip=switches[0], align_crop_scale=switches[1]).loss_terms(batch)["local"]
             for switches in [(True, True), (False, True), (True, False), (False, False)]}
    assert len({round(value.item(), 6) for value in local.values()}) == 4


def test_reuses_the_bricks():
    method = _tiny_pgl()
    assert isinstance(method.target, EMATarget)
    optimizer = optim.build_optimizer(method, {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6})
    assert isinstance(optimizer, optim.LARS)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in method.target.parameters()}

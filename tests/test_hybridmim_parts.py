"""HybridMIM's region labels, losses and region pooling, against the fixtures of methods.md §10 (F3-F6)."""

from __future__ import annotations

import pytest
import torch

from ssl3d.pretrain.bricks.masking import apply_patch_mask, random_patch_mask
from ssl3d.pretrain.hybridmim_parts import (
    consistency_loss,
    count_loss,
    location_loss,
    masked_reconstruction_loss,
    region_labels,
    region_features,
)
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method

TOL = 1e-5


def _raster(ix: int, iy: int, iz: int, n: int = 6) -> int:
    return (ix * n + iy) * n + iz


def _f3_tensors():
    """F3 recipe: logits then a Bernoulli(0.4) patch mask, labels with the official (raster) grouping."""
    torch.manual_seed(1)
    cnt = torch.randn(2, 27, 9)
    pos = torch.randn(2, 27, 8)
    m = (torch.rand(2, 216) < 0.4).float()
    count, position = region_labels(m, 6, "code_raster")
    return cnt, pos, m, count, position


def test_f3_f4_count_and_location():
    cnt, pos, m, count, position = _f3_tensors()
    assert count.dtype == torch.long and count.shape == (2, 27) and position.shape == (2, 27, 8)
    assert torch.equal(count.sum(dim=1), m.sum(dim=1).long())
    assert count_loss(cnt, count).item() == pytest.approx(2.5263236, abs=TOL)
    assert location_loss(pos, position).item() == pytest.approx(0.7919421, abs=TOL)


def test_f5_consistency_and_gradients():
    cnt, pos, *_ = _f3_tensors()
    ce, mse = consistency_loss(cnt, pos)
    assert ce.item() == pytest.approx(2.6394675, abs=TOL)
    assert mse.item() == pytest.approx(7.9074073, abs=TOL)
    assert ((ce + mse) / 2).item() == pytest.approx(5.2734375, abs=TOL)
    cnt, pos = cnt.requires_grad_(), pos.requires_grad_()
    ce, mse = consistency_loss(cnt, pos)
    assert ce.requires_grad and not mse.requires_grad and mse.grad_fn is None
    ce.backward()
    assert cnt.grad.abs().sum() > 0 and pos.grad is None  # only the count head is trained by the CE half


def test_f6_masking_and_masked_reconstruction():
    torch.manual_seed(2)
    x = torch.rand(2, 1, 96, 96, 96) * 0.999 + 0.001
    mask = random_patch_mask(2, 216, 0.4)  # consumes rand(2, 216), as the official mask_func
    masked = apply_patch_mask(x, mask, 16)
    pred = torch.rand(2, 1, 64, 64, 64)
    box = (..., slice(32, 96), slice(32, 96), slice(32, 96))
    assert torch.equal(mask.sum(dim=1), torch.full((2,), 87.0))
    assert (masked == 0).float().mean().item() == pytest.approx(0.4027778, abs=TOL)
    assert masked_reconstruction_loss(pred, x[box], masked[box]).item() == pytest.approx(0.1668031, abs=TOL)


def test_masked_reconstruction_weights_only_zero_voxels():
    target = torch.full((1, 1, 2, 2, 2), 0.5)
    masked = target.clone()
    masked[0, 0, 0, 0, :] = 0.0
    pred = target + torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    assert masked_reconstruction_loss(pred, target, masked).item() == pytest.approx((0 + 1) / 2)
    assert masked_reconstruction_loss(pred, target, target).item() == 0.0  # empty mask: 0, not NaN


def _mask_of(patches, n: int = 6) -> torch.Tensor:
    mask = torch.zeros(1, n ** 3)
    mask[0, [_raster(*p, n=n) for p in patches]] = 1.0
    return mask


REGION0 = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


def test_region_labels_spatial_region_zero():
    # raster indices of REGION0: 0, 1, 6, 7, 36, 37, 42, 43
    assert sorted(_raster(*p) for p in REGION0) == [0, 1, 6, 7, 36, 37, 42, 43]
    mask = _mask_of(REGION0)
    count, position = region_labels(mask, 6, "spatial")
    assert count.tolist() == [[8] + [0] * 26]
    assert position[0, 0].tolist() == [1.0] * 8 and position[0, 1:].sum() == 0
    count, position = region_labels(mask, 6, "code_raster")
    # groups l // 8: 0, 1, 6, 7 -> 0 (slots 0, 1, 6, 7); 36, 37 -> 4 (slots 4, 5); 42, 43 -> 5 (slots 2, 3)
    expected = [0] * 27
    expected[0], expected[4], expected[5] = 4, 2, 2
    assert count.tolist() == [expected]
    assert position[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert position[0, 4].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert position[0, 5].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]


def test_region_labels_raster_group_zero():
    # raster indices 0..7 = patches (0,0,0..5), (0,1,0), (0,1,1): the official group 0, a 1x2x6 strip
    strip = [(0, 0, z) for z in range(6)] + [(0, 1, 0), (0, 1, 1)]
    assert sorted(_raster(*p) for p in strip) == list(range(8))
    mask = _mask_of(strip)
    count, position = region_labels(mask, 6, "code_raster")
    assert count.tolist() == [[8] + [0] * 26]
    count, position = region_labels(mask, 6, "spatial")
    # spatial region (0,0,0) = g 0 gets (0,0,0),(0,0,1),(0,1,0),(0,1,1): slots 0, 1, 2, 3;
    # (0,0,1) = g 1 gets (0,0,2),(0,0,3); (0,0,2) = g 2 gets (0,0,4),(0,0,5): slots 0, 1
    assert count.tolist() == [[4, 2, 2] + [0] * 24]
    assert position[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert position[0, 1].tolist() == position[0, 2].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_region_labels_slot_order_and_general_grid():
    # patch (3, 4, 1) on 6^3: region (1, 2, 0) -> g = 9*1 + 3*2 + 0 = 15, slot (1, 0, 1) -> k = 5
    count, position = region_labels(_mask_of([(3, 4, 1)]), 6, "spatial")
    assert count[0].nonzero().flatten().tolist() == [15] and position[0, 15].nonzero().flatten().tolist() == [5]
    # a non-cubic 4x2x6 grid: 3-per-axis is not needed; patch (2, 1, 5) -> region (1, 0, 2) = 1*3 + 2 = 5, k = 3
    mask = torch.zeros(1, 4 * 2 * 6)
    mask[0, (2 * 2 + 1) * 6 + 5] = 1
    count, position = region_labels(mask, (4, 2, 6), "spatial")
    assert count.shape == (1, 6) and count[0].tolist() == [0, 0, 0, 0, 0, 1]
    assert position[0, 5].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError):
        region_labels(torch.zeros(1, 125), 5)
    with pytest.raises(ValueError):
        region_labels(mask, (4, 2, 6), "cubes")


def test_region_labels_random_mask_consistency():
    mask = random_patch_mask(3, 216, 0.4, generator=torch.Generator().manual_seed(7))
    for grouping in ("spatial", "code_raster"):
        count, position = region_labels(mask, 6, grouping)
        assert count.min() >= 0 and count.max() <= 8
        assert torch.equal(count, position.sum(dim=-1).long())
        assert count.sum(dim=1).tolist() == [87, 87, 87]


def test_region_features_windows():
    x = torch.arange(2 * 3 * 12 ** 3, dtype=torch.float32).reshape(2, 3, 12, 12, 12)
    features = region_features(x)
    assert features.shape == (2, 27, 3)
    g = (1 * 3 + 2) * 3 + 0  # window (1, 2, 0)
    expected = x[1, 2, 4:8, 8:12, 0:4].mean()
    assert features[1, g, 2].item() == pytest.approx(expected.item())
    # arange: window mean = value at the window centre = base + 144*(4i+1.5) + 12*(4j+1.5) + (4k+1.5)
    i, j, k = torch.meshgrid(torch.arange(3), torch.arange(3), torch.arange(3), indexing="ij")
    centre = 144 * (4 * i + 1.5) + 12 * (4 * j + 1.5) + (4 * k + 1.5)
    torch.testing.assert_close(features[0, :, 0], centre.reshape(-1).float())
    assert region_features(torch.randn(1, 5, 6, 4, 2), regions_per_axis=2).shape == (1, 8, 5)


def test_hybridmim_reconstructs_only_the_target_region_around_the_centre():
    """The method's partial region: 64^3 of a 96^3 crop is bottleneck cells [2:10] (paper: centred), [4:12] in the
    official code's corner placement; sizes must fall on bottleneck cells."""
    cls = get_method("hybridmim")
    backbone = {"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]}
    centred = cls(make_config(cls.Config), backbone)
    assert centred._target_box(12, 96) == (2, 10)
    assert cls(make_config(cls.Config, {"region_position": "corner"}), backbone)._target_box(12, 96) == (4, 12)
    assert cls(make_config(cls.Config, {"reconstruction_size": None}), backbone)._target_box(12, 96) is None
    with pytest.raises(ValueError, match="hybridmim.reconstruction_size: 60 is not a multiple"):
        cls(make_config(cls.Config, {"reconstruction_size": 60}), backbone)._target_box(12, 96)

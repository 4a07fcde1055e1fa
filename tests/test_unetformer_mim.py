"""The UNetFormer-style MIM baseline: its patch masking and its L1 loss on the masked voxels only (methods.md §8.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method
from ssl3d.pretrain.transfer import plan_transfer

TINY_SWIN = {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def make_method(**overrides):
    cls = get_method("unetformer_mim")
    return cls(make_config(cls.Config, overrides), TINY_SWIN)


def numpy_voxel_mask(patch_mask: np.ndarray, grid, patch: int) -> np.ndarray:
    """(L,) raster patch mask, l = (i_x·n_y + i_y)·n_z + i_z, -> (1, X, Y, Z) boolean voxel mask, by loops."""
    voxels = np.zeros([1] + [n * patch for n in grid], dtype=bool)
    nx, ny, nz = grid
    for ix in range(nx):
        for iy in range(ny):
            for iz in range(nz):
                if patch_mask[(ix * ny + iy) * nz + iz]:
                    voxels[0, ix * patch:(ix + 1) * patch, iy * patch:(iy + 1) * patch,
                           iz * patch:(iz + 1) * patch] = True
    return voxels


class FixedPrediction(torch.nn.Module):
    """Stands in for the network: returns a given prediction whatever the input."""

    def __init__(self, prediction: np.ndarray):
        super().__init__()
        self.prediction = torch.from_numpy(prediction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction


def test_default_mask_hides_87_of_216_patches_reproducibly():
    method = make_method()
    region = np.random.default_rng(0).random((1, 96, 96, 96), dtype=np.float32)
    views = method.make_views(region, np.random.default_rng(7))
    assert views["mask"].shape == (216,) and views["mask"].sum() == 87  # 216 - int(216 * 0.6), ratio 0.4
    again = method.make_views(region, np.random.default_rng(7))
    assert all(np.array_equal(views[key], again[key]) for key in views)
    other = method.make_views(region, np.random.default_rng(8))
    assert not np.array_equal(views["mask"], other["mask"])


def test_masked_voxels_are_zero_and_the_rest_unchanged():
    method = make_method(patch_size=(32, 64, 32), mask_patch=16, mask_ratio=0.5)
    region = (np.random.default_rng(1).random((1, 32, 64, 32), dtype=np.float32) + 0.5).astype(np.float32)
    views = method.make_views(region, np.random.default_rng(2))
    voxels = numpy_voxel_mask(views["mask"], (2, 4, 2), 16)
    assert views["mask"].sum() == 8  # 16 - int(16 * 0.5)
    assert np.all(views["input"][voxels] == 0)
    assert np.array_equal(views["input"][~voxels], region[~voxels])
    assert np.array_equal(views["target"], region)


def loss_of(method, views, prediction) -> float:
    method.network = FixedPrediction(prediction[None])
    batch = {key: torch.from_numpy(value[None]) for key, value in views.items()}
    return method.loss_terms(batch)["reconstruction"].item()


def test_loss_is_l1_over_the_masked_voxels_only():
    method = make_method(patch_size=(4, 4, 4), mask_patch=2, mask_ratio=0.5)  # 8 patches of 2³, 4 masked
    rng = np.random.default_rng(3)
    region = rng.random((1, 4, 4, 4), dtype=np.float32)
    views = method.make_views(region, rng)
    voxels = numpy_voxel_mask(views["mask"], (2, 2, 2), 2)
    assert voxels.sum() == 32

    # by hand: the prediction is off by 0.25 on every masked voxel and by 10 on every visible one
    prediction = np.where(voxels, region + 0.25, region - 10).astype(np.float32)
    assert loss_of(method, views, prediction) == pytest.approx(0.25, abs=1e-6)

    prediction = rng.random((1, 4, 4, 4), dtype=np.float32)
    expected = np.abs(prediction - region)[voxels].mean()
    assert loss_of(method, views, prediction) == pytest.approx(expected, abs=1e-6)
    changed_visible = np.where(voxels, prediction, prediction + 3).astype(np.float32)
    assert loss_of(method, views, changed_visible) == pytest.approx(expected, abs=1e-6)
    changed_masked = np.where(voxels, prediction + 3, prediction).astype(np.float32)
    assert loss_of(method, views, changed_masked) != pytest.approx(expected, abs=1e-3)


def test_only_the_encoder_transfers():
    method = make_method(patch_size=(64, 64, 64))
    downstream = build_network(TINY_SWIN, in_channels=1, out_channels=3)
    _, report = plan_transfer(method.state_dict(), downstream, "swinunetr", method.transfer)
    assert report.fractions == {"encoder": 1.0, "decoder": 0.0, "head": 0.0}


def test_patch_size_must_be_whole_mask_patches():
    with pytest.raises(ValueError, match="unetformer_mim.mask_patch"):
        make_method(patch_size=(96, 96, 40))

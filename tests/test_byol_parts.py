"""BYOL's regression loss, projector head and augmented views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl3d.pretrain.byol_parts import byol_views, mlp_head, regression_loss, symmetric_byol_loss

PATCH = (16, 16, 12)
OFF = {"p_flip": 0.0, "p_noise": 0.0, "p_blur": 0.0, "p_contrast": 0.0, "p_gamma": 0.0}


def test_regression_loss_is_two_minus_two_cos():
    torch.manual_seed(0)
    p, z = torch.randn(8, 32), torch.randn(8, 32)
    torch.testing.assert_close(regression_loss(p, z), 2 - 2 * F.cosine_similarity(p, z, dim=1), atol=1e-6, rtol=0)
    assert regression_loss(p, 3 * p) == pytest.approx(torch.zeros(8), abs=1e-6)
    assert regression_loss(p, -0.5 * p) == pytest.approx(torch.full((8,), 4.0), abs=1e-6)
    maps = torch.randn(2, 16, 3, 3, 3), torch.randn(2, 16, 3, 3, 3)  # voxel-wise, along the channel axis
    torch.testing.assert_close(regression_loss(*maps), 2 - 2 * F.cosine_similarity(*maps, dim=1), atol=1e-6, rtol=0)


def test_symmetric_loss_has_no_gradient_into_targets():
    torch.manual_seed(1)
    p1, z2, p2, z1 = (torch.randn(4, 16, requires_grad=True) for _ in range(4))
    loss = symmetric_byol_loss(p1, z2, p2, z1)
    expected = (2 - 2 * F.cosine_similarity(p1, z2) + 2 - 2 * F.cosine_similarity(p2, z1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_mlp_head_shapes():
    head = mlp_head(32, 64, 8)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head(torch.randn(5, 32)).shape == (5, 8)


def _region(shape=(1, 24, 22, 18)) -> np.ndarray:
    return np.random.default_rng(42).random(shape, dtype=np.float32)


def test_views_shapes_determinism_and_difference():
    v1, v2 = byol_views(_region(), PATCH, np.random.default_rng(0))
    assert v1.shape == v2.shape == (1, *PATCH) and v1.dtype == v2.dtype == np.float32
    assert v1.flags.c_contiguous and v2.flags.c_contiguous
    w1, w2 = byol_views(_region(), PATCH, np.random.default_rng(0))
    np.testing.assert_array_equal(v1, w1)
    np.testing.assert_array_equal(v2, w2)
    assert not np.allclose(v1, v2)


def test_region_smaller_than_the_crop():
    views = byol_views(_region((1, 10, 30, 5)), PATCH, np.random.default_rng(3))
    assert all(view.shape == (1, *PATCH) and np.isfinite(view).all() for view in views)


def test_crop_covers_110_to_140_percent():
    # a unit ramp along x: after a trilinear resize of a crop of size S to P voxels, interior steps are S / P
    ramp = np.broadcast_to(np.arange(200, dtype=np.float32)[None, :, None, None], (1, 200, 40, 40)).copy()
    for seed in range(20):
        view, _ = byol_views(ramp, (20, 20, 20), np.random.default_rng(seed), **OFF)
        slope = np.diff(view[0, 5:15, 10, 10]).mean()
        assert 1.1 - 1e-3 <= slope <= 1.4 + 1e-3


def test_forced_flip_is_np_flip_of_the_unflipped_view():
    plain, _ = byol_views(_region(), PATCH, np.random.default_rng(5), **OFF)
    flipped, _ = byol_views(_region(), PATCH, np.random.default_rng(5), **{**OFF, "p_flip": 1.0})
    np.testing.assert_array_equal(flipped, np.flip(plain, axis=(1, 2, 3)))


def _forced(name: str, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    plain, _ = byol_views(_region(), PATCH, np.random.default_rng(seed), **OFF)
    changed, _ = byol_views(_region(), PATCH, np.random.default_rng(seed), **{**OFF, name: 1.0})
    return plain, changed


def test_forced_noise_blur_contrast_gamma():
    plain, noisy = _forced("p_noise")
    assert 0 < (noisy - plain).std() <= np.sqrt(0.1) * 1.05
    plain, blurred = _forced("p_blur")
    assert blurred.std() < 0.8 * plain.std() and blurred.mean() == pytest.approx(plain.mean(), abs=0.01)
    for seed in range(5):
        plain, scaled = _forced("p_contrast", seed)
        factor = np.median(scaled[plain > 0.2] / plain[plain > 0.2])
        assert 0.75 <= factor <= 1.25 and not np.allclose(scaled, plain)
        np.testing.assert_allclose(scaled, np.clip(factor * plain, plain.min(), plain.max()), atol=1e-5)
        plain, gamma = _forced("p_gamma", seed)
        assert gamma.min() == pytest.approx(plain.min(), abs=1e-6)
        assert gamma.max() == pytest.approx(plain.max(), abs=1e-6)
        order = np.argsort(plain, axis=None)
        assert (np.diff(gamma.ravel()[order]) >= -1e-6).all() and not np.allclose(gamma, plain)

"""The shared PGL/BYOL augmented views."""

from __future__ import annotations

import numpy as np
import pytest

from ssl3d.pretrain.bricks.views import byol_views

PATCH = (16, 16, 12)
OFF = {"p_flip": 0.0, "p_noise": 0.0, "p_blur": 0.0, "p_contrast": 0.0, "p_gamma": 0.0}


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

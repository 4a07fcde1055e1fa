"""Augmented views for the two-view methods, shared so that methods compared with each other see the same views.

PGL (Xie et al. 2020, §3.2) defines one augmentation list; its global-consistency baseline BYOL must use the very
same list so that BYOL and PGL differ only in global vs local consistency. Both therefore draw their views from
:func:`augment_view`. BYOL needs no overlap between its two crops (:func:`byol_views` makes them independently);
PGL's overlapping crops build on the same steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _crop_and_resize(region: np.ndarray, patch_size, rng: np.random.Generator) -> np.ndarray:
    """A crop of 110-140 % of ``patch_size`` per axis (at most the region) at a random place, resized to it."""
    spatial = region.shape[1:]
    size = [min(n, max(1, round(rng.uniform(1.1, 1.4) * p))) for n, p in zip(spatial, patch_size)]
    start = [rng.integers(0, n - s + 1) for n, s in zip(spatial, size)]
    crop = region[(slice(None), *(slice(a, a + s) for a, s in zip(start, size)))]
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None],
                            size=tuple(patch_size), mode="trilinear", align_corners=False)
    return resized[0].numpy()


def _scale_contrast(view: np.ndarray, factor: float) -> np.ndarray:
    """Multiply by ``factor``, then clip to the view's dynamic range before the multiplication."""
    return np.clip(view * factor, view.min(), view.max())


def _gamma(view: np.ndarray, gamma: float) -> np.ndarray:
    """``x ** gamma`` on the view min-max normalised to [0, 1], scaled back to its range (constant views kept)."""
    low, high = view.min(), view.max()
    if high <= low:
        return view
    return ((view - low) / (high - low)) ** gamma * (high - low) + low


def augment_view(region: np.ndarray, patch_size, rng: np.random.Generator, p_flip: float = 0.5,
                 p_noise: float = 0.1, p_blur: float = 0.2, p_contrast: float = 0.5,
                 p_gamma: float = 0.5) -> np.ndarray:
    """One view of a (1, X, Y, Z) region, PGL §3.2 steps (1)-(6) in order; returns (1, *patch_size) float32.

    Each step draws whether it applies (and the flip draws one number per axis) whatever its probability, so
    runs with the same seed that differ in one probability differ only from that step on. The noise variance is
    in the region's intensity units: PGL's U(0, 0.1) assumes z-scored CT, so on [0, 1] data the noise is
    relatively stronger. The blur uses scipy (reflecting borders) because MONAI's GaussianSmooth pads with zeros,
    which darkens the borders; the resize is ``F.interpolate`` (what MONAI's ``Resize`` runs, without its
    MetaTensor round trip).
    """
    view = _crop_and_resize(region, patch_size, rng)
    flips = tuple(axis + 1 for axis in range(3) if rng.random() < p_flip)
    view = np.flip(view, axis=flips) if flips else view
    if rng.random() < p_noise:
        std = math.sqrt(rng.uniform(0.0, 0.1))
        view = view + std * rng.standard_normal(view.shape, dtype=np.float32)
    if rng.random() < p_blur:
        sigma = rng.uniform(0.5, 1.0)
        view = gaussian_filter(view, sigma=(0.0, sigma, sigma, sigma), mode="reflect")
    if rng.random() < p_contrast:
        view = _scale_contrast(view, rng.uniform(0.75, 1.25))
    if rng.random() < p_gamma:
        view = _gamma(view, rng.uniform(0.7, 1.5))
    return np.ascontiguousarray(view, dtype=np.float32)


def byol_views(region: np.ndarray, patch_size, rng: np.random.Generator,
               **probabilities: float) -> tuple[np.ndarray, np.ndarray]:
    """Two independent views of ``region`` (:func:`augment_view`, all randomness from ``rng``).

    ``probabilities`` (``p_flip``, ``p_noise``, ``p_blur``, ``p_contrast``, ``p_gamma``) override PGL's values.
    """
    return (augment_view(region, patch_size, rng, **probabilities),
            augment_view(region, patch_size, rng, **probabilities))

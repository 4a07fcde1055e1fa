"""Augmented views for the two-view methods, shared so that methods compared with each other see the same views.

PGL (Xie et al. 2020, §3.2) defines one augmentation list; its global-consistency baseline BYOL must use the very
same list so that BYOL and PGL differ only in global vs local consistency. Both therefore draw their views from
:func:`augment_view`. BYOL needs no overlap between its two crops (:func:`byol_views` makes them independently);
PGL draws two crops sharing at least 10 % (:func:`overlapping_boxes`) and keeps each view's crop box and flips,
the prior its aligner uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def random_box(spatial, patch_size, rng: np.random.Generator) -> np.ndarray:
    """A crop of 110-140 % of ``patch_size`` per axis (at most the region) at a random place of a region of
    ``spatial`` size: (2, 3) float32 rows ``start`` and ``size``, in region voxels."""
    size = [min(n, max(1, round(rng.uniform(1.1, 1.4) * p))) for n, p in zip(spatial, patch_size)]
    start = [rng.integers(0, n - s + 1) for n, s in zip(spatial, size)]
    return np.array([start, size], dtype=np.float32)


def crop_and_resize(region: np.ndarray, box: np.ndarray, patch_size) -> np.ndarray:
    """The ``box`` (:func:`random_box`) of a (C, X, Y, Z) region, resized trilinearly to ``patch_size``."""
    start, size = box.astype(int)
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


@dataclass(frozen=True)
class View:
    """An augmented view and the spatial transforms that made it (PGL's prior): its crop ``box`` (2, 3) (start
    and size in region voxels, :func:`random_box`) and ``flips`` (3,) (whether each spatial axis was flipped)."""

    image: np.ndarray
    box: np.ndarray
    flips: np.ndarray


def augment_view(region: np.ndarray, patch_size, rng: np.random.Generator, box: np.ndarray | None = None,
                 p_flip: float = 0.5, p_noise: float = 0.1, p_blur: float = 0.2, p_contrast: float = 0.5,
                 p_gamma: float = 0.5) -> View:
    """One view of a (1, X, Y, Z) region, PGL §3.2 steps (1)-(6) in order; its image is (1, *patch_size) float32.

    ``box`` is the crop of step (1) when the caller has drawn it (PGL's overlapping pairs), else it is drawn here.

    Each step draws whether it applies (and the flip draws one number per axis) whatever its probability, so
    runs with the same seed that differ in one probability differ only from that step on. The noise variance is
    in the region's intensity units: PGL's U(0, 0.1) assumes z-scored CT, so on [0, 1] data the noise is
    relatively stronger. The blur uses scipy (reflecting borders) because MONAI's GaussianSmooth pads with zeros,
    which darkens the borders; the resize is ``F.interpolate`` (what MONAI's ``Resize`` runs, without its
    MetaTensor round trip).
    """
    box = random_box(region.shape[1:], patch_size, rng) if box is None else box
    view = crop_and_resize(region, box, patch_size)
    flips = np.array([rng.random() < p_flip for _ in range(3)])
    view = np.flip(view, axis=tuple(1 + np.flatnonzero(flips))) if flips.any() else view
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
    return View(np.ascontiguousarray(view, dtype=np.float32), box, flips)


def byol_views(region: np.ndarray, patch_size, rng: np.random.Generator,
               **probabilities: float) -> tuple[np.ndarray, np.ndarray]:
    """Two independent views of ``region`` (:func:`augment_view`, all randomness from ``rng``).

    ``probabilities`` (``p_flip``, ``p_noise``, ``p_blur``, ``p_contrast``, ``p_gamma``) override PGL's values.
    """
    return (augment_view(region, patch_size, rng, **probabilities).image,
            augment_view(region, patch_size, rng, **probabilities).image)


def overlap_fraction(box1: np.ndarray, box2: np.ndarray) -> float:
    """The volume common to two boxes over the volume of the larger: at least this fraction of each view is
    shared with the other (PGL §3.2 requires 10 %)."""
    common = np.clip(np.minimum(box1.sum(0), box2.sum(0)) - np.maximum(box1[0], box2[0]), 0, None).prod()
    return float(common / max(box1[1].prod(), box2[1].prod()))


def overlapping_boxes(spatial, patch_size, rng: np.random.Generator, min_overlap: float = 0.1,
                      attempts: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Two crops (:func:`random_box`) sharing at least ``min_overlap`` of each, redrawn until they do (PGL §3.2)."""
    for _ in range(attempts):
        box1, box2 = random_box(spatial, patch_size, rng), random_box(spatial, patch_size, rng)
        if overlap_fraction(box1, box2) >= min_overlap:
            return box1, box2
    raise ValueError(f"no two crops of 110-140% of {tuple(patch_size)} in a region of {tuple(spatial)} overlap by "
                     f"{min_overlap:.0%} in {attempts} draws")

"""Matched voxels of two overlapping views, and their features read from a feature pyramid (vox2vec, HDSSL).

vox2vec and hierarchical dense SSL (methods.md §4.6, §7.4) sample their views the same way: an anchor voxel inside
the body, two random patches that both contain it, and the body voxels the two patches share, each known by its
index in either patch. A voxel is then embedded as the concatenation of every pyramid level's feature at the cell
holding it (the official ``select_from_pyramid``, fixture F8). Both methods use these functions, so a fix here
holds for both and the comparison between them cannot come from two diverging copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ssl3d.pretrain.method import MethodConfig


@dataclass
class VoxelContrastConfig(MethodConfig):
    """The official vox2vec recipe (methods.md §4.7, §7.5), which hierarchical dense SSL keeps: 10 pairs of
    128 x 128 x 32 views, at most 1024 matched voxels per pair, Adam lr 3e-4 without weight decay or schedule
    (``adamw`` with weight decay 0 is Adam), gradient clipping 1.0 (norm), InfoNCE at temperature 0.1 on
    projections of 128. Each method's config adds its own fields."""

    patch_size: tuple[int, int, int] = (128, 128, 32)
    batch_size: int = 10
    pairs_per_region: int = 1  # view pairs cut from each sample's region; the step sees batch_size x this many
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 3e-4, "weight_decay": 0.0})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "constant"})
    grad_clip: float | None = 1.0
    max_voxels: int = 1024
    temperature: float = 0.1
    projection_dim: int = 128


def body_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """The (X, Y, Z) body of a CT: every voxel not reached by the air around the patient (official ``get_body_mask``).

    Air is ``image < threshold``; the image is padded with one voxel of air in-plane (X and Y) so that the outside
    air is one connected region, which is flood-filled from a corner with full (26-) connectivity, as
    ``skimage.segmentation.flood`` does by default. Air the flood does not reach (lungs, bowel gas) is body.
    """
    air = np.pad(image < threshold, ((1, 1), (1, 1), (0, 0)), constant_values=True)
    labels, _ = ndimage.label(air, structure=np.ones((3, 3, 3), dtype=bool))
    return (labels != labels[0, 0, 0])[1:-1, 1:-1]


def with_body_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """The (C, X, Y, Z) volume with the body mask of its first channel appended as a last channel of 0 and 1.

    A method's ``prepare_volume``: the mask is computed once per scan and on the whole scan, as the official code
    does, then cut with every region (the loader pads with 0: outside the body); :func:`split_body_mask` takes it
    back. Per sample it cost 135 ms on a paper-size region (255 x 255 x 63; vox2vec's views of a step: 0.35 s)."""
    return np.concatenate([volume, body_mask(volume[0], threshold)[None].astype(volume.dtype)])


def split_body_mask(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A region of a :func:`with_body_mask` volume as (its image channels, its (X, Y, Z) body mask)."""
    return region[:-1], region[-1] > 0.5


def anchored_view_pair(region: np.ndarray, mask: np.ndarray, patch_size, max_voxels: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two ``patch_size`` crops of a (C, X, Y, Z) region sharing an anchor voxel, and their matched voxels.

    The anchor is drawn uniformly from ``mask`` (X, Y, Z); an empty mask (no body in the region) counts as all
    body, so the anchor and the matched voxels may then lie anywhere. Each crop's box is drawn as the official
    ``sample_box`` with an anchor: a start uniform among those keeping the box inside the region and the anchor inside
    the box. The matched voxels are the mask voxels inside both boxes (the anchor at least), subsampled without
    replacement to at most ``max_voxels``.

    Returns the un-augmented crops ``view1``, ``view2`` (C, *patch_size) float32; ``voxels1``, ``voxels2``
    (max_voxels, 3) int64, row i the index of the same region voxel in each view; and ``valid`` (max_voxels,) bool,
    False on the zero rows that pad the matches to ``max_voxels`` (so that every sample has the same shapes).
    All randomness comes from ``rng``.
    """
    size, patch = np.array(mask.shape), np.array(patch_size)
    if region.shape[1:] != mask.shape or np.any(patch > size):
        raise ValueError(f"anchored_view_pair: region {region.shape[1:]} and mask {mask.shape} must have the same "
                         f"size, at least the patch {tuple(patch)}")
    if not mask.any():
        mask = np.ones_like(mask, dtype=bool)
    body = np.flatnonzero(mask)
    anchor = np.array(np.unravel_index(body[rng.integers(len(body))], mask.shape))
    low, high = np.maximum(0, anchor - patch + 1), np.minimum(size - patch, anchor)
    start1, start2 = rng.integers(low, high + 1), rng.integers(low, high + 1)

    shared_start, shared_stop = np.maximum(start1, start2), np.minimum(start1, start2) + patch
    shared = mask[tuple(slice(a, b) for a, b in zip(shared_start, shared_stop))]
    voxels = np.argwhere(shared) + shared_start
    if len(voxels) > max_voxels:
        voxels = voxels[rng.choice(len(voxels), max_voxels, replace=False)]

    def crop(start):
        return region[(slice(None), *(slice(a, a + p) for a, p in zip(start, patch)))].astype(np.float32)

    def padded(rows):
        out = np.zeros((max_voxels, 3), dtype=np.int64)
        out[:len(rows)] = rows
        return out

    valid = np.zeros(max_voxels, dtype=bool)
    valid[:len(voxels)] = True
    return {"view1": crop(start1), "view2": crop(start2), "voxels1": padded(voxels - start1),
            "voxels2": padded(voxels - start2), "valid": valid}


def pyramid_at_voxels(pyramid: list[torch.Tensor], strides, voxels: torch.Tensor) -> torch.Tensor:
    """Each voxel's features over a batched pyramid: (B, N, sum of C_i) from (B, N, 3) voxel indices.

    ``pyramid[i]`` is (B, C_i, X_i, Y_i, Z_i) with per-axis ``strides[i]`` (an int or 3 ints) against the input the
    voxels index; level i is read at the cell ``voxel // stride`` (nearest, no interpolation). The official
    ``select_from_pyramid`` of one sample with strides 2^i (fixture F8), batched, with per-axis strides and one
    gather per level. Every voxel must lie inside that input.
    """
    if len(pyramid) != len(strides):
        raise ValueError(f"pyramid_at_voxels: {len(pyramid)} levels but {len(strides)} strides")
    selected = []
    for features, stride in zip(pyramid, strides):
        batch, channels, _, size_y, size_z = features.shape
        cells = voxels // torch.as_tensor(stride, device=voxels.device)
        flat = (cells[..., 0] * size_y + cells[..., 1]) * size_z + cells[..., 2]  # (B, N)
        index = flat[:, None, :].expand(batch, channels, -1)
        selected.append(features.flatten(2).gather(2, index).transpose(1, 2))
    return torch.cat(selected, dim=2)

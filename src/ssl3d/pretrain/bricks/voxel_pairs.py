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
    # Each view rotated in-plane by U(-rotation_degrees, rotation_degrees) and zoomed by U(*rescale) (see
    # ``transformed_view_pair``): what the official vox2vec comment promises ("random rescale, rotation") and its
    # code never does, so off by default
    rotate_rescale: bool = False
    rotation_degrees: float = 15.0
    rescale: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self):
        if not (0 <= self.rotation_degrees <= 180 and 0 < self.rescale[0] <= self.rescale[1]):
            raise ValueError(f"rotation_degrees {self.rotation_degrees} / rescale {self.rescale}: want degrees in "
                             "[0, 180] and 0 < low <= high")
        if min(self.pairs_per_region, self.max_voxels, self.projection_dim) < 1 or self.temperature <= 0:
            raise ValueError(f"pairs_per_region {self.pairs_per_region} / max_voxels {self.max_voxels} / "
                             f"projection_dim {self.projection_dim} / temperature {self.temperature}: want counts of "
                             "at least 1 and a temperature > 0")



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
    mask, anchor = _anchor(mask, rng)
    low, high = np.maximum(0, anchor - patch + 1), np.minimum(size - patch, anchor)
    start1, start2 = rng.integers(low, high + 1), rng.integers(low, high + 1)

    shared_start, shared_stop = np.maximum(start1, start2), np.minimum(start1, start2) + patch
    shared = mask[tuple(slice(a, b) for a, b in zip(shared_start, shared_stop))]
    voxels = np.argwhere(shared) + shared_start

    def crop(start):
        return region[(slice(None), *(slice(a, a + p) for a, p in zip(start, patch)))].astype(np.float32)

    return _view_pair(crop(start1), crop(start2), voxels - start1, voxels - start2, max_voxels, rng)


def _anchor(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The body mask (all body where it is empty) and an anchor voxel drawn uniformly from it."""
    if not mask.any():
        mask = np.ones_like(mask, dtype=bool)
    body = np.flatnonzero(mask)
    return mask, np.array(np.unravel_index(body[rng.integers(len(body))], mask.shape))


def _view_pair(view1: np.ndarray, view2: np.ndarray, voxels1: np.ndarray, voxels2: np.ndarray, max_voxels: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A pair's record: its matched voxels subsampled without replacement to at most ``max_voxels`` and padded
    with zero rows to ``max_voxels``, ``valid`` marking the real ones."""
    if len(voxels1) > max_voxels:
        keep = rng.choice(len(voxels1), max_voxels, replace=False)
        voxels1, voxels2 = voxels1[keep], voxels2[keep]
    valid = np.zeros(max_voxels, dtype=bool)
    valid[:len(voxels1)] = True
    padded1, padded2 = np.zeros((max_voxels, 3), dtype=np.int64), np.zeros((max_voxels, 3), dtype=np.int64)
    padded1[:len(voxels1)], padded2[:len(voxels2)] = voxels1, voxels2
    return {"view1": view1, "view2": view2, "voxels1": padded1, "voxels2": padded2, "valid": valid}


def transformed_view_pair(region: np.ndarray, mask: np.ndarray, patch_size, max_voxels: int,
                          rng: np.random.Generator, rotation_degrees: float,
                          rescale: tuple[float, float]) -> dict[str, np.ndarray]:
    """:func:`anchored_view_pair` with each view rotated about the slice axis (Z) and zoomed: its own angle
    U(-rotation_degrees, rotation_degrees) and factor U(*rescale) (a factor s shows s x patch region voxels per
    axis). In-plane only, because CT slices are thicker than their pixels; one factor for all axes.

    A view voxel ``v`` shows the region at ``centre + A (v - (patch - 1) / 2)``, A the turn times the zoom,
    resampled trilinearly (``scipy.ndimage.affine_transform``; 0 outside the region: air, outside the body). The
    anchor sits on a view voxel drawn uniformly in each view. The matched voxels are the mask voxels that the first
    view covers and the second contains, each at the nearest voxel of either view (within half a view voxel of
    it: the same anatomy, up to the resampling), the anchor among them, subsampled to at most ``max_voxels``.
    Hand-written: MONAI's random affine transforms resample one view but do not map voxel indices between two.
    Returns what :func:`anchored_view_pair` returns.
    """
    size, patch = np.array(mask.shape), np.array(patch_size)
    if region.shape[1:] != mask.shape:
        raise ValueError(f"transformed_view_pair: region {region.shape[1:]} and mask {mask.shape} differ in size")
    mask, anchor = _anchor(mask, rng)
    middle = (patch - 1) / 2
    views, maps = [], []
    for _ in range(2):
        angle, zoom = np.radians(rng.uniform(-rotation_degrees, rotation_degrees)), rng.uniform(*rescale)
        turn = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
        matrix = turn * zoom
        centre = anchor - matrix @ (rng.integers(0, patch) - middle)  # the anchor on a view voxel
        offset = centre - matrix @ middle
        views.append(np.stack([ndimage.affine_transform(channel, matrix, offset, output_shape=tuple(patch),
                                                        order=1, cval=0.0) for channel in region]).astype(np.float32))
        maps.append((matrix, offset))

    def to_view(points, which):
        matrix, offset = maps[which]
        return np.rint((points - offset) @ np.linalg.inv(matrix).T).astype(np.int64)

    matrix1, offset1 = maps[0]
    grid = np.indices(tuple(patch)).reshape(3, -1).T
    covered = np.rint(grid @ matrix1.T + offset1).astype(np.int64)  # the region voxel of every voxel of view 1
    covered = covered[np.all((covered >= 0) & (covered < size), axis=1)]
    covered = covered[mask[tuple(covered.T)]]
    covered = np.array(np.unravel_index(np.unique(np.ravel_multi_index(covered.T, mask.shape)), mask.shape)).T
    voxels1, voxels2 = to_view(covered, 0), to_view(covered, 1)
    inside = np.all((voxels1 >= 0) & (voxels1 < patch) & (voxels2 >= 0) & (voxels2 < patch), axis=1)
    voxels1, voxels2 = voxels1[inside], voxels2[inside]
    for which in (0, 1):  # zoomed in, one view voxel can hold two region voxels: keep one
        _, first = np.unique(np.ravel_multi_index((voxels1, voxels2)[which].T, patch), return_index=True)
        voxels1, voxels2 = voxels1[np.sort(first)], voxels2[np.sort(first)]
    return _view_pair(views[0], views[1], voxels1, voxels2, max_voxels, rng)


def view_pair(config: VoxelContrastConfig, region: np.ndarray, mask: np.ndarray,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A view pair of ``config``'s recipe: two crops (:func:`anchored_view_pair`), or with ``rotate_rescale``
    rotated and zoomed views (:func:`transformed_view_pair`)."""
    if config.rotate_rescale:
        return transformed_view_pair(region, mask, config.patch_size, config.max_voxels, rng,
                                     config.rotation_degrees, config.rescale)
    return anchored_view_pair(region, mask, config.patch_size, config.max_voxels, rng)


def view_pair_region(config: VoxelContrastConfig) -> tuple[int, int, int]:
    """The region two views sharing a voxel lie within: 2 x footprint - 1 voxels per axis, the footprint being the
    patch, or with ``rotate_rescale`` its extent at the largest zoom and in-plane turn (the corners of a view may
    still reach past it: :func:`transformed_view_pair` pads with 0, outside the body)."""
    if not config.rotate_rescale:
        return tuple(2 * size - 1 for size in config.patch_size)
    angle = np.radians(min(config.rotation_degrees, 45.0))
    turn = (np.cos(angle) + np.sin(angle),) * 2 + (1.0,)
    return tuple(2 * int(np.ceil(size * config.rescale[1] * t)) - 1 for size, t in zip(config.patch_size, turn))


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

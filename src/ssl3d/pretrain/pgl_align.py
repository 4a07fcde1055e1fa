"""PGL's prior-guided aligner (Xie et al. 2020, §3.3): bring the feature maps of two views to one grid over the
region both views show, using the spatial transforms that made the views as the prior.

Hand-written: no library has a 3D RoIAlign (torchvision's is 2D, MONAI has none), and no official PGL code was
ever released, so this is the reference implementation; ``tests/test_pgl.py`` proves it on volumes whose
voxels hold their own coordinates. Conventions (continuous coordinates at voxel edges, voxel ``j`` centred at
``j + 0.5``, as ``F.interpolate`` and ``F.grid_sample`` with ``align_corners=False``):

* a view's crop ``box`` is (start, size) in region voxels (``ssl3d.pretrain.bricks.views.random_box``); the crop
  is resized to the input size ``P``, so region point ``x`` is view point ``u = (x - start) · P / size``;
* a feature map of ``n`` cells per axis covers the view with cells of ``P / n`` voxels (the level's stride; the
  actual map size is used, so odd input sizes work too): view point ``u`` is map point ``f = u · n / P``;
* **FlipAlign** flips each map back along the axes its view was flipped (the map of a flipped view, read at
  ``n - f``, is the unflipped map at ``f``);
* **CSAlign** maps the common region of the two crops, ``[max(start₁, start₂), min(stop₁, stop₂))``, into each
  view's map coordinates and extracts it by RoIAlign (He et al. 2017): ``out_size`` bins per axis, each the mean
  of ``sampling_ratio``³ trilinear samples (``grid_sample``, border padding) at the sub-bin centres. The paper
  RoIAligns and then resizes "to the size of" a size its text lost; here RoIAlign samples directly at the common
  size, chosen as the level's own map size (the region is seen at the resolution of the features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_align(maps: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Undo each sample's flips on its (B, C, X, Y, Z) map; ``flips`` is (B, 3) bool, one flag per spatial axis."""
    for axis in range(3):
        flipped = flips[:, axis].view(-1, 1, 1, 1, 1)
        maps = torch.where(flipped, maps.flip(2 + axis), maps)
    return maps


def common_region(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) start and stop, in region voxels, of the part both crops show (boxes are (B, 2, 3) start, size)."""
    start = torch.maximum(box1[:, 0], box2[:, 0])
    stop = torch.minimum(box1[:, 0] + box1[:, 1], box2[:, 0] + box2[:, 1])
    return torch.stack([start, stop], dim=1)


def roi_align(maps: torch.Tensor, roi: torch.Tensor, out_size, sampling_ratio: int = 2) -> torch.Tensor:
    """3D RoIAlign: the (B, 2, 3) boxes ``roi`` (start, stop in map cells) of (B, C, X, Y, Z) maps, each as
    ``out_size`` bins per axis averaging ``sampling_ratio`` trilinear samples per bin and axis."""
    n = torch.tensor(maps.shape[2:], dtype=roi.dtype, device=roi.device)
    axes = []
    for axis, bins in enumerate(out_size):
        steps = (torch.arange(bins * sampling_ratio, dtype=roi.dtype, device=roi.device) + 0.5) / sampling_ratio
        start, stop = roi[:, 0, axis:axis + 1], roi[:, 1, axis:axis + 1]
        cells = start + steps * (stop - start) / bins  # (B, bins · ratio) in map cells
        axes.append(2 * cells / n[axis] - 1)  # grid_sample's normalised coordinates (align_corners=False)
    x, y, z = axes
    grid = torch.stack(torch.broadcast_tensors(  # grid_sample reads (W, H, D) = (Z, Y, X) from the last axis
        z[:, None, None, :], y[:, None, :, None], x[:, :, None, None]), dim=-1)
    # in float32 whatever the maps' precision: bf16 coordinates would be off by up to 0.04 cells on a 64-cell map
    samples = F.grid_sample(maps.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool3d(samples, sampling_ratio) if sampling_ratio > 1 else samples


def crop_scale_align(maps: torch.Tensor, box: torch.Tensor, region: torch.Tensor,
                     sampling_ratio: int = 2) -> torch.Tensor:
    """The common ``region`` (:func:`common_region`) of the (B, C, X, Y, Z) maps of views cut at ``box``,
    RoIAligned on the maps' own grid size. Region point ``x`` is map point ``(x - start) · n / size``: the
    input size cancels out of ``u = (x - start) · P / size`` and ``f = u · n / P``."""
    size = maps.shape[2:]
    cells = torch.tensor(size, dtype=box.dtype, device=box.device)
    in_map = (region - box[:, :1]) * (cells / box[:, 1]).unsqueeze(1)
    return roi_align(maps, in_map, size, sampling_ratio)


def align(maps: torch.Tensor, box: torch.Tensor, flips: torch.Tensor, region: torch.Tensor,
          align_flip: bool = True, align_crop_scale: bool = True) -> torch.Tensor:
    """One view's maps on the common grid: FlipAlign, then CSAlign; each switched off for the ablations of
    Tables 5-8 (without CSAlign the whole maps are compared cell by cell; without FlipAlign flipped maps stay
    flipped)."""
    maps = flip_align(maps, flips) if align_flip else maps
    return crop_scale_align(maps, box, region) if align_crop_scale else maps

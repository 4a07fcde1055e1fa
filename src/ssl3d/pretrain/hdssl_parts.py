"""Hierarchical dense SSL's own pieces: its appearance augmentations and the balanced feature pyramid.

Hierarchical dense SSL (Kats, Hirsch, Heinrich, ISBI 2024; methods.md §4) trains vox2vec's voxel-level contrastive
task with three changes; two of them live here (the third, the restoration loss, is in the method file):

* **local augmentations** (:class:`AppearanceTransform`, the official ``hb_ssl/utils/intensity_augmentations.py``):
  each view is distorted with local pixel shuffling, a non-linear intensity curve and in-painting, a variant of
  Models Genesis' transforms (``ssl3d.pretrain.bricks.genesis_transforms``), whose pieces are reused where they are the
  same;
* **the balanced pyramid** (:class:`BalancedPyramid`): every decoder level is projected to the same 32 channels
  before a voxel's features are read from all levels and concatenated, so that the fine levels weigh as much in the
  voxel embedding as the coarse ones (vox2vec concatenates the raw levels: 16 of its 1008 channels are full
  resolution).

Differences of the augmentations from Models Genesis (official values, methods.md §4.5), in the official order:

1. local pixel shuffling, p 0.8 (MG 0.5): 5000 blocks (MG 10 000) of one fixed size ``dim // 20`` per axis
   (MG: random ``1..dim // 10``), here at least 1 voxel (the official size is 0 below 20 voxels, a no-op); corners
   in ``[0, dim - size)`` (MG: ``[0, dim - size]``); ONE random permutation of a block's voxels shared by all
   blocks (MG: one per block). Blocks are read from the original and written in order, so later blocks overwrite
   earlier ones where they overlap, as in both official codes (MG's vectorised writer is reused).
2. non-linear intensity curve, p 0.9 (as MG): the same cubic Bézier through (0, 0), two random control points and
   (1, 1), but always increasing (MG inverts it with p 0.5). MG's function is reused with ``inverted=False``; it
   still draws (and ignores) MG's inversion coin.
3. in-painting, always applied (MG: p 0.9 × 0.2, else out-painting; the official ``paint_rate``/``inpaint_rate``
   arguments are never read): up to 30 boxes (MG 5), each drawn while ``U < 0.95``, of size
   ``randint(dim // 10, dim // 5)`` per axis (upper bound exclusive; MG ``dim // 6 .. dim // 3``), here at least
   1 voxel; corners in ``[3, dim - size - 3)`` (MG: inclusive upper bound), without the margin where it does not
   fit; filled with U[0, 1) noise. No out-painting, no flips.

All randomness comes from a ``numpy.random.Generator``; results follow the official distributions, not its RNG
stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssl3d.pretrain.bricks.genesis_transforms import Box, apply_shuffle_plan, nonlinear_transformation

PROJECTIONS = ("fixed_random", "learned")


# --------------------------------------------------------------------------------------------- local shuffling


def shuffle_plan(rng: np.random.Generator, dims, n_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of one local shuffling: corners (n_blocks, 3), the block size (3,) and the shared permutation.

    The block size is ``max(dim // 20, 1)`` per axis, corners are uniform in ``[0, dim - size)`` (0 where the block
    fills the axis), and ``permutation`` reorders a block's voxels in raveled C order:
    ``out[block].ravel() = x[block].ravel()[permutation]`` for every block not overwritten by a later one.
    """
    dims = np.asarray(dims, dtype=np.int64)
    size = np.maximum(dims // 20, 1)
    corners = rng.integers(0, np.maximum(dims - size, 1), size=(n_blocks, 3))
    permutation = rng.permutation(int(size.prod()))
    return corners, size, permutation


def local_pixel_shuffling(x: np.ndarray, rng: np.random.Generator, prob: float = 0.8,
                          n_blocks: int = 5000) -> np.ndarray:
    """With probability ``prob``, shuffle the voxels of ``n_blocks`` blocks of a (1, X, Y, Z) view, one permutation
    for all blocks (:func:`shuffle_plan`); a copy of ``x`` otherwise."""
    if rng.random() >= prob or n_blocks == 0:
        return x.copy()
    corners, size, permutation = shuffle_plan(rng, x.shape[1:], n_blocks)
    # MG's writer gives block b the order argsort(keys_b): the inverse permutation as keys yields ``permutation``
    keys = np.tile(np.argsort(permutation), n_blocks)
    return apply_shuffle_plan(x[0], corners, np.tile(size, (n_blocks, 1)), keys)[None]


# ------------------------------------------------------------------------------------------------- in-painting


def in_painting_with_boxes(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 30
                           ) -> tuple[np.ndarray, list[Box]]:
    """In-painting of a (1, X, Y, Z) view and the boxes it painted, in order (see the module docstring, step 3)."""
    out = x.copy()
    dims = np.asarray(x.shape[1:], dtype=np.int64)
    boxes: list[Box] = []
    for _ in range(max_boxes):
        if rng.random() >= 0.95:
            break
        low = np.maximum(dims // 10, 1)
        size = rng.integers(low, np.maximum(dims // 5, low + 1))
        fits = dims - size - 3 > 3
        corner = rng.integers(np.where(fits, 3, 0), np.where(fits, dims - size - 3, dims - size + 1))
        out[(slice(None), *(slice(c, c + s) for c, s in zip(corner, size)))] = rng.random(tuple(size),
                                                                                        dtype=np.float32)
        boxes.append((tuple(int(v) for v in corner), tuple(int(v) for v in size)))
    return out, boxes


# ----------------------------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class AppearanceTransform:
    """The official ``AppearanceTransform.rand_aug`` on one (1, X, Y, Z) view in [0, 1]: local pixel shuffling
    (p 0.8), the increasing Bézier curve (p 0.9), in-painting (always); returns a new float32 array.

    ``local=False`` leaves out local shuffling and in-painting, the paper's "local augmentations" (§2.1; the
    official class's ``is_local`` and ``is_in_painting`` flags), and keeps the non-linear intensity curve.
    """

    local: bool = True

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"expected a one-channel view of shape (1, X, Y, Z), got {x.shape}")
        if self.local:
            x = local_pixel_shuffling(x, rng)
        x = nonlinear_transformation(x, rng, prob=0.9, inverted=False)
        if self.local:
            x = in_painting_with_boxes(x, rng)[0]
        return x.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- balanced pyramid


class BalancedPyramid(torch.nn.Module):
    """Projects each level of a feature pyramid to ``width`` channels with a 1×1×1 convolution (bias at level 0
    only, as the official ``scale_proj``), so that every level weighs the same in a voxel's concatenated features.

    ``projections``:

    * ``fixed_random`` (the official code's behaviour): its ``scale_proj`` is a plain Python list, so the
      convolutions are never registered, never trained and re-drawn on every run. Here they are drawn at
      construction from torch's global generator (which the pre-training loop seeds with the run's seed), kept as
      buffers (no gradient, not in ``parameters()`` hence not in the optimizer, but saved in the state dict, so a
      checkpoint reloads the very projections it was trained with). Gradients still flow through them into the
      backbone.
    * ``learned`` (the paper's reading, §2.2): ordinary trainable parameters.

    The state-dict keys (``convs.<i>.weight``, ``convs.0.bias``) are the same in both modes.
    """

    def __init__(self, channels, width: int = 32, projections: str = "fixed_random"):
        super().__init__()
        if projections not in PROJECTIONS:
            raise ValueError(f"projections: unknown value {projections!r} (allowed: {', '.join(PROJECTIONS)})")
        self.convs = torch.nn.ModuleList(torch.nn.Conv3d(c, width, kernel_size=1, bias=i == 0)
                                         for i, c in enumerate(channels))
        if projections == "fixed_random":
            for conv in self.convs:
                for name, param in list(conv.named_parameters(recurse=False)):
                    delattr(conv, name)
                    conv.register_buffer(name, param.detach())

    def forward(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(level) for conv, level in zip(self.convs, pyramid, strict=True)]

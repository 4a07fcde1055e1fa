"""Patch masking for masked image modelling, shared so that every masking method hides patches the same way.

HybridMIM and the UNetFormer-style MIM baseline both mask a crop patch-wise with MAE's uniform sampling; drawing
and applying the mask through one implementation keeps their masks identical for the same random state (the
official HybridMIM ``random_masking``, fixture F6 of ``reference/methods.md`` §10), so a difference between the two
methods cannot come from how they mask.

Patches are cubic and enumerated in raster order ``l = (i_x·n_y + i_y)·n_z + i_z`` (:func:`patchify`); a mask is
(B, L) with 1 = masked.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ssl3d.nets.backbone import triple


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, L, patch³·C), cubic patches in raster order ``l = (i_x·n_y + i_y)·n_z + i_z``.

    Each patch vector lists its voxels in raster order (x, y, z within the patch) with the channel fastest, as the
    official ``patchify`` and MAE do. Every spatial size must be a multiple of ``patch``.
    """
    b, c, *spatial = x.shape
    if len(spatial) != 3 or any(n % patch for n in spatial):
        raise ValueError(f"patchify needs (B, C, X, Y, Z) with sizes divisible by {patch}, got {tuple(x.shape)}")
    nx, ny, nz = (n // patch for n in spatial)
    x = x.reshape(b, c, nx, patch, ny, patch, nz, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, i_x, i_y, i_z, p_x, p_y, p_z, c
    return x.reshape(b, nx * ny * nz, patch ** 3 * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, patch³·C) on a ``grid`` of patches per axis -> (B, C, X, Y, Z)."""
    nx, ny, nz = triple(grid)
    b, n_patches, dim = patches.shape
    if n_patches != nx * ny * nz or dim % patch ** 3:
        raise ValueError(f"{tuple(patches.shape)} is not a patch sequence of {patch}³ patches on a {(nx, ny, nz)} grid")
    c = dim // patch ** 3
    x = patches.reshape(b, nx, ny, nz, patch, patch, patch, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, i_x, p_x, i_y, p_y, i_z, p_z
    return x.reshape(b, c, nx * patch, ny * patch, nz * patch)


def random_patch_mask(batch_size: int, n_patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """MAE-style per-sample random mask, (B, L) float32 with 1 = masked, exactly ``L − int(L·(1 − ratio))`` ones.

    Draws ``torch.rand(B, L)`` once (from ``generator`` or the global RNG), keeps the ``int(L·(1 − ratio))``
    patches with the smallest noise and masks the rest: the same mask as the official ``random_masking`` for the
    same RNG state (216 patches, ratio 0.4 -> 129 kept, 87 masked).
    """
    n_keep = int(n_patches * (1 - ratio))
    noise = torch.rand(batch_size, n_patches, generator=generator, device=device)
    order = torch.argsort(noise, dim=1)  # ascending: the first n_keep are kept
    mask = torch.zeros(batch_size, n_patches, device=noise.device)
    return mask.scatter_(1, order[:, n_keep:], 1.0)


def patch_mask_to_voxels(mask: torch.Tensor, patch: int, grid: int | Sequence[int]) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1, X, Y, Z) boolean voxel mask (True where the patch is masked)."""
    nx, ny, nz = triple(grid)
    voxels = mask.reshape(mask.shape[0], 1, nx, ny, nz).bool()
    for axis in (2, 3, 4):
        voxels = voxels.repeat_interleave(patch, dim=axis)
    return voxels


def apply_patch_mask(x: torch.Tensor, mask: torch.Tensor, patch: int, mask_value: float = 0.0) -> torch.Tensor:
    """Set every voxel (all channels) of the masked patches of ``x`` (B, C, X, Y, Z) to ``mask_value``.

    ``mask`` is (B, L) on the raster patch grid of ``x`` (1 = masked); the other voxels are copied unchanged.
    """
    grid = tuple(n // patch for n in x.shape[2:])
    if mask.shape != (x.shape[0], grid[0] * grid[1] * grid[2]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match {patch}³ patches of {tuple(x.shape)}")
    voxels = patch_mask_to_voxels(mask, patch, grid)
    return torch.where(voxels, torch.full_like(x, mask_value), x)


def masked_view(region: np.ndarray, rng: np.random.Generator, ratio: float, patch: int) -> dict[str, np.ndarray]:
    """A patch-masked view of one (C, X, Y, Z) region for a data loader: ``input`` (masked patches set to 0),
    ``target`` (the region) and ``mask`` (L,), with the mask drawn from the sample's ``rng`` (so runs replay)."""
    grid = [size // patch for size in region.shape[1:]]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    mask = random_patch_mask(1, int(np.prod(grid)), ratio, generator)
    masked = apply_patch_mask(torch.from_numpy(region)[None], mask, patch)[0]
    return {"input": masked.numpy(), "target": region, "mask": mask[0].numpy()}

"""The HybridMIM-specific bricks: patch masking, region labels, the five pretext losses and region pooling.

HybridMIM (Xing et al., arXiv 2303.10333 / IEEE JBHI 2024) masks a 96³ crop patch-wise and learns at three levels
(methods.md §2):

* pixel level, *partial region reconstruction*: the decoder runs only on a fixed box of the crop ([32:96]³) and
  its sigmoid output regresses the unmasked intensities on the masked voxels of that box
  (:func:`masked_reconstruction_loss`);
* region level, *patch-masking perception*: the crop is divided into first-level sub-volumes (32³, 3×3×3 of them)
  of 2×2×2 second-level patches (16³); from each sub-volume's pooled bottleneck feature
  (:func:`region_features`) one linear head predicts how many of its 8 patches are masked (9-way *count*,
  :func:`count_loss`), another which ones (8-way multi-label *location*, :func:`location_loss`), and a
  *consistency* term ties the count head to the count implied by the location head (:func:`consistency_loss`);
* sample level, *dropout-based contrastive learning* (SimCSE-style): the masked input is encoded twice, the two
  passes differing only by dropout, and NT-Xent (τ = 0.5) contrasts the pair against the other samples of the
  batch (:func:`contrastive_loss`, MONAI's ``ContrastiveLoss``, numerically identical to the official one).

The official total is ``L_rec + 0.1 L_count + 0.1 L_loc + 0.01 L_cons + 0.1 L_cl``.

Masking (:func:`random_patch_mask`) is the official one: MAE-style uniform sampling of ``L − int(L·(1 − r))``
patches per sample over the whole patch grid (87 of 216 for r = 0.4), masked voxels set to 0; there is no explicit
"choose sub-volumes first" stage, the sub-volume statistics are read off the uniform mask.

Paper-vs-code divergences kept as switches (methods.md §2.2-2.4):

* **Region grouping** (:func:`region_labels`, ``grouping``). The paper groups the 8 patches of each spatial 2×2×2
  sub-volume, which is what the prediction heads see (``"spatial"``, default). The official code groups 8
  *consecutive raster indices* (``"code_raster"``: region 0 is the 1×2×6 strip (0,0,0..5),(0,1,0),(0,1,1)), so its
  labels are spatially misaligned with the features they are predicted from; keep it for bit-exact comparison.
* **Stop-gradient second pass** of the contrastive task: the official code computes the second encoding under
  ``torch.no_grad()`` (SimCSE back-propagates through both). That switch lives in the method, not here.

Losses follow the official functions exactly (fixtures F1-F6 of methods.md §10 reproduce to 1e-5).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from ssl3d.nets.hybridmim_unet import triple

Grouping = Literal["spatial", "code_raster"]
GROUPINGS = ("spatial", "code_raster")


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


def region_labels(mask: torch.Tensor, grid: int | Sequence[int] = 6,
                  grouping: Grouping = "spatial") -> tuple[torch.Tensor, torch.Tensor]:
    """Count and location labels of the 2×2×2-patch regions: ``(count (B, G) long in 0..8, position (B, G, 8))``.

    ``mask`` is (B, L) in raster patch order on ``grid`` patches per axis (each even); G = L / 8 (27 on 6³).

    * ``"spatial"`` (paper): region ``g`` = (⌊i_x/2⌋, ⌊i_y/2⌋, ⌊i_z/2⌋) in raster order over the region grid,
      slot ``k`` = (i_x % 2, i_y % 2, i_z % 2) in raster order, i.e. ``4·(i_x%2) + 2·(i_y%2) + i_z%2``.
    * ``"code_raster"`` (official code): region ``g`` = the 8 consecutive raster indices ``8g..8g+7``,
      slot ``k = l − 8g``.

    ``position`` is float32 (1 = masked), ``count`` its sum over the 8 slots.
    """
    nx, ny, nz = triple(grid)
    if nx % 2 or ny % 2 or nz % 2:
        raise ValueError(f"regions of 2×2×2 patches need an even patch grid, got {(nx, ny, nz)}")
    b = mask.shape[0]
    if mask.shape != (b, nx * ny * nz):
        raise ValueError(f"mask {tuple(mask.shape)} does not match a {(nx, ny, nz)} patch grid")
    mask = mask.float()
    if grouping == "spatial":
        position = mask.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        position = position.reshape(b, -1, 8)
    elif grouping == "code_raster":
        position = mask.reshape(b, -1, 8)
    else:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    position = position.contiguous()
    return position.sum(dim=-1).round().long(), position


def count_loss(count_logits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 9-way count logits (B, G, 9) against the counts (B, G), mean over B·G."""
    return F.cross_entropy(count_logits.reshape(-1, count_logits.shape[-1]), count.reshape(-1).long())


def location_loss(position_logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits of the (B, G, 8) location logits against the 0/1 labels, mean over all."""
    return F.binary_cross_entropy_with_logits(position_logits, position.float())


def consistency_loss(count_logits: torch.Tensor, position_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the count/location consistency term: ``(ce_half, mse_half)``; official total ½(ce + mse).

    With ``ñ = Σ_k 1[σ(position_logit_k) > 0.5]`` the count implied by the location head,
    ``ce_half = CE(count_logits, stopgrad(ñ))`` and ``mse_half = MSE(ñ, argmax(count_logits))``.
    Thresholding and argmax are not differentiable, so ``mse_half`` never carries a gradient (it has
    ``requires_grad=False``): only ``ce_half`` trains (the count head, toward the location head's implied count).
    The method trains on ``ce_half`` and only logs ``mse_half``, which is what the official code's
    ``(ce + mse) / 2`` effectively does up to the factor ½ folded into the weight.
    """
    with torch.no_grad():
        implied = (torch.sigmoid(position_logits) > 0.5).sum(dim=-1)
        predicted = count_logits.argmax(dim=-1)
        mse_half = F.mse_loss(implied.float(), predicted.float())
    ce_half = F.cross_entropy(count_logits.reshape(-1, count_logits.shape[-1]), implied.reshape(-1).long())
    return ce_half, mse_half


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, masked_input: torch.Tensor,
                               mask_value: float = 0.0) -> torch.Tensor:
    """``Σ M ⊙ (pred − target)² / Σ M`` with ``M = 1[masked_input == mask_value]`` (official masked MSE).

    ``pred`` is the sigmoid of the decoder output, ``target`` the unmasked crop and ``masked_input`` the masked crop,
    all over the same reconstruction box. ``M`` is read off the intensities as in the official code, so it also
    catches any voxel that was already 0 before masking — the zero padding of ``SpatialPadd`` (HybridMIM scales
    CT to [0.001, 1] precisely so that real tissue is never 0). An empty ``M`` gives 0 instead of NaN.
    """
    weight = (masked_input == mask_value).to(pred.dtype)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent between the (B, D) projections of the two dropout passes (``monai.losses.ContrastiveLoss``).

    Identical to HybridMIM's ``forward_constrast_loss`` (methods.md §1.1; the denominator includes the positive);
    identically 0 for B = 1.
    """
    return ContrastiveLoss(temperature=temperature)(z1, z2)


def region_features(bottleneck: torch.Tensor, regions_per_axis: int = 3) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, G, C): mean of each of the ``regions_per_axis³`` windows, windows in raster order.

    On the UNet backbone the 12³ bottleneck gives 27 windows of 4³ cells, one per 32³ sub-volume of the 96³ crop.
    """
    spatial = bottleneck.shape[2:]
    if len(spatial) != 3 or any(n % regions_per_axis for n in spatial):
        raise ValueError(f"cannot split {tuple(bottleneck.shape)} into {regions_per_axis}³ equal windows")
    pooled = F.avg_pool3d(bottleneck, kernel_size=tuple(n // regions_per_axis for n in spatial))
    return pooled.flatten(start_dim=2).transpose(1, 2)

"""HybridMIM's own pieces: region labels, its pretext losses and region pooling (shared bricks live elsewhere).

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
  batch (:func:`ssl3d.pretrain.bricks.losses.nt_xent`, MONAI's ``ContrastiveLoss``, numerically identical to
  the official one).

The official total is ``L_rec + 0.1 L_count + 0.1 L_loc + 0.01 L_cons + 0.1 L_cl``.

Masking (:func:`ssl3d.pretrain.bricks.masking.random_patch_mask`, shared with the MIM baselines) is the official
one: MAE-style uniform sampling of ``L − int(L·(1 − r))`` patches per sample over the whole patch grid (87 of 216
for r = 0.4), masked voxels set to 0; there is no explicit "choose sub-volumes first" stage, the sub-volume
statistics are read off the uniform mask.

Paper-vs-code divergences kept as switches (methods.md §2.2-2.4):

* **Region grouping** (:func:`region_labels`, ``grouping``). The paper groups the 8 patches of each spatial 2×2×2
  sub-volume, which is what the prediction heads see (``"spatial"``, default). The official code groups 8
  *consecutive raster indices* (``"code_raster"``: region 0 is the 1×2×6 strip (0,0,0..5),(0,1,0),(0,1,1)), so its
  labels are spatially misaligned with the features they are predicted from; keep it for bit-exact comparison.
* **Stop-gradient second pass** of the contrastive task: the official code computes the second encoding under
  ``torch.no_grad()`` (SimCSE back-propagates through both). That switch lives in the method, not here.

Losses follow the official functions exactly (fixtures F3-F6 of methods.md §10 reproduce to 1e-5; F1-F2, the
NT-Xent, are pinned with the shared brick).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ssl3d.nets.backbone import triple

Grouping = Literal["spatial", "code_raster"]
GROUPINGS = ("spatial", "code_raster")


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


def region_features(bottleneck: torch.Tensor, regions_per_axis: int = 3) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, G, C): mean of each of the ``regions_per_axis³`` windows, windows in raster order.

    On the UNet backbone the 12³ bottleneck gives 27 windows of 4³ cells, one per 32³ sub-volume of the 96³ crop.
    """
    spatial = bottleneck.shape[2:]
    if len(spatial) != 3 or any(n % regions_per_axis for n in spatial):
        raise ValueError(f"cannot split {tuple(bottleneck.shape)} into {regions_per_axis}³ equal windows")
    pooled = F.avg_pool3d(bottleneck, kernel_size=tuple(n // regions_per_axis for n in spatial))
    return pooled.flatten(start_dim=2).transpose(1, 2)

"""Pretext losses used by more than one method, so that methods sharing a loss share one tested implementation.

Each loss is pinned to a fixture of ``reference/methods.md`` §10 (or to a closed form) in
``tests/test_bricks_losses.py``: when two methods cite the same loss, a fix or a numerical check here holds for both,
and a leaderboard difference between them cannot come from two diverging copies of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent between two (B, D) batches of paired projections (``monai.losses.ContrastiveLoss``).

    Rows are L2-normalised inside; ``z1[i]`` and ``z2[i]`` are positives, every other row of both batches a
    negative. Identical to the official ``Contrast`` / ``forward_constrast_loss`` of HybridMIM and SwinUNETR SSL
    (methods.md §1.1, fixture F1; the denominator includes the positive); identically 0 for B = 1.
    """
    return ContrastiveLoss(temperature=temperature)(z1, z2)


def voxel_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """vox2vec / hierarchical dense SSL InfoNCE between (N, D) embeddings of N matched voxels of two views.

    ``z1[i]`` and ``z2[i]`` embed the same anatomical voxel; every other voxel of both views is a negative
    (methods.md §4.4, §7.3). With ``ℓ^{ab}_{ij} = z^a_i · z^b_j / τ`` and the self-similarities ``ℓ^{11}_{ii}``,
    ``ℓ^{22}_{ii}`` set to −∞, ``L_1 = mean_i[−ℓ^{12}_{ii} + logsumexp([ℓ^{11}_{i·}, ℓ^{12}_{i·}])]``,
    ``L_2 = mean_i[−ℓ^{21}_{ii} + logsumexp([ℓ^{21}_{i·}, ℓ^{22}_{i·}])]`` and ``L = (L_1 + L_2) / 2``. Computed
    from the three N × N blocks (ℓ^{21} is ℓ^{12} transposed, as the official code reuses it) and the log-sum-exp
    of a row's two halves combined, so neither the 2N × 2N matrix nor a concatenation is built: at vox2vec's 10 x
    1024 voxels per view the full matrix took a third more products and 1.6 GB per copy.

    As in the official code the rows are **not** normalised here: pass the L2-normalised projections (the vox2vec
    projector ends with an L2 norm). On unit rows this equals :func:`nt_xent` at the same temperature.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"voxel_info_nce needs two (N, D) tensors of the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")

    def logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / temperature).float()

    cross = logits(z1, z2)  # ℓ^{12}
    within_1, within_2 = (logits(z, z).fill_diagonal_(float("-inf")) for z in (z1, z2))
    positives = cross.diagonal()
    loss_1 = torch.logaddexp(cross.logsumexp(dim=1), within_1.logsumexp(dim=1)) - positives
    loss_2 = torch.logaddexp(cross.logsumexp(dim=0), within_2.logsumexp(dim=1)) - positives
    return (loss_1.mean() + loss_2.mean()) / 2


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``||norm(p) - norm(z)||^2 = 2 - 2 cos(p, z)``, normalised and summed along dim 1 (features / channels).

    DeepMind's BYOL ``regression_loss`` (methods.md §6.1). One value per sample for (B, D) inputs; per voxel for
    (B, C, X, Y, Z) maps (PGL's local consistency). In float32: under bf16 autocast the projections arrive in bf16,
    where 2 - 2 cos near convergence would keep about two significant digits.
    """
    p, z = p.float(), z.float()
    return (F.normalize(p, dim=1, eps=1e-12) - F.normalize(z, dim=1, eps=1e-12)).pow(2).sum(dim=1)


def symmetric_byol_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """BYOL's loss: predictions of each view regress the other view's target projection (no gradient into z)."""
    return (regression_loss(p1, z2.detach()) + regression_loss(p2, z1.detach())).mean()

"""UNetFormer-style masked volume modelling (Hatamizadeh et al., arXiv 2204.00631, 2022) on MONAI's SwinUNETR.

UNetFormer has no public code (methods.md §8.3); this is masked image modelling on MONAI's SwinUNETR, which has
UNetFormer's layout: a 3D Swin Transformer encoder linked to a CNN decoder by skip connections at five
resolutions. A random 40% of the crop's 16³ patches are set to 0 (MIM-Med3D style patch masking,
``ssl3d.pretrain.bricks.masking``), the whole network regresses the original crop, and the loss is L1 on the
masked voxels only, ``Σ M |ŷ − x| / Σ M`` on raw [0, 1] intensities, with no output activation (MIM-Med3D's
SimMIM/MAE loss, methods.md §8.2). Only the encoder transfers: the paper pre-trains "the encoder backbone", so the
decoder that reconstructed the volume is discarded, as in the Swin UNETR SSL recipe of the same group.

Defaults and their sources (the UNetFormer full text was not retrievable; its abstract and a published summary
of its ablation were):
- ``mask_ratio`` 0.4 and ``mask_patch`` 16: UNetFormer's ablation over masking ratio and patch size, whose optimum
  is 0.4 and 16 (the same values as HybridMIM). MIM-Med3D's ViT-SimMIM masks 0.75 of 16³ patches.
- 96³ crops: MIM-Med3D and Swin UNETR SSL (UNetFormer pre-trains on Swin UNETR's 5050-CT cohort).
- AdamW lr 1e-4, weight decay 1e-5, linear warm-up over 50 of 3000 epochs then a flat lr (its cosine ends at
  ``eta_min`` = the base lr), no gradient clipping: MIM-Med3D's SimMIM recipe.
- batch 4 crops: our choice. MIM-Med3D takes 4 crops from each of 4 volumes (16 crops on a ViT-B); the whole
  SwinUNETR runs at full resolution here, and 4 crops is what HybridMIM trains its Swin variant with.

Differences from UNetFormer, to footnote in the results:
- MONAI's SwinUNETR stands in for UNetFormer's network; UNetFormer's decoder has deep supervision, this has none,
  and UNetFormer+ (the transformer decoder) is not offered.
- Masked voxels are set to 0 in the input instead of a learnable mask token after the patch embedding (SimMIM's
  Swin practice): SwinUNETR's first skip (``encoder1``) convolves the raw input, so a token-level mask would leave
  the masked voxels visible to the decoder, and the 16³ mask patches are larger than Swin's 2³ embedding patches.
- The number of masked patches is ``L − int(L·(1 − r))`` (87 of 216), MAE's count; MIM-Med3D masks ``int(r·L)``.
- The mask is drawn from the sample's random generator in the data loader, not in the forward pass, so runs are
  reproducible and resumable like every method of the suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.masking import masked_view, patch_mask_to_voxels
from ssl3d.pretrain.method import Method, MethodConfig, Transfer


@dataclass
class UNetFormerMIMConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"reconstruction": 1.0})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 4
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-5})
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "name": "cosine", "warmup_fraction": 50 / 3000, "final_lr_fraction": 1.0})
    mask_ratio: float = 0.4
    mask_patch: int = 16

    def __post_init__(self):
        if any(size % self.mask_patch for size in self.patch_size):
            raise ValueError(f"unetformer_mim.mask_patch: patch_size {tuple(self.patch_size)} is not a whole number "
                             f"of {self.mask_patch}-voxel mask patches")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"unetformer_mim.mask_ratio: {self.mask_ratio} is not in (0, 1)")


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels where ``voxel_mask`` is True (broadcast over channels), whole batch."""
    weight = voxel_mask.expand_as(prediction).to(prediction.dtype)
    return ((prediction - target).abs() * weight).sum() / weight.sum()


class UNetFormerMIM(Method):
    name = "unetformer_mim"
    display_name = "UNetFormer MIM"
    paper = ("Hatamizadeh et al., UNetFormer: A Unified Vision Transformer Model and Pre-Training Framework for 3D "
             "Medical Image Segmentation, arXiv 2204.00631, 2022 (no public code: MIM on SwinUNETR substituted)")
    probe_features = "encoder"  # only the encoder is trained and transferred
    Config = UNetFormerMIMConfig
    transfer = Transfer(prefixes={"network.": ""}, parts=("encoder",), coverage={"encoder": 1.0})

    def __init__(self, config: UNetFormerMIMConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.network = build_network(backbone, in_channels=in_channels, out_channels=in_channels)
        self.patches_per_axis = tuple(size // config.mask_patch for size in config.patch_size)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return masked_view(region, rng, self.config.mask_ratio, self.config.mask_patch)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reconstruction = self.network(batch["input"])
        voxels = patch_mask_to_voxels(batch["mask"], self.config.mask_patch, self.patches_per_axis)
        return {"reconstruction": masked_l1(reconstruction, batch["target"], voxels)}

"""Hierarchical dense SSL (Kats, Hirsch, Heinrich, ISBI 2024): vox2vec's voxel-level contrastive learning, balanced.
Two overlapping crops of a scan share an anchor voxel; each is distorted independently with local pixel shuffling,
a non-linear intensity curve and in-painting. The backbone's decoder pyramid of each view is projected level by
level to 32 channels (the balanced pyramid), a voxel is embedded by concatenating its cell's features on every
level, and an MLP projector maps it to a unit vector of 128; InfoNCE (tau 0.1) makes the two embeddings of the
same anatomical voxel agree against every other sampled voxel of the batch. A 1x1x1 convolution on the finest
decoder map restores the undistorted view (MSE), and L = InfoNCE + 10 MSE. The three changes over vox2vec
(local augmentations, balanced pyramid, restoration loss) are switches, so the paper's Table 1 ablation is one
config grid.

Defaults are the official code's (``multimodallearning/hierarchical-dense-ssl``, methods.md §4.7): views
128 x 128 x 32, at most 1024 matched body voxels per pair, batch 10 pairs, Adam lr 3e-4 without weight decay or
schedule (``adamw`` with weight decay 0 is Adam), gradient clipping 1.0 (norm), temperature 0.1, projection 128,
body mask threshold 0.3 on the [0, 1] image, ``loss_weights`` ``{"info_nce": 1, "restoration": 10}``. The official
backbone is ``fpn3d`` with base 32 and 5 levels (the "fewer levels, doubled channels" half of the paper's
architectural change, set in the experiment's backbone entry); the method runs on any backbone's decoder pyramid.

Switches:
- ``projections``: ``fixed_random`` (default, the official code: its level projections are never registered, so
  they stay random; here seeded by the run and saved as buffers, see ``ssl3d.pretrain.hdssl_parts.BalancedPyramid``)
  or ``learned`` (the paper's reading).
- ``local_augmentations`` (Table 1 "aug"): False leaves out local shuffling and in-painting and keeps the non-linear
  intensity curve, as the official ``AppearanceTransform``'s ``is_local`` / ``is_in_painting`` flags do. vox2vec's
  own augmentations (blur, noise, random HU window) are not used instead: they are defined in Hounsfield units and
  the ablation ran on MRI, and the paper names only shuffling and in-painting as the local augmentations.
- ``loss_weights.restoration`` (Table 1 "loss"): 0 drops the restoration head and its term.
- ``balanced_pyramid`` (Table 1 "arch"): False concatenates each level's raw decoder features, as vox2vec (the
  projector's width is then the sum of the levels' channels).
With all three off this is vox2vec's loss path (unbalanced embedding, 3-layer projector, the same InfoNCE and
shared view/voxel bricks) except for the augmentations (the Bezier curve instead of vox2vec's HU augmentations) and
the body threshold (0.3 here, -500 HU there); vox2vec's backbone, ``fpn3d`` base 16 with 6 levels, is the
experiment's backbone entry.

Deviations:
- The official batch is 10 pairs cut from ONE scan, so all negatives come from the same scan. The suite's loader
  cuts each sample from a random scan, so by default (``batch_size`` 10, ``pairs_per_region`` 1) each pair comes
  from its own scan and negatives come from other scans too; ``pairs_per_region`` 10 with ``batch_size`` 1 draws
  the batch's pairs from one region of one scan (as vox2vec's switch of the same name).
- The views are cut from a region of 2 x patch - 1 voxels per axis (every placement of two patches sharing a voxel
  fits), not from the whole scan; the body mask is computed once per scan, on the whole scan (shared bricks
  ``ssl3d.pretrain.bricks.voxel_pairs``, as vox2vec). The body threshold 0.3 is the official value on the official
  CT scaling (HU [-175, 250] -> [0, 1]: about -47 HU); on the suite's ``hdssl_ct`` cache (HU [-1350, 1000], the
  paper's window) it is -645 HU (vox2vec: -500 HU); on MRI it is the paper's foreground threshold.
- The paper describes a restoration head of two convolutions; the official code uses one 1x1x1 convolution (the
  deeper head is commented out), as here. Where the backbone's finest decoder map is not at full resolution
  (e.g. MONAI's UNet), the restored map is upsampled trilinearly to the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.heads import voxel_projector
from ssl3d.pretrain.bricks.losses import voxel_info_nce
from ssl3d.pretrain.bricks.voxel_pairs import (VoxelContrastConfig, pyramid_at_voxels, split_body_mask, view_pair,
                                               view_pair_region, with_body_mask)
from ssl3d.pretrain.hdssl_parts import AppearanceTransform, BalancedPyramid
from ssl3d.pretrain.method import Method, Transfer

BALANCED_CHANNELS = 32  # per level, official


@dataclass
class HDSSLConfig(VoxelContrastConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"info_nce": 1.0, "restoration": 10.0})
    body_threshold: float = 0.3
    projections: str = "fixed_random"
    local_augmentations: bool = True
    balanced_pyramid: bool = True


class HierarchicalDenseSSL(Method):
    name = "hdssl"
    display_name = "Hierarchical dense SSL"
    paper = ("Kats, Hirsch, Heinrich, Self-supervised learning of dense hierarchical representations for medical "
             "image segmentation, ISBI 2024")
    version = "2"  # 2: the body mask of the whole scan (1: of each region)
    multichannel = False  # the body mask and the official augmentations are defined on one [0, 1] channel
    Config = HDSSLConfig
    transfer = Transfer(prefixes={"backbone.": ""})

    def __init__(self, config: HDSSLConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.backbone = build_network(backbone, in_channels=in_channels, out_channels=in_channels)
        levels = self.backbone.decoder_levels
        self.strides = [level.stride for level in levels]
        self.balance = (BalancedPyramid([level.channels for level in levels], BALANCED_CHANNELS, config.projections)
                        if config.balanced_pyramid else None)
        dim = BALANCED_CHANNELS * len(levels) if config.balanced_pyramid else sum(level.channels for level in levels)
        self.projector = voxel_projector(dim, config.projection_dim)
        self.restoration_head = torch.nn.Conv3d(levels[0].channels, in_channels, kernel_size=1)
        self.augment = AppearanceTransform(local=config.local_augmentations)

    def region_size(self) -> tuple[int, int, int]:
        return view_pair_region(self.config)

    def prepare_volume(self, volume: np.ndarray) -> np.ndarray:
        return with_body_mask(volume, self.config.body_threshold)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``pairs_per_region`` pairs: augmented inputs, un-augmented targets, matched voxels, stacked per key."""
        region, mask = split_body_mask(region)
        pairs = []
        for _ in range(self.config.pairs_per_region):
            pair = view_pair(self.config, region, mask, rng)
            pairs.append({"input1": self.augment(pair["view1"], rng), "input2": self.augment(pair["view2"], rng),
                          "target1": pair["view1"], "target2": pair["view2"],
                          "voxels1": pair["voxels1"], "voxels2": pair["voxels2"], "valid": pair["valid"]})
        return {key: np.stack([pair[key] for pair in pairs]) for key in pairs[0]}

    def _view(self, x: torch.Tensor, voxels: torch.Tensor, valid: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit projections (M, projection_dim) of the view's valid voxels, and its finest decoder map."""
        decoded = self.backbone.decode(self.backbone.encode(x))
        pyramid = self.balance(decoded) if self.balance is not None else decoded
        embeddings = pyramid_at_voxels(pyramid, self.strides, voxels.long())[valid]
        return F.normalize(self.projector(embeddings), dim=1), decoded[0]

    def _restore(self, finest: torch.Tensor, size) -> torch.Tensor:
        restored = self.restoration_head(finest)
        if restored.shape[2:] != size:
            restored = F.interpolate(restored, size=size, mode="trilinear", align_corners=False)
        return restored

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = {key: value.flatten(0, 1) for key, value in batch.items()}  # (batch, pairs, ...) -> (batch·pairs, ...)
        valid = pairs["valid"].bool()  # the loop collates every view as float32
        z1, finest1 = self._view(pairs["input1"], pairs["voxels1"], valid)
        z2, finest2 = self._view(pairs["input2"], pairs["voxels2"], valid)
        terms = {"info_nce": voxel_info_nce(z1, z2, self.config.temperature)}
        if self.config.loss_weights.get("restoration"):
            size = pairs["target1"].shape[2:]
            terms["restoration"] = (F.mse_loss(self._restore(finest1, size), pairs["target1"])
                                    + F.mse_loss(self._restore(finest2, size), pairs["target2"])) / 2
        return terms

"""PGL, prior-guided local self-supervised learning (Xie et al. 2020): BYOL made local, so that the encoder learns
features that agree voxel by voxel on the same anatomy seen in two differently cropped, scaled and flipped views.

Two views of a region share at least 10 % of their crops (§3.2); an online path (encoder, convolutional projector,
predictor) and an EMA target path (encoder, projector) map them to feature maps; the prior-guided aligner
(``ssl3d.pretrain.pgl_align``) flips each map back (FlipAlign) and extracts the region both crops show on one
grid (CSAlign, a 3D RoIAlign); the local consistency loss is the voxel-wise 2 - 2 cos between the online
prediction of one view and the target projection of the other on that grid, symmetrised (§3.4, Eq. 8-9).

No official code was ever released (methods.md §3.1): this file is the suite's reference implementation. Defaults
are the paper's (§5.1) and BYOL's where the paper follows it: LARS, base lr 0.2, weight decay 1.5e-6 (BYOL's),
batch 128, cosine decay after 2 of 500 warm-up epochs, target decay 0.996 -> 1, projector and predictor
Conv-BN-ReLU-Conv with 4096 hidden and 256 output channels. Choices where the paper is silent:
- ``level`` (default -1, the last encoder stage, stride 32 on the ResNet-50): the encoder map the loss reads;
- ``align_flip`` / ``align_crop_scale`` (default both on): the two halves of the aligner, off for the ablations of
  Tables 5-8 (w/o F&CS, w/o CS, w/o F); without CSAlign the whole maps are compared cell by cell;
- ``loss_weights.global`` (default 0): the paper describes only the local loss; a weight adds BYOL's global term on
  the maps' spatial means;
- the input size (lost from §5.1's text) defaults to BYOL's 96³; crops are drawn from a region of twice the input
  size per axis (the paper crops from the whole scan), so overlaps range from whole views down to the 10 % floor;
- the overlap is the common volume over the larger crop's volume (at least 10 % of each view is shared).
The encoder is the backbone's ``encode`` (on ``pgl_segnet`` the 3D ResNet-50 of §3.3); only it transfers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.ema import EMATarget, byol_tau
from ssl3d.pretrain.bricks.heads import conv_head
from ssl3d.pretrain.bricks.losses import symmetric_byol_loss
from ssl3d.pretrain.bricks.views import augment_view, overlapping_boxes
from ssl3d.pretrain.method import Method, MethodConfig, Transfer
from ssl3d.pretrain.pgl_align import align, common_region


@dataclass
class PGLConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"local": 1.0, "global": 0.0})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 128
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "name": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "momentum": 0.9, "trust_coefficient": 1e-3})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_fraction": 2 / 500})
    tau_base: float = 0.996
    projector_hidden: int = 4096
    projection_dim: int = 256
    predictor_hidden: int = 4096
    level: int = -1
    align_flip: bool = True
    align_crop_scale: bool = True
    min_overlap: float = 0.1

    def __post_init__(self):
        if not 0 < self.min_overlap <= 1:
            raise ValueError(f"pgl.min_overlap: {self.min_overlap} is not a fraction in (0, 1]")


class ProjectedMaps(torch.nn.Module):
    """Encoder + convolutional projector on one encoder level: the part of the online path the target mirrors."""

    def __init__(self, backbone: dict, in_channels: int, level: int, hidden: int, dim: int):
        super().__init__()
        self.backbone = build_network(backbone, in_channels=in_channels, out_channels=1)
        levels = len(self.backbone.encoder_levels)
        if not -levels <= level < levels:
            raise ValueError(f"pgl.level: {level} is not an encoder level of {backbone['name']}, which has {levels} "
                             f"(0 to {levels - 1}, or -1 for the last)")
        self.level = level
        self.projector = conv_head(self.backbone.encoder_levels[level].channels, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.encode(x)[self.level])


class PGL(Method):
    name = "pgl"
    display_name = "PGL"
    paper = "Xie et al., PGL: Prior-Guided Local Self-supervised Learning for 3D Medical Image Segmentation, 2020"
    probe_features = "encoder"  # only the encoder is trained and transferred
    Config = PGLConfig
    transfer = Transfer(prefixes={"online.backbone.": ""}, parts=("encoder",), coverage={"encoder": 1.0})

    def __init__(self, config: PGLConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.online = ProjectedMaps(backbone, in_channels, config.level, config.projector_hidden,
                                    config.projection_dim)
        self.predictor = conv_head(config.projection_dim, config.predictor_hidden, config.projection_dim)
        self.target = EMATarget(self.online)

    def region_size(self) -> tuple[int, int, int]:
        return tuple(2 * size for size in self.config.patch_size)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        boxes = overlapping_boxes(region.shape[1:], self.config.patch_size, rng, self.config.min_overlap)
        views = {}
        for i, box in enumerate(boxes, 1):
            view = augment_view(region, self.config.patch_size, rng, box=box)
            views |= {f"view{i}": view.image, f"box{i}": view.box, f"flips{i}": view.flips}
        return views

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p1, p2 = self.predictor(self.online(batch["view1"])), self.predictor(self.online(batch["view2"]))
        with torch.no_grad():
            z1, z2 = self.target(batch["view1"]), self.target(batch["view2"])
        region = common_region(batch["box1"], batch["box2"])

        def aligned(maps: torch.Tensor, view: int) -> torch.Tensor:
            return align(maps, batch[f"box{view}"], batch[f"flips{view}"].bool(), region,
                         self.config.align_flip, self.config.align_crop_scale)

        terms = {"local": symmetric_byol_loss(aligned(p1, 1), aligned(z2, 2), aligned(p2, 2), aligned(z1, 1))}
        if self.config.loss_weights.get("global"):
            pooled = [maps.mean(dim=(2, 3, 4)) for maps in (p1, z2, p2, z1)]
            terms["global"] = symmetric_byol_loss(*pooled)
        return terms

    def after_step(self, step: int, total_steps: int) -> None:
        self.target.update(self.online, byol_tau(step, total_steps, self.config.tau_base))

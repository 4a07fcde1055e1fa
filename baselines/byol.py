"""BYOL in 3D: the global-consistency baseline of the PGL paper (Grill et al., NeurIPS 2020).

An online network (encoder, projector, predictor) predicts the target network's projection of another view of the
same region; the target (encoder, projector) is an exponential moving average of the online weights with BYOL's
cosine schedule from 0.996 to 1. The loss is BYOL's symmetric regression loss, 2 - 2 cos per view pair.
Views follow the PGL paper's augmentation list (§3.2), so BYOL and PGL differ only in global vs local consistency.

Defaults are the paper's (PGL §4 "Training PGL model", BYOL's DeepMind configs): LARS (trust coefficient 1e-3,
momentum 0.9), base lr 0.2, weight decay 1.5e-6, cosine decay after a warm-up of 2 of 500 epochs, batch 128,
projector and predictor 4096 -> 256. PGL's encoder is a 3D ResNet-50; here the encoder is the downstream
segmentation network's own encoder (the suite's shared backbone), so that the whole encoder transfers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.ema import EMATarget, byol_tau
from ssl3d.pretrain.bricks.heads import mlp_head
from ssl3d.pretrain.bricks.losses import symmetric_byol_loss
from ssl3d.pretrain.bricks.views import byol_views
from ssl3d.pretrain.method import Method, MethodConfig, Transfer


@dataclass
class BYOLConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"regression": 1.0})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 128
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "name": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "momentum": 0.9, "trust_coefficient": 1e-3})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_fraction": 2 / 500})
    tau_base: float = 0.996
    projector_hidden: int = 4096
    projection_dim: int = 256
    predictor_hidden: int = 4096


class OnlineNetwork(torch.nn.Module):
    """Encoder + global average pool + projector: the part of the online path the target mirrors."""

    def __init__(self, backbone: dict, in_channels: int, projector_hidden: int, projection_dim: int):
        super().__init__()
        self.backbone = build_network(backbone, in_channels=in_channels, out_channels=1)
        self.projector = mlp_head(self.backbone.encoder_levels[-1].channels, projector_hidden, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck = self.backbone.encode(x)[-1]
        return self.projector(bottleneck.mean(dim=(2, 3, 4)))


class BYOL(Method):
    name = "byol"
    display_name = "BYOL"
    paper = "Grill et al., Bootstrap Your Own Latent, NeurIPS 2020 (3D, as the baseline of Xie et al., PGL, 2020)"
    probe_features = "encoder"  # only the encoder is trained and transferred
    Config = BYOLConfig
    transfer = Transfer(prefixes={"online.backbone.": ""}, parts=("encoder",), coverage={"encoder": 1.0})

    def __init__(self, config: BYOLConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.online = OnlineNetwork(backbone, in_channels, config.projector_hidden, config.projection_dim)
        self.predictor = mlp_head(config.projection_dim, config.predictor_hidden, config.projection_dim)
        self.target = EMATarget(self.online)

    def region_size(self) -> tuple[int, int, int]:
        """Crops span 110-140% of the input size (PGL §3.2), so a region of 140% holds every crop."""
        return tuple(int(np.ceil(1.4 * size)) for size in self.config.patch_size)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        view1, view2 = byol_views(region, self.config.patch_size, rng)
        return {"view1": view1, "view2": view2}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.online(batch["view1"]), self.online(batch["view2"])
        with torch.no_grad():
            t1, t2 = self.target(batch["view1"]), self.target(batch["view2"])
        return {"regression": symmetric_byol_loss(self.predictor(z1), t2, self.predictor(z2), t1)}

    def after_step(self, step: int, total_steps: int) -> None:
        self.target.update(self.online, byol_tau(step, total_steps, self.config.tau_base))

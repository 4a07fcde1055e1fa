"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): restore the original sub-volume from a distorted one.

Each sample is a cube; the target is the (possibly flipped) cube and the input is the target after local pixel
shuffling, a non-linear intensity mapping, and in- or out-painting, with the official probabilities
(``ssl3d.pretrain.bricks.genesis_transforms``). The loss is the mean squared error between the sigmoid output and the
target. The whole encoder-decoder transfers to fine-tuning; only the output convolution does not.

Defaults are the official code's: 64 x 64 x 32 cubes in [0, 1], batch 6, SGD lr 1.0 with momentum 0.9 and no weight
decay, the lr halved by StepLR. Fidelity switches:
- ``backbone: genesis_unet3d`` is the official 3D UNet (its module names load the released
  ``Genesis_Chest_CT.pt``); ``basicunet`` / ``unet`` run the same pretext task on the suite's shared backbones.
- ``batch_stats_at_eval`` (a field of the genesis_unet3d backbone, default True as in the official code): its batch
  norm keeps using batch statistics in eval mode.
- ``transforms.flip_z`` (default False as in the official code): the official flip never flips Z and may "flip"
  the channel axis; True flips among the three spatial axes.
Deviation: the official schedule halves the lr every 40 epochs and stops early on validation loss (patience 50),
which has no fixed length; with a fixed budget of steps the lr is halved every quarter of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.genesis_transforms import GenesisTransformConfig, generate_pair
from ssl3d.pretrain.method import Method, MethodConfig, Transfer


@dataclass
class ModelsGenesisConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"restoration": 1.0})
    patch_size: tuple[int, int, int] = (64, 64, 32)
    batch_size: int = 6
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "name": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 0.0})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "step", "step_fraction": 0.25, "gamma": 0.5})
    transforms: dict[str, Any] = field(default_factory=dict)  # overrides of GenesisTransformConfig's official values


class ModelsGenesis(Method):
    name = "models_genesis"
    display_name = "Models Genesis"
    paper = "Zhou et al., Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis, MICCAI 2019"
    multichannel = False  # the official distortions (local shuffling, painting) are defined on one channel
    Config = ModelsGenesisConfig
    transfer = Transfer(prefixes={"network.": ""})

    def __init__(self, config: ModelsGenesisConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.transforms = GenesisTransformConfig(**config.transforms)
        self.network = build_network(backbone, in_channels=in_channels, out_channels=in_channels)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        distorted, target = generate_pair(region, rng, self.transforms)
        return {"input": distorted, "target": target}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        restored = torch.sigmoid(self.network(batch["input"]))
        return {"restoration": F.mse_loss(restored, batch["target"])}

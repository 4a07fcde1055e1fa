"""HybridMIM (Xing et al., arXiv 2303.10333 / IEEE JBHI 2024): masked image modelling at three levels.

The crop is divided into sub-volumes of 2 x 2 x 2 patches; a random 40% of the patches are masked (set to 0). The
network then learns at
- pixel level: partial region prediction, reconstructing the masked voxels inside one target region only
  (64^3 of a 96^3 crop by default); the decoder runs on that region alone, which is the speed-up of the paper's
  Figure 6 (``reconstruction_size`` is the knob; None reconstructs the whole crop);
- region level: patch-masking perception, predicting from each sub-volume's features how many of its 8 patches
  are masked (9-way CE), which ones (8 BCEs), and a consistency term between the two heads;
- sample level: dropout-based contrastive learning (SimCSE): the masked crop is encoded twice with dropout
  active and the two global features are positives for NT-Xent (tau 0.5, MONAI's ContrastiveLoss).
Loss weights 1, 0.1, 0.1, 0.01, 0.1 (reconstruction, count, location, consistency, contrastive), as the paper.

Fidelity switches (paper default; ``reference/methods.md`` §2):
- ``grouping``: ``spatial`` (the paper: a sub-volume is 2 x 2 x 2 neighbouring patches) or ``code_raster`` (the
  official code groups 8 consecutive raster indices, which misaligns labels and features).
- ``region_position``: ``center`` (the paper sets the target region around the image centre) or ``corner`` (the
  official code reconstructs the far corner box [32:96]^3).
- ``contrastive_stop_gradient``: True (the official code computes the second pass without gradients) or False
  (SimCSE back-propagates through both passes).
The consistency term is 1/2 (CE(count head, count implied by the location head) + MSE(implied count, argmax
count)); the MSE half carries no gradient in the official code, so it is reported as the separate zero-weight
term ``consistency_mse`` and the trained term ``consistency`` is the CE half over 2.

Backbones (methods.md §2.3), as the official ``Pretrain/pretrain_models/deep_unet_v2.py`` and ``swinunetr.py``; the
method runs on any backbone with ``region_decoding`` (the UNet variant) or ``hidden_states`` (the Swin variant):
- ``hybridmim_unet``: the heads read the encoder's 12³ bottleneck; count and location heads the mean of each 4³
  window (one per 32³ sub-volume), the contrast head the mean of all cells. Only the decoder is cropped to the
  target region, the encoder runs on the whole crop. MONAI's ``unet`` (the demo's network) is taken the same way.
- ``swinunetr`` (MONAI's SwinUNETR): the heads read the Swin's last hidden state (layer-normed as MONAI's
  forward, 768 × 3³ tokens for a 96³ crop at feature_size 48), not ``encoder10``'s output; count and location
  heads each of the tokens (one per 32³ sub-volume), the contrast head **token 1 alone** (the official code copied
  SwinUNETR SSL's head), not a pooled vector as in the UNet variant. The input and every hidden state are cropped
  to the target region before ``encoder1..4`` and ``encoder10`` (``SplitSwinUNETR.encode(x, hidden, region)``), so these
  blocks run on the region only, like the decoder; ``encoder10`` is trained by the reconstruction alone.
  The region lies on the 32-voxel cells of the 3³ bottleneck, where 64³ of a 96³ crop cannot be centred: set
  ``region_position: corner`` (the official box [32:96]³). Two official settings (methods.md §2.5) belong to the
  experiment config, not to this method: the backbone entry sets ``drop_rate: 0.1`` (the Swin's dropout is what
  tells the two contrastive passes apart; MONAI's default 0 makes them identical, which is warned about), and
  ``optimizer`` is AdamW lr 6e-6, weight_decay 0.1 (the defaults below are the UNet's, lr 1e-4, weight_decay 1e-3).
  The official code carries its own copy of the Swin, whose patch merging concatenates the 2³ neighbours in an
  older order (two of them twice, two not at all); this uses MONAI's SwinUNETR, which merges all eight.

Deviation: the mask is drawn from the sample's own random generator in the data loader, not inside the forward
pass, so runs are reproducible and resumable like every method of the suite.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.losses import nt_xent
from ssl3d.pretrain.bricks.masking import masked_view
from ssl3d.pretrain.hybridmim_parts import (
    consistency_loss,
    count_loss,
    location_loss,
    masked_reconstruction_loss,
    region_features,
    region_labels,
)
from ssl3d.pretrain.method import Method, MethodConfig, Transfer


@dataclass
class HybridMIMConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "reconstruction": 1.0, "count": 0.1, "location": 0.1, "consistency": 0.01, "consistency_mse": 0.0,
        "contrastive": 0.1})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 4
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-3})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_fraction": 500 / 100_000})
    mask_ratio: float = 0.4
    mask_patch: int = 16
    grouping: str = "spatial"
    reconstruction_size: int | None = 64
    region_position: str = "center"
    contrastive_stop_gradient: bool = True
    contrast_dim: int = 384

    def __post_init__(self):
        for name, allowed in (("grouping", ("spatial", "code_raster")), ("region_position", ("center", "corner"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"hybridmim.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.mask_patch < 1 or not 0 <= self.mask_ratio < 1:
            raise ValueError(f"hybridmim: mask_patch {self.mask_patch} / mask_ratio {self.mask_ratio}: want a patch "
                             "of at least 1 voxel and a ratio in [0, 1)")


class HybridMIM(Method):
    name = "hybridmim"
    display_name = "HybridMIM"
    figures = ("region_size_curve",)
    paper = ("Xing et al., HybridMIM: A Hybrid Masked Image Modeling Framework for 3D Medical Image "
             "Segmentation, IEEE JBHI 2024 (arXiv 2303.10333)")
    # its UNet decodes a box of the bottleneck; a transformer crops its hidden states before the encoder's blocks
    requires = (("region_decoding", "hidden_states"),)
    Config = HybridMIMConfig
    transfer = Transfer(prefixes={"network.": ""})

    def __init__(self, config: HybridMIMConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.network = build_network(backbone, in_channels=in_channels, out_channels=in_channels)
        self.transformer = "hidden_states" in self.network.capabilities  # the official Swin variant's choices
        if config.loss_weights.get("contrastive") and not any(
                isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.network.modules()):
            warnings.warn(f"hybridmim: the {backbone['name']} backbone has no dropout, so the two passes of the "
                          f"contrastive term are identical (SimCSE draws its positive pairs from dropout); give the "
                          f"backbone a dropout of 0.1 as the official code, or set loss_weights.contrastive: 0",
                          stacklevel=2)
        self.patches_per_axis = [size // config.mask_patch for size in config.patch_size]
        if any(size % (2 * config.mask_patch) for size in config.patch_size):
            raise ValueError(f"hybridmim: patch_size {config.patch_size} must be a multiple of sub-volumes of "
                             f"2 x mask_patch = {2 * config.mask_patch} voxels")
        channels = self.bottleneck_channels()
        self.count_head = torch.nn.Linear(channels, 9)
        self.position_head = torch.nn.Linear(channels, 8)
        self.contrast_head = torch.nn.Linear(channels, config.contrast_dim)

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return masked_view(region, rng, self.config.mask_ratio, self.config.mask_patch)

    def _target_box(self, bottleneck_size: int, crop_size: int) -> tuple[int, int] | None:
        """The reconstruction region in bottleneck cells (start, stop), or None for the whole crop."""
        size = self.config.reconstruction_size
        if size is None or size >= crop_size:
            return None
        scale = crop_size // bottleneck_size
        if size % scale:
            raise ValueError(f"hybridmim.reconstruction_size: {size} is not a multiple of the bottleneck's "
                             f"{scale}-voxel cells")
        cells = size // scale
        if self.transformer and cells < 2:
            raise ValueError(f"hybridmim.reconstruction_size: {size} is one {scale}-voxel bottleneck cell; on a transformer "
                             f"the region needs at least two per axis (encoder10's instance norm needs more than one "
                             f"voxel): use {2 * scale} or more, or null for the whole crop")
        spare = bottleneck_size - cells
        if self.config.region_position == "corner":
            return spare, bottleneck_size
        if spare % 2:
            raise ValueError(f"hybridmim.region_position: a {size}-voxel region cannot be centred on the "
                             f"{bottleneck_size} bottleneck cells of {scale} voxels of a {crop_size}-voxel crop; "
                             f"set region_position: corner, or a reconstruction_size leaving an even number of cells")
        return spare // 2, spare // 2 + cells

    def bottleneck_channels(self) -> int:
        levels = self.network.hidden_levels if self.transformer else self.network.encoder_levels
        return levels[-1].channels

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[tuple | None], torch.Tensor]]:
        """The bottleneck the pretext heads read, (B, C, n, n, n), and a function decoding a region (start, stop) of
        it (None: the whole crop) up to the head's input. UNet: the encoder's last map, and the decoder's inputs are
        cropped; transformer: the last hidden state, and the input and hidden states are cropped before the
        encoder's conv blocks (module docstring)."""
        network = self.network
        if self.transformer:
            hidden = network.hidden_states(x)
            return hidden[-1], lambda box: network.decode(network.encode(x, hidden, region=box))
        features = network.encode(x)
        return features[-1], lambda box: network.decode(features, region=box)

    def _contrast_input(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, C): the mean of the UNet's bottleneck, but the Swin's token 1 alone, as each official variant."""
        return bottleneck.flatten(start_dim=2)[:, :, 1] if self.transformer else bottleneck.mean(dim=(2, 3, 4))

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = self.config.loss_weights
        masked, target = batch["input"], batch["target"]
        bottleneck, decode = self._encode(masked)
        box = self._target_box(bottleneck.shape[-1], masked.shape[-1])
        logits = self.network.head(decode(box))
        crop_box = (...,) if box is None else (..., *self.network.voxel_region(box))
        terms = {"reconstruction": masked_reconstruction_loss(torch.sigmoid(logits), target[crop_box],
                                                              masked[crop_box])}
        # one feature per 32³ sub-volume: a 4³-cell window's mean on the UNet, a single token on the Swin
        regions = region_features(bottleneck, regions_per_axis=self.patches_per_axis[0] // 2)
        count_logits, position_logits = self.count_head(regions), self.position_head(regions)
        count, position = region_labels(batch["mask"], self.patches_per_axis, self.config.grouping)
        terms["count"] = count_loss(count_logits, count)
        terms["location"] = location_loss(position_logits, position)
        ce_half, mse_half = consistency_loss(count_logits, position_logits)
        terms["consistency"], terms["consistency_mse"] = ce_half / 2, mse_half / 2
        if weights.get("contrastive"):
            z1 = self.contrast_head(self._contrast_input(bottleneck))
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.contrastive_stop_gradient):
                z2 = self.contrast_head(self._contrast_input(self._encode(masked)[0]))
            terms["contrastive"] = nt_xent(z1, z2)
        return terms

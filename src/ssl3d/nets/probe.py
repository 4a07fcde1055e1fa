"""Linear probing: a frozen backbone and one linear head per pyramid level (the ``probe`` protocol).

Why this head: it is the official hierarchical-dense-SSL / vox2vec ``FPNLinearHead``, a 1×1×1 convolution per level
of the feature pyramid to the classes, each upsampled to the input size by nearest neighbour and summed (the
official code upsamples ×2 nearest level by level and adds; repeated ×2 nearest upsampling is nearest upsampling by
the level's stride, so the sums agree up to the order of the additions). A linear head measures what the
pre-trained features already separate, without a decoder that could learn it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl3d.nets.backbone import Backbone

FEATURES = ("decoder", "encoder")


class LinearProbe(torch.nn.Module):
    """``backbone`` frozen (no gradient, always in eval mode: dropout off, no normalisation statistic moves) and a
    linear head per level of its ``features`` pyramid (``decoder`` or ``encoder``) mapping to ``out_channels``.

    The backbone's buffers are restored after each pass, so that a layer that updates its statistics even in eval
    mode (Models Genesis' ``batch_stats_at_eval`` quirk) cannot move them either.
    """

    def __init__(self, backbone: Backbone, out_channels: int, features: str = "decoder"):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"protocol_settings.features: {features!r}; use one of {', '.join(FEATURES)}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.features = features
        levels = backbone.decoder_levels if features == "decoder" else backbone.encoder_levels
        self.heads = torch.nn.ModuleList(torch.nn.Conv3d(level.channels, out_channels, kernel_size=1)
                                         for level in levels)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's ``features`` maps of ``x``, finest first."""
        buffers = [buffer.clone() for buffer in self.backbone.buffers()]
        maps = self.backbone.encode(x)
        if self.features == "decoder":
            maps = self.backbone.decode(maps)
        for buffer, saved in zip(self.backbone.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(F.interpolate(head(level), size=x.shape[2:], mode="nearest")
                   for head, level in zip(self.heads, self.pyramid(x), strict=True))

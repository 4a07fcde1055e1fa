"""MONAI's segmentation networks with their forward pass split into ``encode`` / ``decode`` / ``head``.

Pre-training methods need the encoder's feature maps (BYOL pools the bottleneck, HybridMIM predicts from its
regions) and a decoder they can run on part of the volume. Each class subclasses the MONAI network, so parameter
names, and therefore checkpoints, are MONAI's; ``tests/test_backbones.py`` checks that each split forward equals
MONAI's own.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNETR, BasicUNet, SegResNet, SwinUNETR, UNet


class EncodeDecodeHead:
    """``forward`` = ``head(decode(encode(x)))``; a network defines the three parts (listed before the MONAI base
    class so this ``forward`` replaces MONAI's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


class SplitBasicUNet(EncodeDecodeHead, BasicUNet):
    """MONAI's BasicUNet with its forward pass split into encoder, decoder and head (same parameter names)."""

    def __init__(self, features=(32, 32, 64, 128, 256, 32), **kwargs):
        super().__init__(features=tuple(features), **kwargs)
        self.encoder_channels = tuple(features[:5])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps from full resolution (x0) to the bottleneck (x4)."""
        features = [self.conv_0(x)]
        for down in (self.down_1, self.down_2, self.down_3, self.down_4):
            features.append(down(features[-1]))
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = features
        u = self.upcat_4(x4, x3)
        u = self.upcat_3(u, x2)
        u = self.upcat_2(u, x1)
        return self.upcat_1(u, x0)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.final_conv(decoded)


class SplitUNet(UNet):
    """MONAI's UNet with an ``encode`` pass (same parameter names). MONAI nests each level as
    Sequential(down, SkipConnection(next level), up); the innermost level is the bottleneck."""

    def __init__(self, channels=(16, 32, 64, 128), **kwargs):
        super().__init__(channels=tuple(channels), **kwargs)
        self.encoder_channels = tuple(channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of each down layer, from full resolution to the bottleneck."""
        features, level = [], self.model
        while isinstance(level, torch.nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
            x = level[0](x)
            features.append(x)
            level = level[1].submodule
        features.append(level(x))
        return features


class SplitSegResNet(EncodeDecodeHead, SegResNet):
    """MONAI's SegResNet with ``encode`` returning every down layer's output (same parameter names).

    MONAI's own ``encode`` returns ``(bottleneck, skips)`` and its ``decode`` includes the output block; here
    ``encode`` gives the list (full resolution first, bottleneck last), ``decode`` stops before the head and
    ``head`` is ``conv_final`` (norm → act → 1³ conv)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder_channels = tuple(self.init_filters * 2 ** i for i in range(len(self.blocks_down)))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.convInit(x)
        if self.dropout_prob is not None:
            x = self.dropout(x)
        features = []
        for down in self.down_layers:
            x = down(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x, skips = features[-1], features[-2::-1]
        for up, upl, skip in zip(self.up_samples, self.up_layers, skips):
            x = upl(up(x) + skip)
        return x

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.conv_final(decoded) if self.use_conv_final else decoded


class SplitUNETR(EncodeDecodeHead, UNETR):
    """MONAI's UNETR with an ``encode`` pass (same parameter names): ``encoder1`` on the input, ``encoder2..4`` on
    the ViT's hidden states 3, 6, 9 (upsampled to 1/2, 1/4, 1/8 of the input) and the ViT's final normed tokens as
    the 1/16 bottleneck, as MONAI's forward."""

    def __init__(self, feature_size: int = 16, hidden_size: int = 768, **kwargs):
        super().__init__(feature_size=feature_size, hidden_size=hidden_size, **kwargs)
        self.encoder_channels = (feature_size, 2 * feature_size, 4 * feature_size, 8 * feature_size, hidden_size)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens, hidden = self.vit(x)
        return [self.encoder1(x), self.encoder2(self.proj_feat(hidden[3])), self.encoder3(self.proj_feat(hidden[6])),
                self.encoder4(self.proj_feat(hidden[9])), self.proj_feat(tokens)]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        enc1, enc2, enc3, enc4, bottleneck = features
        x = self.decoder5(bottleneck, enc4)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        return self.decoder2(x, enc1)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.out(decoded)


class SplitSwinUNETR(EncodeDecodeHead, SwinUNETR):
    """MONAI's SwinUNETR with an ``encode`` pass (same parameter names).

    ``encode`` returns what MONAI's forward feeds the decoder, shallow to deep: ``encoder1(x)`` (full resolution),
    ``encoder2..4`` of the (layer-normed, if ``normalize``) Swin hidden states 0-2 (1/2, 1/4, 1/8), hidden state 3
    itself (1/16; MONAI's decoder5 takes it as a skip without a conv block) and ``encoder10`` of hidden state 4
    (1/32, the bottleneck). So the encoder is ``swinViT`` + ``encoder1..4`` + ``encoder10``. Swin pre-training
    heads (SwinUNETR SSL, HybridMIM's Swin variant) read the raw last hidden state instead: ``hidden_states``.

    *Partial region decoding* (HybridMIM, ``reference/methods.md`` §2.3): ``encoder_blocks(x, hidden, region)``
    crops the input and every hidden state to the box of ``region`` (start, stop) in bottleneck cells and only then
    runs ``encoder1..4`` and ``encoder10``, as the official ``Pretrain/pretrain_models/swinunetr.py``; the blocks
    and the decoder thus run on that sub-volume only, and ``decode`` of the result covers :meth:`voxel_region` of
    the input. (On HybridMIM's UNet the crop is in ``decode``; here cropping the blocks' outputs instead would
    change every value of the box, through their instance-norm statistics and the zero padding at its edge.)
    """

    def __init__(self, feature_size: int = 48, **kwargs):
        super().__init__(feature_size=feature_size, **kwargs)
        f = feature_size
        self.encoder_channels = (f, f, 2 * f, 4 * f, 8 * f, 16 * f)

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five Swin stage outputs (1/2 .. 1/32 of the input; 1, 2, 4, 8, 16 × feature_size channels), normed
        as MONAI's forward does."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x.shape[2:])
        return self.swinViT(x, self.normalize)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder_blocks(x, self.hidden_states(x))

    def region_boxes(self, region: tuple) -> list[tuple[slice, slice, slice]]:
        """The box of ``region`` at every level, input first, bottleneck last. ``region`` is (start, stop) in
        bottleneck cells, ints or one value per axis (as ``HybridMIMUNet.decode``), doubled at each shallower
        level: (1, 3) of a 96³ input's 3³ bottleneck is [2:6]³ of hidden state 3 .. [32:96]³ of the input, the
        official code's ``stages``."""
        start, stop = (np.broadcast_to(np.asarray(v, dtype=int), (3,)) for v in region)
        if (start < 0).any() or (stop <= start).any():
            raise ValueError(f"swinunetr: region {region} is not a non-empty (start, stop) box")
        return [tuple(slice(int(a) << k, int(b) << k) for a, b in zip(start, stop))
                for k in reversed(range(len(self.encoder_channels)))]

    def voxel_region(self, region: tuple) -> tuple[slice, slice, slice]:
        """The voxel box of the input that ``decode(encoder_blocks(x, hidden, region))`` covers, as three slices."""
        return self.region_boxes(region)[0]

    def encoder_blocks(self, x: torch.Tensor, hidden: list[torch.Tensor], region: tuple | None = None
                       ) -> list[torch.Tensor]:
        """The decoder's inputs (``encode``'s list) from the input and its ``hidden_states``; with ``region``, only
        on that box of each (see the class docstring)."""
        inputs = [x, *hidden]
        if region is not None:
            boxes = self.region_boxes(region)
            if any(box.stop > n for box, n in zip(boxes[-1], hidden[-1].shape[2:])):
                raise ValueError(f"swinunetr: region {region} reaches beyond the bottleneck "
                                 f"{tuple(hidden[-1].shape[2:])}")
            inputs = [level[(..., *box)] for level, box in zip(inputs, boxes)]
        x, h0, h1, h2, h3, h4 = inputs
        return [self.encoder1(x), self.encoder2(h0), self.encoder3(h1), self.encoder4(h2), h3, self.encoder10(h4)]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        enc0, enc1, enc2, enc3, hidden3, bottleneck = features
        x = self.decoder5(bottleneck, hidden3)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        x = self.decoder2(x, enc1)
        return self.decoder1(x, enc0)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.out(decoded)

"""HybridMIM's UNet (``DeepUNet`` of the official ``Pretrain/pretrain_models/deep_unet_v2.py``), built from MONAI.

The official pre-training network is a BasicUNet-style UNet (``reference/methods.md`` §2.3):

* ``conv_0`` = TwoConv (2 × Conv3³ → InstanceNorm(affine) → Dropout → LeakyReLU(0.1), MONAI's ``Convolution``
  order), then one ``Down`` per pool size = MaxPool(pool) → TwoConv. With the official
  ``features=(64, 64, 128, 256, 512)`` and ``pool_sizes=((2,2,2), (2,2,2), (2,2,2), (1,1,1))`` a 96³ crop goes
  96 → 48 → 24 → 12 → 12 and the bottleneck is 512 × 12³ (MONAI's ``Down`` is hard-wired to factor 2, hence the
  own ``Down``/``UpCat`` here; ``TwoConv`` is MONAI's).
* one ``UpCat`` per level = transposed conv (kernel = stride = that level's pool, halving the channels, always, also
  at the last level unlike BasicUNet) → concat skip → TwoConv, and a 1³ conv head.
* Dropout only in ``conv_0`` and the ``UpCat`` TwoConvs: the official code does not forward ``dropout`` to the
  ``Down`` blocks (its unused ``self.drop`` p=0.5 is left out).

The official module names (``downs.N``, ``ups.N``, ``decoder_pred``) are renamed as MONAI's ``BasicUNet``
(``down_1``.., ``upcat_4``.., ``final_conv``), so parameters classify as BasicUNet's do (``conv_0``/``down_*``
encoder, ``upcat_*`` decoder, ``final_conv`` head). Parameter count with ``out_channels=1``: 21,996,769 (encoder
14,274,240), i.e. the official 22,202,482 minus its three pretext heads (205,713).

*Partial region decoding* (§2.3): ``decode(features, region=(start, stop))`` crops the bottleneck to cells
``[start:stop]`` per axis and every skip map to the matching box (scaled by the pools between the two levels), so
the decoder runs on that sub-volume only and returns features for the voxel box :meth:`HybridMIMUNet.voxel_region`
(official: cells (4, 12) of 12³ → voxels [32:96]³ of a 96³ crop, a 64³ output).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Pool
from monai.networks.nets.basic_unet import TwoConv

from ssl3d.nets.backbone import Backbone, cumulative, levels, triple
from ssl3d.nets.split import by_prefix

OFFICIAL_FEATURES = (64, 64, 128, 256, 512)
OFFICIAL_POOL_SIZES = ((2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))

Region = tuple  # (start, stop): ints, or 3-sequences (one value per axis), in bottleneck cells


class Down(torch.nn.Sequential):
    """MaxPool(pool) → TwoConv (names as MONAI's ``Down``: ``max_pooling``, ``convs``)."""

    def __init__(self, in_chns: int, out_chns: int, act, norm, bias: bool, dropout: float, pool_size):
        super().__init__()
        self.add_module("max_pooling", Pool["MAX", 3](kernel_size=tuple(pool_size)))
        self.add_module("convs", TwoConv(3, in_chns, out_chns, act, norm, bias, dropout))


class UpCat(torch.nn.Module):
    """Transposed conv (kernel = stride = pool, halving channels) → concat encoder map → TwoConv.

    Names as MONAI's ``UpCat`` (``upsample.deconv``, ``convs``). Where pooling floored an odd size, the upsampled
    map is replicate-padded at the far end to the skip's size, as the official code does.
    """

    def __init__(self, in_chns: int, cat_chns: int, out_chns: int, act, norm, bias: bool, dropout: float,
                 pool_size):
        super().__init__()
        up_chns = in_chns // 2
        self.upsample = UpSample(3, in_chns, up_chns, tuple(pool_size), mode="deconv")
        self.convs = TwoConv(3, cat_chns + up_chns, out_chns, act, norm, bias, dropout)

    def forward(self, x: torch.Tensor, x_e: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        missing = [e - u for e, u in zip(x_e.shape[2:], x.shape[2:])]
        if any(missing):
            pad = []
            for m in reversed(missing):  # F.pad lists the last axis first
                pad += [0, max(m, 0)]
            x = torch.nn.functional.pad(x, pad, mode="replicate")
        return self.convs(torch.cat([x_e, x], dim=1))


class HybridMIMUNet(Backbone, torch.nn.Module):
    """HybridMIM's ``DeepUNet`` backbone (no pretext heads), with the capability ``region_decoding``."""

    name = "hybridmim_unet"
    capabilities = frozenset({"region_decoding"})
    smallest = {"fields": {"features": [4, 4, 8, 8, 16]}, "input": (32, 32, 32)}

    def __init__(self, in_channels: int = 1, out_channels: int = 1, features: Sequence[int] = OFFICIAL_FEATURES,
                 pool_sizes: Sequence[Sequence[int]] = OFFICIAL_POOL_SIZES, dropout: float = 0.1,
                 act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), norm=("instance", {"affine": True}),
                 bias: bool = True):
        super().__init__()
        features = tuple(int(f) for f in features)
        pool_sizes = tuple(triple(p) for p in pool_sizes)
        depth = len(pool_sizes)
        if len(features) != depth + 1:
            raise ValueError(f"hybridmim_unet: {len(features)} features need {len(features) - 1} pool sizes, "
                             f"got {depth}")
        self.depth = depth
        strides = cumulative(pool_sizes)
        self.encoder_levels = levels(features, strides)
        self.decoder_levels = self.encoder_levels[:-1]
        self.conv_0 = TwoConv(3, in_channels, features[0], act, norm, bias, dropout)
        for level in range(1, depth + 1):  # no dropout in the Down blocks, as the official code
            self.add_module(f"down_{level}", Down(features[level - 1], features[level], act, norm, bias, 0.0,
                                                  pool_sizes[level - 1]))
        for level in range(depth, 0, -1):
            self.add_module(f"upcat_{level}", UpCat(features[level], features[level - 1], features[level - 1], act,
                                                    norm, bias, dropout, pool_sizes[level - 1]))
        self.final_conv = torch.nn.Conv3d(features[0], out_channels, kernel_size=1)

    @classmethod
    def build(cls, in_channels, out_channels, features=OFFICIAL_FEATURES, dropout=0.1, pool_sizes=OFFICIAL_POOL_SIZES):
        """The official ``DeepUNet``: 96³ → bottleneck 512 × 12³ with the default pool sizes."""
        return cls(in_channels=in_channels, out_channels=out_channels, features=features, dropout=dropout,
                   pool_sizes=pool_sizes)

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("conv_0.", "down_"), ("final_conv.",))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps x0 (full resolution) .. x_depth (bottleneck)."""
        features = [self.conv_0(x)]
        for level in range(1, self.depth + 1):
            features.append(getattr(self, f"down_{level}")(features[-1]))
        return features

    def decode(self, features: list[torch.Tensor], region: Region | None = None) -> list[torch.Tensor]:
        """Each UpCat's output, finest first; with ``region`` = (start, stop) in bottleneck cells (ints or one value
        per axis), only on that sub-volume: the bottleneck and every skip map are cropped to the matching box first,
        and the finest map covers :meth:`voxel_region` of the input."""
        features = self.crop_to_region(features, region)
        x, decoded = features[-1], []
        for level in range(self.depth, 0, -1):
            x = getattr(self, f"upcat_{level}")(x, features[level - 1])
            decoded.insert(0, x)
        return decoded

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.final_conv(decoded[0])

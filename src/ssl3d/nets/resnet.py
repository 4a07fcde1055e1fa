"""The two networks of PGL (Xie et al. 2020, arXiv 2011.12640): its 3D ResNet-50 encoder and its segmentation
network, on the backbone interface (``ssl3d.nets.backbone``).

PGL pre-trains a 3D ResNet-50 alone (§3.3, "a 3D Conv layer and four stages of 3D residual blocks", 3, 4, 6, 3
blocks) and fine-tunes it inside a decoder-light U-shaped network (§5.1, Appendix B.1, Figure 6): the encoder, an
ASPP module on its deepest map, four up-sampling modules and three skips, 48.54 M parameters of which 2.38 M are
ASPP and decoder. No code was released (``reference/methods.md`` §3.1), and the figures were lost from the text, so
this module rebuilds both from the words (the paper's baselines used the same networks, §5.2).

* ``resnet50_3d``: the encoder alone, for pre-training it and probing it. To be a complete network for the interface
  it has the minimal segmentation head, an FCN-style linear one: a 1×1×1 conv from the deepest map to the classes,
  up-sampled trilinearly to the input size. Its ``decoder`` is a batch norm on the deepest map (MAE's linear-probe
  practice): it puts features of any scale on one footing for the head, and the whole stays affine per voxel, i.e.
  linear. It is there because the interface asks every backbone for an encoder, a decoder and a head, and keeps
  its affine parameters (2 × 2048) because weight transfer measures each part's coverage by its parameters (a
  decoder without any reads as 0 % covered for the methods that transfer the decoder too).
* ``pgl_segnet``: the segmentation network of Figure 6, whose ``encoder.`` parameters are named as ``resnet50_3d``'s,
  so an encoder pre-trained on either loads into the other.

Choices where the paper is silent (each stated once here):

* Encoder: MONAI's 3D ResNet (``monai.networks.nets.resnet.ResNet``, bottleneck blocks, expansion 4): a 7³ stem conv
  of stride 2, a 3³ max-pool of stride 2, then stages of stride 1, 2, 2, 2, so the maps are at strides 2 (stem,
  64 ch), 4, 8, 16, 32 (256, 512, 1024, 2048 ch); batch norm and ReLU; shortcut "B" (1×1×1 conv + BN) without a
  bias, as Hara et al.'s 3D-ResNets and MedicalNet (whose ``resnet_50`` checkpoints load into ``encoder.``
  unchanged). MONAI's global pooling and fully connected layer are left out.
* ASPP (DeepLabv3+, §5.1 "[4]"): "three Conv layers, an image pooling layer, and three SepConv layers" read as a
  1×1×1 conv branch, an image-pooling branch (global average pool → 1×1×1 conv → broadcast), three separable
  branches (depthwise 3³ with dilation 2, 4, 8, then pointwise 1×1×1) and a 1×1×1 projection of the five
  concatenated branches; BN + ReLU after each conv, except the image-pooling conv (bias + ReLU, no BN: its map is
  1³, where batch norm cannot train on a batch of one). No dropout. MONAI's ``SimpleASPP`` has neither separable
  convs nor image pooling, hence the own module (``Convolution`` units are MONAI's).
* Decoder: each of the first three up-sampling modules is a transposed conv (kernel 2, stride 2), summed with the
  encoder map of its resolution (strides 16, 8, 4: the stage maps; the stem is not a skip), then a residual block of
  two separable convs ("SepResConv": relu(x + sep(sep(x)))). The paper names the summation's operands (the encoder
  map and the TransConv's output) but not its place relative to SepResConv: here the block refines the sum. A skip
  whose channels differ from the decoder's is projected by a 1×1×1 conv (no bias). Widths: ASPP 128 and decoder
  256, 64, 32 (the 32 is the paper's), the regular widths that bring ASPP + decoder closest to the paper's 2.38 M:
  2.43 M (+2 %), 48.59 M in all against 48.54 M; the encoder, 46.155 M, is the paper's 48.54 - 2.38 = 46.16 M.
* Last module: a 1×1×1 conv from the 32-channel stride-4 map to the classes (the ``head``) and a parameter-free
  trilinear up-sampling to the input size.
* Sizes: a multiple of 32 along an axis gives every map exactly ``n / stride``. Other sizes are rounded up at each
  stride (padding convolutions), so an up-sampled map can be one cell larger than its skip at the far end: it is
  cropped to the skip. ``forward`` up-samples to exactly the input's size; ``head`` alone up-samples by the stride
  of the map it reads (exact for multiples of that stride) unless given ``size``.

The head's parameters are under ``out.``, not ``head.``: ``head`` is the interface's method, and a sub-module of
that name would be shadowed by it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.resnet import ResNet

from ssl3d.nets.backbone import Backbone, levels
from ssl3d.nets.split import by_prefix

LAYERS = (3, 4, 6, 3)  # ResNet-50 (§3.3)
WIDTHS = (64, 128, 256, 512)  # bottleneck widths; stage outputs are 4× (expansion)
ASPP_CHANNELS = 128
ASPP_DILATIONS = (2, 4, 8)  # §5.1
DECODER_CHANNELS = (256, 64, 32)  # at strides 16, 8, 4; the finest is the paper's 32 (App. B.1)


class ResNet3dEncoder(ResNet):
    """MONAI's 3D bottleneck ResNet returning its pyramid, finest first: the stem (conv + BN + ReLU, stride 2) and
    the four stage outputs (strides 4, 8, 16, 32). Parameter names are MONAI's (``conv1``, ``bn1``, ``layer1..4``)."""

    def __init__(self, in_channels: int = 1, layers: Sequence[int] = LAYERS, widths: Sequence[int] = WIDTHS):
        super().__init__(block="bottleneck", layers=list(layers), block_inplanes=list(widths), spatial_dims=3,
                         n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                         bias_downsample=False, feed_forward=False)
        del self.avgpool  # the pyramid is the output: no global pooling (``fc`` is None with feed_forward=False)
        expansion = 4  # MONAI's ResNetBottleneck.expansion
        self.levels = levels([widths[0], *(expansion * w for w in widths)], [2, 4, 8, 16, 32])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.bn1(self.conv1(x)))
        maps = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps


def upsample(x: torch.Tensor, stride: int, size=None) -> torch.Tensor:
    """Trilinear up-sampling to ``size`` (spatial), or by ``stride`` when no size is given."""
    size = tuple(size) if size is not None else tuple(stride * n for n in x.shape[2:])
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class ResNetBackbone(Backbone, torch.nn.Module):
    """What both PGL networks share: the ResNet encoder under ``encoder.``, a 1×1×1 head conv ``out`` on the finest
    decoded map, up-sampled to the input size; everything else is decoder."""

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("encoder.",), ("out.",))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)

    def head(self, decoded: list[torch.Tensor], size=None) -> torch.Tensor:
        return upsample(self.out(decoded[0]), self.decoder_levels[0].stride[0], size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)), size=x.shape[2:])


class ResNet50Encoder3d(ResNetBackbone):
    """PGL's 3D ResNet-50 encoder alone, with a linear head (module docstring): ``encoder.``, ``decoder.`` (a batch
    norm) and ``out.`` (the head's 1×1×1 conv)."""

    name = "resnet50_3d"
    # (64, 64, 32): the deepest map is 2×2×1, so batch norm trains on a batch of one (at 32³ it would be 1³)
    smallest = {"fields": {"layers": [1, 1, 1, 1], "widths": [4, 4, 8, 8]}, "input": (64, 64, 32)}

    def __init__(self, in_channels: int = 1, out_channels: int = 1, layers: Sequence[int] = LAYERS,
                 widths: Sequence[int] = WIDTHS):
        super().__init__()
        self.encoder = ResNet3dEncoder(in_channels, layers, widths)
        deepest = self.encoder.levels[-1]
        self.decoder = torch.nn.BatchNorm3d(deepest.channels)
        self.out = torch.nn.Conv3d(deepest.channels, out_channels, kernel_size=1)
        self.encoder_levels = self.encoder.levels
        self.decoder_levels = (deepest,)

    @classmethod
    def build(cls, in_channels, out_channels, layers=LAYERS, widths=WIDTHS):
        return cls(in_channels=in_channels, out_channels=out_channels, layers=tuple(layers), widths=tuple(widths))

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        return [self.decoder(features[-1])]


def sep_conv(in_channels: int, out_channels: int, dilation: int = 1, act: bool = True) -> torch.nn.Sequential:
    """3D separable conv: depthwise 3³ (dilated) → pointwise 1×1×1 → BN (→ ReLU)."""
    return torch.nn.Sequential(
        Convolution(3, in_channels, in_channels, kernel_size=3, dilation=dilation, groups=in_channels, bias=False,
                    conv_only=True),
        Convolution(3, in_channels, out_channels, kernel_size=1, bias=False, norm="BATCH", act="RELU" if act else None),
    )


class SepResConv(torch.nn.Module):
    """Residual block of two separable convs: relu(x + sep(sep(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = torch.nn.Sequential(sep_conv(channels, channels), sep_conv(channels, channels, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.convs(x))


class ASPP3d(torch.nn.Module):
    """DeepLabv3+'s ASPP in 3D with separable atrous branches (module docstring)."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        self.conv = Convolution(3, in_channels, channels, kernel_size=1, bias=False, norm="BATCH", act="RELU")
        self.pool = Convolution(3, in_channels, channels, kernel_size=1, norm=None, act="RELU")
        self.atrous = torch.nn.ModuleList(sep_conv(in_channels, channels, d) for d in dilations)
        self.project = Convolution(3, (2 + len(dilations)) * channels, channels, kernel_size=1, bias=False,
                                   norm="BATCH", act="RELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x.mean(dim=(2, 3, 4), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([self.conv(x), pooled, *(branch(x) for branch in self.atrous)], dim=1))


class UpBlock(torch.nn.Module):
    """Transposed conv (×2) + the encoder map of that resolution (projected if its channels differ) → SepResConv."""

    def __init__(self, in_channels: int, skip_channels: int, channels: int):
        super().__init__()
        self.up = torch.nn.ConvTranspose3d(in_channels, channels, kernel_size=2, stride=2)
        self.skip = (torch.nn.Conv3d(skip_channels, channels, kernel_size=1, bias=False)
                     if skip_channels != channels else torch.nn.Identity())
        self.block = SepResConv(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)[(..., *(slice(0, n) for n in skip.shape[2:]))]  # sizes rounded up: crop the far end
        return self.block(up + self.skip(skip))


class PGLSegNet(ResNetBackbone):
    """PGL's segmentation network (Figure 6): ``encoder.`` (3D ResNet-50), ``aspp.`` and ``decoder.`` (the decoder
    part), ``out.`` (the head's 1×1×1 conv). Decoded maps, finest first: strides 4, 8, 16 and the ASPP's 32."""

    name = "pgl_segnet"
    smallest = {"fields": {"layers": [1, 1, 1, 1], "widths": [4, 4, 8, 8], "aspp_channels": 8,
                           "decoder_channels": [8, 8, 4]}, "input": (64, 64, 32)}  # 64×64×32: as resnet50_3d

    def __init__(self, in_channels: int = 1, out_channels: int = 1, layers: Sequence[int] = LAYERS,
                 widths: Sequence[int] = WIDTHS, aspp_channels: int = ASPP_CHANNELS,
                 aspp_dilations: Sequence[int] = ASPP_DILATIONS, decoder_channels: Sequence[int] = DECODER_CHANNELS):
        super().__init__()
        self.encoder = ResNet3dEncoder(in_channels, layers, widths)
        self.encoder_levels = self.encoder.levels
        stem, *stages = self.encoder_levels
        if len(decoder_channels) != 3:
            raise ValueError(f"pgl_segnet: decoder_channels needs 3 widths (strides 16, 8, 4), got {decoder_channels}")
        self.aspp = ASPP3d(stages[-1].channels, aspp_channels, aspp_dilations)
        widths_in = (aspp_channels, *decoder_channels[:-1])
        skips = [level.channels for level in stages[-2::-1]]  # strides 16, 8, 4
        self.decoder = torch.nn.ModuleList(UpBlock(i, s, c) for i, s, c in zip(widths_in, skips, decoder_channels))
        self.out = torch.nn.Conv3d(decoder_channels[-1], out_channels, kernel_size=1)
        self.decoder_levels = levels([*decoder_channels[::-1], aspp_channels], [4, 8, 16, 32])

    @classmethod
    def build(cls, in_channels, out_channels, layers=LAYERS, widths=WIDTHS, aspp_channels=ASPP_CHANNELS,
              aspp_dilations=ASPP_DILATIONS, decoder_channels=DECODER_CHANNELS):
        return cls(in_channels=in_channels, out_channels=out_channels, layers=tuple(layers), widths=tuple(widths),
                   aspp_channels=aspp_channels, aspp_dilations=tuple(aspp_dilations),
                   decoder_channels=tuple(decoder_channels))

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        x = self.aspp(features[-1])
        decoded = [x]
        for block, skip in zip(self.decoder, features[-2:0:-1]):
            x = block(x, skip)
            decoded.insert(0, x)
        return decoded

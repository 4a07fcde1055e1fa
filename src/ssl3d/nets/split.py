"""MONAI's segmentation networks on the backbone interface (``ssl3d.nets.backbone``).

Each class subclasses the MONAI network, so parameter names, and therefore checkpoints, are MONAI's, and only adds
the split forward pass (``encode`` / ``decode`` / ``head``), its pyramid's levels and the part of each parameter;
``tests/test_backbones.py`` checks that each split forward equals MONAI's own.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNETR, BasicUNet, SegResNet, SwinUNETR, UNet

from ssl3d.nets.backbone import INPUT, Backbone, levels


def as_tuple(value):
    """JSON/YAML lists -> tuples (MONAI's layer factories want (name, args) tuples), recursively."""
    return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value


def by_prefix(name: str, encoder: tuple[str, ...], head: tuple[str, ...]) -> str:
    """Classify by name prefix: the encoder's and the head's prefixes; everything else is decoder."""
    if name.startswith(encoder):
        return "encoder"
    return "head" if name.startswith(head) else "decoder"


class SplitUNet(Backbone, UNet):
    """MONAI's UNet. It nests each level as Sequential(down, SkipConnection(next level), up); the innermost level's
    SkipConnection holds the bottleneck. The outermost ``up`` maps the concatenation of the first down map and the
    decoder's finest map to the classes, so it is the head and ``decoded[0]`` is that concatenation (at the first
    down map's stride; the head up-samples it to the input's).

    Capability ``region_decoding``: its decoder reads only the encoder's maps, so HybridMIM's partial region
    prediction runs on it as on HybridMIM's own UNet (the encoder maps cropped to the box, then decoded)."""

    name = "unet"
    capabilities = frozenset({"region_decoding"})
    smallest = {"fields": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}, "input": (32, 32, 32)}

    def __init__(self, channels=(16, 32, 64, 128), strides=(2, 2, 2), **kwargs):
        super().__init__(spatial_dims=3, channels=tuple(channels), strides=tuple(strides), **kwargs)
        down = [math.prod(strides[:i + 1]) for i in range(len(strides))]
        self.encoder_levels = levels(channels, [*down, down[-1]])
        self.decoder_levels = levels([2 * channels[0], *channels[1:-2]], down[:-1])

    @classmethod
    def build(cls, in_channels, out_channels, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1,
              norm="instance", dropout=0.0):
        return cls(in_channels=in_channels, out_channels=out_channels, channels=channels, strides=strides,
                   num_res_units=num_res_units, norm=norm, dropout=dropout)

    @classmethod
    def part(cls, name: str) -> str:
        """Index 0 of a level is encoder, 2 decoder (the outermost: head); the innermost level is encoder."""
        rest, depth = name.removeprefix("model."), 0
        while rest.startswith("1.submodule."):
            rest, depth = rest.removeprefix("1.submodule."), depth + 1
        if rest.startswith("2."):
            return "head" if depth == 0 else "decoder"
        return "encoder"

    def stages(self) -> tuple[list[tuple[torch.nn.Module, torch.nn.Module]], torch.nn.Module]:
        """(down, up) of each level, outermost first, and the bottleneck."""
        blocks, level = [], self.model
        while isinstance(level, torch.nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
            blocks.append((level[0], level[2]))
            level = level[1].submodule
        return blocks, level

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        blocks, bottom = self.stages()
        features = []
        for down, _ in blocks:
            x = down(x)
            features.append(x)
        return [*features, bottom(x)]

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        """Each level's up layer on [its down map, the deeper decoder map], as MONAI's SkipConnection; with
        ``region``, on the box of every map (:meth:`crop_to_region`)."""
        features = self.crop_to_region(features, region)
        x, decoded = features[-1], []
        for (_, up), skip in zip(self.stages()[0][:0:-1], features[-2:0:-1]):
            x = up(torch.cat([skip, x], dim=1))
            decoded.insert(0, x)
        return [torch.cat([features[0], decoded[0]], dim=1), *decoded[1:]]

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.model[2](decoded[0])


class SplitBasicUNet(Backbone, BasicUNet):
    """MONAI's BasicUNet: x0 (full resolution) .. x4 (1/16) down, four UpCats back up, a 1³ conv head."""

    name = "basicunet"
    smallest = {"fields": {"features": [4, 4, 8, 8, 16, 4]}, "input": (32, 32, 32)}

    def __init__(self, features=(32, 32, 64, 128, 256, 32), **kwargs):
        super().__init__(spatial_dims=3, features=tuple(features), **kwargs)
        self.encoder_levels = levels(features[:5], [1, 2, 4, 8, 16])
        self.decoder_levels = levels([features[5], *features[1:4]], [1, 2, 4, 8])

    @classmethod
    def build(cls, in_channels, out_channels, features=(32, 32, 64, 128, 256, 32),
              norm=("instance", {"affine": True}), dropout=0.0):
        return cls(in_channels=in_channels, out_channels=out_channels, features=features, norm=as_tuple(norm),
                   dropout=dropout)

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("conv_0.", "down_"), ("final_conv.",))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.conv_0(x)]
        for down in (self.down_1, self.down_2, self.down_3, self.down_4):
            features.append(down(features[-1]))
        return features

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        x0, x1, x2, x3, x4 = features
        u3 = self.upcat_4(x4, x3)
        u2 = self.upcat_3(u3, x2)
        u1 = self.upcat_2(u2, x1)
        return [self.upcat_1(u1, x0), u1, u2, u3]

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.final_conv(decoded[0])


class SplitSegResNet(Backbone, SegResNet):
    """MONAI's SegResNet. MONAI's own ``encode`` returns ``(bottleneck, skips)`` and its ``decode`` includes the
    output block; here ``encode`` gives every down layer's output, ``decode`` every up layer's, and ``head`` is
    ``conv_final`` (norm → act → 1³ conv, of which only the conv depends on the number of classes)."""

    name = "segresnet"
    smallest = {"fields": {"init_filters": 4, "blocks_down": [1, 1, 2], "blocks_up": [1, 1],
                           "norm": ["GROUP", {"num_groups": 2}]}, "input": (32, 32, 32)}

    def __init__(self, **kwargs):
        super().__init__(spatial_dims=3, **kwargs)
        n = len(self.blocks_down)
        self.encoder_levels = levels([self.init_filters * 2 ** i for i in range(n)], [2 ** i for i in range(n)])
        self.decoder_levels = self.encoder_levels[:len(self.blocks_up)]

    @classmethod
    def build(cls, in_channels, out_channels, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
              dropout_prob=None, norm=("GROUP", {"num_groups": 8}), act=("RELU", {"inplace": True}),
              upsample_mode="nontrainable"):
        return cls(in_channels=in_channels, out_channels=out_channels, init_filters=init_filters,
                   blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), dropout_prob=dropout_prob,
                   norm=as_tuple(norm), act=as_tuple(act), upsample_mode=upsample_mode)

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("convInit.", "down_layers."), ("conv_final.2.",))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.convInit(x)
        if self.dropout_prob is not None:
            x = self.dropout(x)
        features = []
        for down in self.down_layers:
            x = down(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        x, decoded = features[-1], []
        for up, upl, skip in zip(self.up_samples, self.up_layers, features[-2::-1]):
            x = upl(up(x) + skip)
            decoded.insert(0, x)
        return decoded

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_final(decoded[0]) if self.use_conv_final else decoded[0]


class SplitUNETR(Backbone, UNETR):
    """MONAI's UNETR: ``encoder1`` on the input, ``encoder2..4`` on the ViT's hidden states 3, 6, 9 (upsampled to
    1/2, 1/4, 1/8 of the input) and the ViT's final normed tokens as the 1/16 bottleneck, as MONAI's forward.
    Every input must have exactly ``img_size`` (its position embedding is sized for it)."""

    name = "unetr"
    smallest = {"fields": {"img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48, "mlp_dim": 96,
                           "num_heads": 4}, "input": (32, 32, 32)}

    def __init__(self, feature_size: int = 16, hidden_size: int = 768, **kwargs):
        super().__init__(feature_size=feature_size, hidden_size=hidden_size, spatial_dims=3, **kwargs)
        f = feature_size
        self.encoder_levels = levels([f, 2 * f, 4 * f, 8 * f, hidden_size], [1, 2, 4, 8, 16])
        self.decoder_levels = self.encoder_levels[:4]

    @classmethod
    def build(cls, in_channels, out_channels, img_size, feature_size=16, hidden_size=768, mlp_dim=3072,
              num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.0, qkv_bias=False,
              res_block=True, conv_block=True):
        """``img_size`` (required) is the training patch size; inference slides a window of that size."""
        return cls(in_channels=in_channels, out_channels=out_channels, img_size=as_tuple(img_size),
                   feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                   proj_type=proj_type, norm_name=as_tuple(norm_name), dropout_rate=dropout_rate,
                   qkv_bias=qkv_bias, res_block=res_block, conv_block=conv_block)

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("vit.", "encoder"), ("out.",))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens, hidden = self.vit(x)
        return [self.encoder1(x), self.encoder2(self.proj_feat(hidden[3])), self.encoder3(self.proj_feat(hidden[6])),
                self.encoder4(self.proj_feat(hidden[9])), self.proj_feat(tokens)]

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        enc1, enc2, enc3, enc4, bottleneck = features
        d3 = self.decoder5(bottleneck, enc4)
        d2 = self.decoder4(d3, enc3)
        d1 = self.decoder3(d2, enc2)
        return [self.decoder2(d1, enc1), d1, d2, d3]

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.out(decoded[0])


class SplitSwinUNETR(Backbone, SwinUNETR):
    """MONAI's SwinUNETR (input sizes divisible by 32; MONAI >= 1.5 takes no ``img_size``).

    ``encode`` returns what MONAI's forward feeds the decoder, finest first: ``encoder1(x)`` (full resolution),
    ``encoder2..4`` of the (layer-normed, if ``normalize``) Swin hidden states 0-2 (1/2, 1/4, 1/8), hidden state 3
    itself (1/16; MONAI's decoder5 takes it as a skip without a conv block) and ``encoder10`` of hidden state 4
    (1/32, the bottleneck). So the encoder is ``swinViT`` + ``encoder1..4`` + ``encoder10``.

    Capability ``hidden_states``: Swin pre-training heads (SwinUNETR SSL, HybridMIM's Swin variant) read the raw
    stage outputs, :meth:`hidden_states`. ``encode(x, hidden, region)`` reuses them, and with ``region`` (start,
    stop) in bottleneck cells crops the input and every hidden state to that box before ``encoder1..4`` and
    ``encoder10`` (HybridMIM's partial region decoding, ``reference/methods.md`` §2.3, as the official
    ``Pretrain/pretrain_models/swinunetr.py``): the blocks and the decoder then run on the box only and ``decode``
    of the result covers :meth:`voxel_region`. (Cropping the blocks' outputs instead would change every value of
    the box, through their instance-norm statistics and the zero padding at its edge.)
    """

    name = "swinunetr"
    capabilities = frozenset({"hidden_states"})
    smallest = {"fields": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "drop_rate": 0.1},
                "input": (64, 64, 64)}  # at 32³ the 1³ bottleneck breaks instance norm in training

    def __init__(self, feature_size: int = 48, **kwargs):
        super().__init__(feature_size=feature_size, spatial_dims=3, **kwargs)
        f = feature_size
        self.encoder_levels = levels([f, f, 2 * f, 4 * f, 8 * f, 16 * f], [1, 2, 4, 8, 16, 32])
        self.decoder_levels = self.encoder_levels[:5]
        self.hidden_levels = levels([f, 2 * f, 4 * f, 8 * f, 16 * f], [2, 4, 8, 16, 32])

    @classmethod
    def build(cls, in_channels, out_channels, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
              window_size=7, drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, norm_name="instance",
              normalize=True, use_checkpoint=False, use_v2=False, **unknown):
        if "img_size" in unknown:
            raise TypeError("swinunetr takes no 'img_size' (MONAI >= 1.5 SwinUNETR accepts any size divisible by 32)")
        if unknown:
            raise TypeError(f"swinunetr got an unexpected keyword argument {next(iter(unknown))!r}")
        return cls(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                   depths=tuple(depths), num_heads=tuple(num_heads), window_size=as_tuple(window_size),
                   drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, dropout_path_rate=dropout_path_rate,
                   norm_name=as_tuple(norm_name), normalize=normalize, use_checkpoint=use_checkpoint, use_v2=use_v2)

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ("swinViT.", "encoder"), ("out.",))  # encoder1..4 and encoder10

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five Swin stage outputs (1/2 .. 1/32 of the input; 1, 2, 4, 8, 16 × feature_size channels), normed
        as MONAI's forward does."""
        # MONAI's forward checks this with numpy (``_check_input_size``), which torch.compile cannot trace
        if any(size % self.patch_size ** 5 for size in x.shape[2:]):
            raise ValueError(f"swinunetr needs spatial sizes divisible by {self.patch_size ** 5}, got "
                             f"{tuple(x.shape[2:])}")
        return self.swinViT(x, self.normalize)

    def encode(self, x: torch.Tensor, hidden: list[torch.Tensor] | None = None, region: tuple | None = None
               ) -> list[torch.Tensor]:
        """The decoder's inputs from the input and its hidden states (computed unless given); with ``region``,
        only on that box of each (class docstring)."""
        hidden = self.hidden_states(x) if hidden is None else hidden
        inputs = self.crop_to_region([x, *hidden], region, (INPUT, *self.hidden_levels))
        x, h0, h1, h2, h3, h4 = inputs
        return [self.encoder1(x), self.encoder2(h0), self.encoder3(h1), self.encoder4(h2), h3, self.encoder10(h4)]

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        enc0, enc1, enc2, enc3, hidden3, bottleneck = features
        d3 = self.decoder5(bottleneck, hidden3)
        d2 = self.decoder4(d3, enc3)
        d1 = self.decoder3(d2, enc2)
        d0 = self.decoder2(d1, enc1)
        return [self.decoder1(d0, enc0), d0, d1, d2, d3]

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.out(decoded[0])

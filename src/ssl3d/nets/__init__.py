"""Segmentation backbones, built from MONAI by name and a few sizing fields from the config.

Every backbone is a MONAI network (or, for Models Genesis, its official 3D UNet); this module maps config fields
onto constructor arguments, so a config names a backbone and its size and the results table calls it by that
name. Pre-training methods need the encoder's feature maps and need to know which parameters are encoder, decoder
or output head (to transfer only what a method trained, and to report how much of a downstream network a
checkpoint initialises): every backbone but ``genesis_unet3d`` exposes ``encode`` (the encoder's feature maps,
shallow to deep) and ``encoder_channels``, and ``parameter_part`` classifies parameter names for every backbone.

Backbones: ``unet``, ``basicunet`` (MONAI), ``segresnet``, ``unetr``, ``swinunetr`` (MONAI, for the supervised
rows of the papers' tables), ``genesis_unet3d`` (Models Genesis' UNet) and ``hybridmim_unet`` (HybridMIM's UNet,
``ssl3d.nets.hybridmim_unet``). The encoder of each is exactly the parameters its ``encode`` pass uses and the head
exactly the parameters whose shape depends on the number of classes (``tests/test_nets.py``,
``tests/test_backbones.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNETR, BasicUNet, SegResNet, SwinUNETR, UNet

from ssl3d.nets.genesis import UNet3D, encoder_decoder_parts
from ssl3d.nets.hybridmim_unet import OFFICIAL_FEATURES, OFFICIAL_POOL_SIZES, HybridMIMUNet


class SplitBasicUNet(BasicUNet):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


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


class SplitSegResNet(SegResNet):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


class SplitUNETR(UNETR):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


class SplitSwinUNETR(SwinUNETR):
    """MONAI's SwinUNETR with an ``encode`` pass (same parameter names).

    ``encode`` returns what MONAI's forward feeds the decoder, shallow to deep: ``encoder1(x)`` (full resolution),
    ``encoder2..4`` of the (layer-normed, if ``normalize``) Swin hidden states 0-2 (1/2, 1/4, 1/8), hidden state 3
    itself (1/16; MONAI's decoder5 takes it as a skip without a conv block) and ``encoder10`` of hidden state 4
    (1/32, the bottleneck). So the encoder is ``swinViT`` + ``encoder1..4`` + ``encoder10``. Swin pre-training
    heads (SwinUNETR SSL, HybridMIM's Swin variant) read the raw last hidden state instead: ``hidden_states``."""

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
        hidden = self.hidden_states(x)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        enc0, enc1, enc2, enc3, hidden3, bottleneck = features
        x = self.decoder5(bottleneck, hidden3)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        x = self.decoder2(x, enc1)
        return self.decoder1(x, enc0)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.out(decoded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


def _tuple(value):
    """JSON/YAML lists -> tuples (MONAI's layer factories want (name, args) tuples), recursively."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _unet(in_channels: int, out_channels: int, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1,
          norm="instance", dropout=0.0) -> torch.nn.Module:
    return SplitUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
                     strides=tuple(strides), num_res_units=num_res_units, norm=norm, dropout=dropout)


def _basicunet(in_channels: int, out_channels: int, features=(32, 32, 64, 128, 256, 32),
               norm=("instance", {"affine": True}), dropout=0.0) -> torch.nn.Module:
    return SplitBasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=features,
                          norm=norm, dropout=dropout)


def _genesis_unet3d(in_channels: int, out_channels: int, batch_stats_at_eval: bool = True) -> torch.nn.Module:
    """Models Genesis' own 3D UNet, giving logits (the sigmoid of its restoration task is the method's)."""
    return UNet3D(n_class=out_channels, sigmoid_output=False, batch_stats_at_eval=batch_stats_at_eval,
                  in_channels=in_channels)


def _segresnet(in_channels: int, out_channels: int, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
               dropout_prob=None, norm=("GROUP", {"num_groups": 8}), act=("RELU", {"inplace": True}),
               upsample_mode="nontrainable") -> torch.nn.Module:
    return SplitSegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                          init_filters=init_filters, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                          dropout_prob=dropout_prob, norm=_tuple(norm), act=_tuple(act), upsample_mode=upsample_mode)


def _unetr(in_channels: int, out_channels: int, img_size, feature_size=16, hidden_size=768, mlp_dim=3072,
           num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.0, qkv_bias=False,
           res_block=True, conv_block=True) -> torch.nn.Module:
    """``img_size`` (required) is the training patch size: UNETR's position embedding is sized for it and every
    input must have exactly that size (inference by sliding window with roi_size = img_size)."""
    return SplitUNETR(in_channels=in_channels, out_channels=out_channels, img_size=_tuple(img_size),
                      feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                      proj_type=proj_type, norm_name=_tuple(norm_name), dropout_rate=dropout_rate,
                      qkv_bias=qkv_bias, res_block=res_block, conv_block=conv_block, spatial_dims=3)


def _swinunetr(in_channels: int, out_channels: int, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
               window_size=7, drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, norm_name="instance",
               normalize=True, use_checkpoint=False, use_v2=False, **unknown) -> torch.nn.Module:
    """Input sizes must be divisible by 32. MONAI >= 1.5 takes no ``img_size`` (any such size works)."""
    if "img_size" in unknown:
        raise TypeError("swinunetr takes no 'img_size' (MONAI >= 1.5 SwinUNETR accepts any size divisible by 32)")
    if unknown:
        raise TypeError(f"_swinunetr() got an unexpected keyword argument {next(iter(unknown))!r}")
    return SplitSwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                          depths=tuple(depths), num_heads=tuple(num_heads), window_size=_tuple(window_size),
                          drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, dropout_path_rate=dropout_path_rate,
                          norm_name=_tuple(norm_name), normalize=normalize, use_checkpoint=use_checkpoint,
                          use_v2=use_v2, spatial_dims=3)


def _hybridmim_unet(in_channels: int, out_channels: int, features=OFFICIAL_FEATURES, dropout=0.1,
                    pool_sizes=OFFICIAL_POOL_SIZES) -> torch.nn.Module:
    """HybridMIM's official UNet (``DeepUNet``): 96³ → bottleneck 512 × 12³ with the default pool sizes."""
    return HybridMIMUNet(in_channels=in_channels, out_channels=out_channels, features=features, dropout=dropout,
                         pool_sizes=pool_sizes)


BACKBONES: dict[str, Callable[..., torch.nn.Module]] = {"unet": _unet, "basicunet": _basicunet,
                                                         "genesis_unet3d": _genesis_unet3d, "segresnet": _segresnet,
                                                         "unetr": _unetr, "swinunetr": _swinunetr,
                                                         "hybridmim_unet": _hybridmim_unet}


def build_network(spec: dict, in_channels: int, out_channels: int) -> torch.nn.Module:
    """``spec`` is the config's backbone entry: ``{"name": ..., <constructor fields>}``."""
    fields = dict(spec)
    name = fields.pop("name")
    if name not in BACKBONES:
        raise ValueError(f"backbone.name: unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](in_channels, out_channels, **fields)
    except TypeError as err:
        raise ValueError(f"backbone {name!r}: {err}") from err


def _unet_part(name: str) -> str:
    """MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up): index 0 is encoder, 2 is
    decoder; the innermost level is the bottleneck (encoder); the outermost up layer holds the output conv."""
    rest = name.removeprefix("model.")
    depth = 0
    while rest.startswith("1.submodule."):
        rest = rest.removeprefix("1.submodule.")
        depth += 1
    if rest.startswith("0."):
        return "encoder"
    if rest.startswith("2."):
        return "head" if depth == 0 else "decoder"
    return "encoder"


def _basicunet_part(name: str) -> str:
    if name.startswith(("conv_0.", "down_")):
        return "encoder"
    if name.startswith("upcat_"):
        return "decoder"
    return "head"


def _segresnet_part(name: str) -> str:
    """``conv_final`` is norm → act → 1³ conv: only its conv (``conv_final.2``) depends on the number of classes, so
    only that is the head; its norm is the decoder's last layer."""
    if name.startswith(("convInit.", "down_layers.")):
        return "encoder"
    if name.startswith("conv_final.2."):
        return "head"
    return "decoder"


def _unetr_part(name: str) -> str:
    if name.startswith(("vit.", "encoder")):
        return "encoder"
    if name.startswith("out."):
        return "head"
    return "decoder"


def _swinunetr_part(name: str) -> str:
    if name.startswith(("swinViT.", "encoder")):  # encoder1..4, encoder10
        return "encoder"
    if name.startswith("out."):
        return "head"
    return "decoder"


PARTS: dict[str, Callable[[str], str]] = {"unet": _unet_part, "basicunet": _basicunet_part,
                                          "genesis_unet3d": encoder_decoder_parts, "segresnet": _segresnet_part,
                                          "unetr": _unetr_part, "swinunetr": _swinunetr_part,
                                          "hybridmim_unet": _basicunet_part}


def parameter_part(backbone: str, name: str) -> str:
    """'encoder', 'decoder' or 'head' for a parameter name of a downstream network of that backbone."""
    return PARTS[backbone](name)


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image, roi_size, overlap: float, sw_batch_size: int,
                   device: torch.device):
    """Label map (X, Y, Z) for a whole (1, X, Y, Z) volume by MONAI's Gaussian-weighted sliding window."""
    model.eval()
    batch = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    logits = sliding_window_inference(batch, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian")
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()

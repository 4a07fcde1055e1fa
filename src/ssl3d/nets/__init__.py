"""Segmentation backbones, built from MONAI by name and a few sizing fields from the config.

Every backbone is a MONAI network (or, for Models Genesis, its official 3D UNet); this module maps config fields
onto constructor arguments, so a config names a backbone and its size and the results table calls it by that
name. Pre-training methods need the encoder's feature maps and need to know which parameters are encoder, decoder
or output head (to transfer only what a method trained, and to report how much of a downstream network a
checkpoint initialises): ``unet`` and ``basicunet`` expose ``encode`` and ``encoder_channels``, and
``parameter_part`` classifies parameter names for every backbone.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, UNet

from ssl3d.nets.genesis import UNet3D, encoder_decoder_parts


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


BACKBONES: dict[str, Callable[..., torch.nn.Module]] = {"unet": _unet, "basicunet": _basicunet,
                                                         "genesis_unet3d": _genesis_unet3d}


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


PARTS: dict[str, Callable[[str], str]] = {"unet": _unet_part, "basicunet": _basicunet_part,
                                          "genesis_unet3d": encoder_decoder_parts}


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

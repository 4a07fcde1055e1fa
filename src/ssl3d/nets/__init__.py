"""Segmentation backbones, built from MONAI by name and a few sizing fields from the config.

Every backbone is a MONAI network; this module only maps config fields onto constructor arguments so a config
names a backbone and its size, and the name is what the results table calls it.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet


def _unet(in_channels: int, out_channels: int, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1,
          norm="instance", dropout=0.0) -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units, norm=norm, dropout=dropout)


BACKBONES: dict[str, Callable[..., torch.nn.Module]] = {"unet": _unet}


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


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image, roi_size, overlap: float, sw_batch_size: int,
                   device: torch.device):
    """Label map (X, Y, Z) for a whole (1, X, Y, Z) volume by MONAI's Gaussian-weighted sliding window."""
    model.eval()
    batch = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    logits = sliding_window_inference(batch, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian")
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()

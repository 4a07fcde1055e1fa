"""Segmentation backbones by name: the registry of every network behind the backbone interface.

Every backbone implements ``ssl3d.nets.backbone.Backbone`` (encoder and decoder feature pyramids with their
channels and strides, a head, the part of each parameter, optional capabilities), so methods and protocols read a
network's pyramid and never its name. Adding a backbone is one file holding its class and one line here;
``tests/test_backbone_contract.py`` then checks it, and ``ssl3d methods`` shows which methods run on it.

Backbones: ``unet`` (MONAI's, with ``region_decoding``), ``basicunet``, ``segresnet``, ``unetr``, ``swinunetr``
(MONAI's, for the supervised rows of the papers' tables; the last offers ``hidden_states``), ``genesis_unet3d``
(Models Genesis' UNet), ``hybridmim_unet`` (HybridMIM's UNet, with ``region_decoding``), ``resnet50_3d`` (PGL's
3D ResNet-50 encoder with a linear head), ``pgl_segnet`` (PGL's ResNet-50 + ASPP + light decoder segmentation
network) and ``fpn3d`` (vox2vec's / hierarchical dense SSL's FPN3d with its linear or non-linear FPN head).
"""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference

from ssl3d.nets.backbone import Backbone
from ssl3d.nets.fpn import FPN3dBackbone
from ssl3d.nets.genesis import UNet3D
from ssl3d.nets.hybridmim_unet import HybridMIMUNet
from ssl3d.nets.resnet import PGLSegNet, ResNet50Encoder3d
from ssl3d.nets.split import SplitBasicUNet, SplitSegResNet, SplitSwinUNETR, SplitUNet, SplitUNETR

BACKBONES: dict[str, type[Backbone]] = {cls.name: cls for cls in (
    SplitUNet,
    SplitBasicUNet,
    SplitSegResNet,
    SplitUNETR,
    SplitSwinUNETR,
    UNet3D,
    HybridMIMUNet,
    ResNet50Encoder3d,
    PGLSegNet,
    FPN3dBackbone,
)}


def backbone_class(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ValueError(f"backbone.name: unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def build_network(spec: dict, in_channels: int, out_channels: int) -> Backbone:
    """``spec`` is the config's backbone entry: ``{"name": ..., <constructor fields>}``."""
    fields = dict(spec)
    cls = backbone_class(fields.pop("name"))
    try:
        return cls.build(in_channels, out_channels, **fields)
    except TypeError as err:
        raise ValueError(f"backbone {cls.name!r}: {err}") from err


def parameter_part(backbone: str, name: str) -> str:
    """'encoder', 'decoder' or 'head' for a parameter name of a downstream network of that backbone."""
    return backbone_class(backbone).part(name)


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image, roi_size, overlap: float, sw_batch_size: int,
                   device: torch.device):
    """Label map (X, Y, Z) for a whole (1, X, Y, Z) volume by MONAI's Gaussian-weighted sliding window."""
    model.eval()
    batch = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    logits = sliding_window_inference(batch, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian")
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()

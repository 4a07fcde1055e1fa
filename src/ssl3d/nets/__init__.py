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

from ssl3d.nets.genesis import UNet3D, encoder_decoder_parts
from ssl3d.nets.hybridmim_unet import OFFICIAL_FEATURES, OFFICIAL_POOL_SIZES, HybridMIMUNet
from ssl3d.nets.split import SplitBasicUNet, SplitSegResNet, SplitSwinUNETR, SplitUNet, SplitUNETR


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


def _by_prefix(encoder: tuple[str, ...], head: tuple[str, ...]) -> Callable[[str], str]:
    """Classify by name prefix: the encoder's and the head's prefixes; everything else is decoder."""

    def part(name: str) -> str:
        if name.startswith(encoder):
            return "encoder"
        return "head" if name.startswith(head) else "decoder"

    return part


_BASICUNET_PARTS = _by_prefix(("conv_0.", "down_"), ("final_conv.",))
PARTS: dict[str, Callable[[str], str]] = {
    "unet": _unet_part,
    "basicunet": _BASICUNET_PARTS,
    "hybridmim_unet": _BASICUNET_PARTS,
    # SegResNet's conv_final is norm -> act -> 1^3 conv: only the conv depends on the number of classes
    "segresnet": _by_prefix(("convInit.", "down_layers."), ("conv_final.2.",)),
    "unetr": _by_prefix(("vit.", "encoder"), ("out.",)),
    "swinunetr": _by_prefix(("swinViT.", "encoder"), ("out.",)),  # encoder1..4 and encoder10
    "genesis_unet3d": encoder_decoder_parts,
}


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

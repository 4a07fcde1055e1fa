"""SwinUNETR self-supervised pre-training (Tang et al., CVPR 2022): in-painting, rotation and contrastive coding.

Each crop gives two views: the crop rotated by k·90° (k uniform in 0..3), then corrupted by boxes of noise. The
Swin transformer encodes both views, and from its bottleneck (16·feature_size channels, 1/32 of the input) it
learns to
- predict the rotation (4-way cross-entropy; a linear head on bottleneck token 0),
- tell the two views of its crop from the other crops of the batch (NT-Xent, tau 0.5, MONAI's ContrastiveLoss,
  numerically the official ``Contrast``, methods.md §1.1; a linear head to 512 on bottleneck token 1),
- restore the rotated, uncorrupted crop (L1) through a light decoder of five [3³ conv -> instance norm -> leaky
  ReLU -> trilinear x2] stages and a 1³ conv, with no output activation.
The three terms have weight 1. Only the Swin transformer (``swinViT``) initialises the downstream SwinUNETR, as in
the official fine-tuning (``--use_ssl_pretrained`` loads ``model_swinvit.pt`` with ``strict=False``,
``SwinUNETR/BTCV/main.py`` L144-161).

Sources (``Project-MONAI/research-contributions`` @ 21ed8e57c725, ``SwinUNETR/Pretrain``; methods.md §8.1):
- heads: ``models/ssl_head.py`` L40-77 (rotation ``Linear(768, 4)``, contrastive ``Linear(768, 512)``, the "vae"
  decoder), forward L79-91: token 0 / token 1 of the raster-flattened last hidden state, which is layer-normed
  (``swinViT(x)`` with MONAI's default ``normalize=True``; here the backbone's ``normalize``, default True).
- views: ``utils/ops.py`` ``rot_rand`` L46-64, ``patch_rand_drop`` L17-43 (boxes with sides in [5%, 25%) of each
  dimension, start anywhere up to 5% from the far edge, clipped to the crop, filled with Gaussian noise min-max
  scaled to [0, 1], drawn until their summed volume reaches a U(0, 0.3) fraction of the crop), ``aug_rand``
  L67-75; the training step ``main.py`` L41-55 (reconstruction target = the rotated crop before corruption).
- loss: ``losses/loss.py`` ``Loss`` L37-53 (CE + NT-Xent + L1, all weights 1).
- defaults: 96³ crops (``main.py`` L171-173); AdamW lr 4e-4, weight decay 0.1 (L176-177, L230-231); 500 warm-up
  steps then cosine over 100 k steps (L156, L158, L245, ``WarmupCosineSchedule``), as a fraction of the run here.
  The README's 8-GPU recipe uses lr 6e-6 (README L55-56): set ``optimizer.lr`` to follow it. No gradient clipping:
  ``--grad_clip`` is off by default and only reached without AMP, which is on by default (L58-66). Batch 2: the
  contrastive batch of the README recipe (``--batch_size=1`` x ``sw_batch_size`` 2 crops per GPU, no all-gather;
  L174-175, L254); the code default is 2 x 2 = 4 crops.

Switches:
- ``rotation_plane``: ``xy`` (default, the paper: rotations "along the z-axis") or ``yz`` (the official
  ``rot_rand`` rotates tensor dims (2, 3) of a (C, X, Y, Z) RAS sample, i.e. about the left-right X axis). With CT
  that is not resampled (the official pipeline is not), ``yz`` swaps an in-plane axis with the slice axis, so
  voxel anisotropy alone tells 90° and 270° from 0° and 180°.
- ``cutmix`` (default True, the official code; the paper describes the in-painting cutout only): after its noise
  boxes, each view of crop i gets further boxes pasted from the same view of a crop j drawn uniformly from the
  batch, unless j = i.

Deviations:
- Views are made per crop in the data loader, but the cut-mix needs the batch. Its boxes (``mix_mask``) and the
  partner draw (``partner``, uniform in [0, 1), j = floor(partner * B)) are drawn in the loader from the crop's
  generator, and :func:`paste_from_partners` pastes in ``loss_terms``, replaying the official in-place loop: a
  partner earlier in the batch lends its finished view, a later one its clean rotated crop.
- The suite's loader cuts each crop from a randomly drawn volume; the official loader cuts the 2 crops of a GPU
  batch from the same scan (``RandSpatialCropSamplesd``, ``num_samples=sw_batch_size``), so they are each
  other's negatives.
- The whole downstream SwinUNETR is built (so that parameter names and the input-size check are the downstream
  network's), but only ``swinViT`` is used, trained and transferred; the CNN encoder blocks, the decoder and the
  output convolution stay at their initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.losses import nt_xent
from ssl3d.pretrain.method import Method, MethodConfig, Transfer

ROTATION_AXES = {"xy": (1, 2), "yz": (2, 3)}  # axes of a (1, X, Y, Z) crop


@dataclass
class SwinUNETRSSLConfig(MethodConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "rotation": 1.0, "contrastive": 1.0, "reconstruction": 1.0})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 4e-4, "weight_decay": 0.1})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_fraction": 500 / 100_000})
    rotation_plane: str = "xy"
    cutmix: bool = True
    contrast_dim: int = 512

    def __post_init__(self):
        if self.rotation_plane not in ROTATION_AXES:
            raise ValueError(f"swinunetr_ssl.rotation_plane: {self.rotation_plane!r} is not one of "
                             f"{tuple(ROTATION_AXES)}")


def random_boxes(shape, rng: np.random.Generator, max_drop: float = 0.3,
                 box_sides: tuple[float, float] = (0.05, 0.25)) -> list[tuple[slice, ...]]:
    """Boxes as the official ``patch_rand_drop`` draws them, as slices of a volume of spatial ``shape``.

    A coverage goal ``U(0, max_drop)·N`` voxels; then boxes until their summed volume (overlaps counted twice)
    reaches it: per axis of size n, start uniform in ``[0, n − ⌊low·n⌋)``, side uniform in
    ``[⌊low·n⌋, ⌊high·n⌋)``, clipped at the far edge. The union therefore covers less than ``max_drop`` plus one
    box of the crop.
    """
    shape = np.asarray(shape)
    goal = rng.uniform(0, max_drop) * shape.prod()
    low, high = (np.floor(fraction * shape).astype(int) for fraction in box_sides)
    boxes, covered = [], 0
    while covered < goal:
        start = rng.integers(0, shape - low)
        stop = np.minimum(start + rng.integers(low, high), shape)
        boxes.append(tuple(slice(int(a), int(b)) for a, b in zip(start, stop)))
        covered += int(np.prod(stop - start))
    return boxes


def paint_noise(view: np.ndarray, boxes: list[tuple[slice, ...]], rng: np.random.Generator) -> np.ndarray:
    """A copy of the (C, X, Y, Z) ``view`` with each box, in turn, filled with Gaussian noise min-max scaled to
    [0, 1] over the box (the official in-painting; crops are intensities in [0, 1])."""
    out = view.copy()
    for box in boxes:
        region = (slice(None), *box)
        noise = rng.standard_normal(out[region].shape)
        out[region] = (noise - noise.min()) / (noise.max() - noise.min())
    return out


def box_mask(shape, boxes: list[tuple[slice, ...]]) -> np.ndarray:
    """The union of ``boxes`` as a boolean (1, X, Y, Z) mask of spatial ``shape``."""
    mask = np.zeros((1, *shape), dtype=bool)
    for box in boxes:
        mask[(slice(None), *box)] = True
    return mask


def paste_from_partners(corrupted: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                        partner: torch.Tensor) -> torch.Tensor:
    """The cut-mix half of the official ``aug_rand`` on one view of a batch (B, C, X, Y, Z).

    Crop i takes the voxels under its ``mask`` from crop ``j = ⌊partner_i · B⌋`` unless j = i. The official loop
    augments the batch in place in order, so a partner j < i lends its finished view (noise and cut-mix) and a
    partner j > i its clean rotated crop; this replays that order, with the partners as tensors (no host sync, so
    torch.compile traces it whole).
    """
    size = corrupted.shape[0]
    partners = (partner * size).long().clamp(0, size - 1)
    mixed = corrupted.clone()
    for i in range(size):
        j = partners[i:i + 1]
        source = torch.where(j < i, mixed.index_select(0, j), clean.index_select(0, j))[0]
        mixed[i] = torch.where(mask[i].bool() & (j != i), source, corrupted[i])
    return mixed


def reconstruction_decoder(channels: int, out_channels: int = 1) -> torch.nn.Sequential:
    """The official "vae" decoder: five [3³ conv -> instance norm -> leaky ReLU -> trilinear x2] stages halving the
    channels (the last keeps them) and a 1³ conv, with no output activation: 1/32 resolution back to full."""
    widths = [channels, channels // 2, channels // 4, channels // 8, channels // 16, channels // 16]
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [Convolution(3, c_in, c_out, kernel_size=3, norm="instance", act="leakyrelu"),
                   UpSample(3, scale_factor=2, mode="nontrainable", interp_mode="trilinear", align_corners=False)]
    layers.append(Convolution(3, widths[-1], out_channels, kernel_size=1, conv_only=True))
    return torch.nn.Sequential(*layers)


def by_view(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) -> (2B, ...): every crop's first view, then every crop's second view (the official order)."""
    return x.transpose(0, 1).flatten(end_dim=1)


class SwinUNETRSSL(Method):
    name = "swinunetr_ssl"
    display_name = "SwinUNETR SSL"
    paper = ("Tang et al., Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis, "
             "CVPR 2022")
    requires = ("hidden_states",)
    probe_features = "encoder"  # only the encoder is trained and transferred
    Config = SwinUNETRSSLConfig
    # swinViT is 14.2% of the SwinUNETR encoder (swinViT + encoder1..4 + encoder10) at feature_size 12, depths
    # [1, 1, 1, 1]; 14.0% at feature_size 48 with those depths and 18.9% with the default depths [2, 2, 2, 2]:
    # encoder10's two 3³ convolutions at 16·feature_size channels dominate.
    transfer = Transfer(prefixes={"network.swinViT.": "swinViT."}, parts=("encoder",), coverage={"encoder": 0.13})

    def __init__(self, config: SwinUNETRSSLConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        axes = ROTATION_AXES[config.rotation_plane]
        if config.patch_size[axes[0] - 1] != config.patch_size[axes[1] - 1]:
            raise ValueError(f"swinunetr_ssl: patch_size {tuple(config.patch_size)} must be square in the "
                             f"{config.rotation_plane} rotation plane, so that rotated views keep their shape")
        if np.prod([size // 32 for size in config.patch_size]) < 2:
            raise ValueError(f"swinunetr_ssl: patch_size {tuple(config.patch_size)} leaves one bottleneck token; the "
                             "contrastive head reads token 1 (use 64 or more on an axis)")
        self.network = build_network(backbone, in_channels=in_channels, out_channels=1)
        channels = self.network.hidden_levels[-1].channels  # the last Swin stage: 16 x feature_size
        self.rotation_head = torch.nn.Linear(channels, 4)
        self.contrastive_head = torch.nn.Linear(channels, config.contrast_dim)
        self.decoder = reconstruction_decoder(channels, out_channels=in_channels)

    def _view(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = int(rng.integers(4))
        rotated = np.rot90(region, k, axes=ROTATION_AXES[self.config.rotation_plane])
        spatial = rotated.shape[1:]
        view = {"input": paint_noise(rotated, random_boxes(spatial, rng), rng), "target": rotated,
                "rotation": np.array(k)}
        if self.config.cutmix:
            view["mix_mask"] = box_mask(spatial, random_boxes(spatial, rng))
            view["partner"] = np.array(rng.random())
        return view

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Two views, stacked on a leading axis of 2: ``input`` (rotated, corrupted), ``target`` (rotated),
        ``rotation`` (k), and with ``cutmix`` the views' ``mix_mask`` and ``partner`` draw."""
        views = [self._view(region, rng) for _ in range(2)]
        return {key: np.stack([view[key] for view in views]) for key in views[0]}

    def forward(self, x: torch.Tensor, reconstruct: bool = True):
        """SSLHead: rotation logits (B, 4) from bottleneck token 0, contrastive projection (B, contrast_dim) from
        token 1 and, if ``reconstruct``, the reconstruction (B, 1, X, Y, Z) from the whole bottleneck (else None)."""
        bottleneck = self.network.hidden_states(x)[-1]
        tokens = bottleneck.flatten(start_dim=2).transpose(1, 2)  # (B, tokens in raster order, channels)
        reconstruction = self.decoder(bottleneck) if reconstruct else None
        return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), reconstruction

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = [batch["input"][:, v] for v in range(2)]  # each (B, 1, X, Y, Z)
        if self.config.cutmix:
            views = [paste_from_partners(view, batch["target"][:, v], batch["mix_mask"][:, v], batch["partner"][:, v])
                     for v, view in enumerate(views)]
        reconstruct = bool(self.config.loss_weights.get("reconstruction"))
        # one pass per view, as the official step: one pass over both (a batch of 2B) computes the same and takes
        # 19% longer on a 2-core CPU at 64³ x 2 (benchmarks/official_compare.py swinunetr_ssl --scale 0.67)
        rotation_logits, projections, reconstructions = zip(*(self(view, reconstruct) for view in views))
        terms = {"rotation": F.cross_entropy(torch.cat(rotation_logits), by_view(batch["rotation"]).long()),
                 "contrastive": nt_xent(*projections)}
        if reconstruct:
            terms["reconstruction"] = F.l1_loss(torch.cat(reconstructions), by_view(batch["target"]))
        return terms

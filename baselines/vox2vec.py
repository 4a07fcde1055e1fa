"""vox2vec (Goncharov et al., MICCAI 2023): contrastive learning of voxel-level representations on a feature pyramid.

Two overlapping crops of a CT share an anchor voxel; each crop is augmented independently in intensity only (blur or
sharpening in-plane, Gaussian noise, a random HU window), so a voxel stays where it was. Up to 1024 body voxels
that both crops contain are embedded by concatenating the backbone's decoder features on every pyramid level at the
cell holding the voxel; a three-layer MLP projects each embedding to a unit vector of 128, and InfoNCE (temperature
0.1) makes the two embeddings of each anatomical voxel agree against every other voxel sampled in the batch. The
whole backbone (encoder and decoder) transfers.

Defaults are the official code's (``mishgon/vox2vec`` @ 734e757, methods.md §7): crops 128 x 128 x 32, at most
1024 matched voxels per pair, batch 10 pairs, Adam lr 3e-4 without weight decay or schedule (``adamw`` with weight
decay 0 is Adam; ``constant``), gradient clipping 1.0 (norm), temperature 0.1, projection 128, body = not reached by
the flood of the air (HU < -500) from the image border (``get_body_mask``). Per view: with p 0.5 a Gaussian blur
in-plane (sigma ~ U(0.25, 1.5)) or, with even odds, a sharpening (blur sigma_1 ~ U(0.5, 1), then
alpha ~ U(10, 30) times its difference to its blur at 0.5); with p 0.5 noise of sigma ~ U(0, 30) HU; with p 0.8 a
random window (low ~ U(-1350, -1000), high ~ U(300, 1000) HU) else the default window, then clipped to [0, 1]. The
official backbone is ``fpn3d`` with base 16 and 6 levels, whose decoder pyramid is the official F_0..F_5 (an
embedding of 1008 features); on any backbone the method reads the decoder pyramid and its strides
(``decoder_levels``). The projector is as wide as the embedding.

Intensities: the suite's caches are [0, 1]-scaled by a recipe, so HU settings are converted with the cache's window
``cache_window_hu`` (``hdssl_ct``, vox2vec's own pre-processing: [-1350, 1000] HU -> [0, 1], the default), an HU
value h becoming (h + 1350) / 2350: the body threshold -500 HU is 0.3617, the noise sigma at most 30 / 2350,
the random window's low end in [0, 0.149] and its high end in [0.702, 1]; the default window is the cache's own
(the identity). Blur and sharpening are linear with unit gain, so they commute with the scaling. The one difference
to the official order is that the cache is already clipped to the window before blur and noise.

Switches and deviations:
- ``rotate_rescale`` (default off): the official code's comment promises "random rescale, rotation" but applies
  only the crop, as the default here does. On, each view is also turned in-plane by U(-rotation_degrees,
  rotation_degrees) (15) and zoomed by U(*rescale) (0.8, 1.2), the matched voxels mapped through both
  (``ssl3d.pretrain.bricks.voxel_pairs.transformed_view_pair``; ranges the suite's choice, the official code names
  none). Hierarchical dense SSL shares the switch. Resampling costs: 0.1-0.2 s per pair at the paper size on one
  CPU core against 14 ms for two crops (the loader's work: give it workers).
- The official batch is 10 pairs from ONE scan (all negatives from the same scan). The suite's loader cuts each
  sample from a random scan of the pool, so by default (``batch_size`` 10, ``pairs_per_region`` 1) each pair
  comes from its own scan and negatives come from other scans too. ``pairs_per_region`` 10 with ``batch_size`` 1
  draws all the batch's pairs from one region of one scan (negatives from one scan, as officially), but with
  anchors within that region rather than the whole scan.
- Views are cut from a region of 2 x patch - 1 voxels per axis (every placement of two crops sharing a voxel fits),
  not from the whole scan; the body mask is computed on the whole scan, as officially, once per scan
  (``prepare_volume``) and cut with the region. The loader pads a smaller scan with 0 (air, outside the body),
  which a crop may show; officially crops stay inside the scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ssl3d.nets import build_network
from ssl3d.pretrain.bricks.heads import voxel_projector
from ssl3d.pretrain.bricks.losses import voxel_info_nce
from ssl3d.pretrain.bricks.voxel_pairs import (VoxelContrastConfig, pyramid_at_voxels, split_body_mask, view_pair,
                                               view_pair_region, with_body_mask)
from ssl3d.pretrain.method import Method, Transfer


@dataclass
class Vox2VecConfig(VoxelContrastConfig):
    loss_weights: dict[str, float] = field(default_factory=lambda: {"info_nce": 1.0})
    cache_window_hu: tuple[float, float] = (-1350.0, 1000.0)  # the HU window the pool's recipe scaled to [0, 1]
    body_threshold_hu: float = -500.0
    noise_std_hu: float = 30.0  # the noise's sigma is drawn from U(0, this)
    window_low_hu: tuple[float, float] = (-1350.0, -1000.0)  # random window: low end ~ U(*this)
    window_high_hu: tuple[float, float] = (300.0, 1000.0)  # high end ~ U(*this)


def in_plane_blur(view: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (C, X, Y, Z) view along X and Y (scipy's default reflect border, as officially)."""
    return ndimage.gaussian_filter(view, (0, sigma, sigma, 0))


class Vox2Vec(Method):
    name = "vox2vec"
    paper = ("Goncharov et al., vox2vec: A Framework for Self-supervised Contrastive Learning of Voxel-level "
             "Representations in Medical Images, MICCAI 2023")
    version = "2"  # 2: the body mask of the whole scan (1: of each region)
    multichannel = False  # the body mask and the augmentations are defined on one CT channel in HU
    Config = Vox2VecConfig
    transfer = Transfer(prefixes={"backbone.": ""})

    def __init__(self, config: Vox2VecConfig, backbone: dict, in_channels: int = 1):
        super().__init__(config, backbone, in_channels)
        self.backbone = build_network(backbone, in_channels=in_channels, out_channels=1)
        levels = self.backbone.decoder_levels
        self.strides = [level.stride for level in levels]
        self.projector = voxel_projector(sum(level.channels for level in levels), config.projection_dim)

    def region_size(self) -> tuple[int, int, int]:
        return view_pair_region(self.config)

    def unit(self, hu: float) -> float:
        """An HU value on the cache's [0, 1] scale."""
        low, high = self.config.cache_window_hu
        return (hu - low) / (high - low)

    def augment(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The official intensity augmentations of one view, on the [0, 1] scale (module docstring)."""
        config = self.config
        if rng.random() < 0.5:
            if rng.random() < 0.5:
                view = in_plane_blur(view, rng.uniform(0.25, 1.5))
            else:
                blurred = in_plane_blur(view, rng.uniform(0.5, 1.0))
                view = blurred + rng.uniform(10.0, 30.0) * (blurred - in_plane_blur(blurred, 0.5))
        if rng.random() < 0.5:
            low, high = config.cache_window_hu
            sigma = rng.uniform(0.0, config.noise_std_hu) / (high - low)
            view = view + sigma * rng.standard_normal(view.shape, dtype=np.float32)
        window = (rng.uniform(*config.window_low_hu), rng.uniform(*config.window_high_hu)) if rng.random() < 0.8 \
            else config.cache_window_hu
        low, high = self.unit(window[0]), self.unit(window[1])
        return np.clip((view - low) / (high - low), 0.0, 1.0).astype(np.float32)

    def prepare_volume(self, volume: np.ndarray) -> np.ndarray:
        return with_body_mask(volume, self.unit(self.config.body_threshold_hu))

    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        region, mask = split_body_mask(region)
        pairs = []
        for _ in range(self.config.pairs_per_region):
            pair = view_pair(self.config, region, mask, rng)
            pair["view1"], pair["view2"] = self.augment(pair["view1"], rng), self.augment(pair["view2"], rng)
            pairs.append(pair)
        return {key: np.stack([pair[key] for pair in pairs]) for key in pairs[0]}

    def embed(self, views: torch.Tensor, voxels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Unit projections (M, projection_dim) of the valid voxels of a batch of views."""
        pyramid = self.backbone.decode(self.backbone.encode(views))
        return F.normalize(self.projector(pyramid_at_voxels(pyramid, self.strides, voxels)[valid]), dim=1)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = {key: value.flatten(0, 1) for key, value in batch.items()}  # (B, pairs, ...) -> (B x pairs, ...)
        valid = pairs["valid"].bool()  # the loop collates every view as float32
        z1 = self.embed(pairs["view1"], pairs["voxels1"].long(), valid)
        z2 = self.embed(pairs["view2"], pairs["voxels2"].long(), valid)
        return {"info_nce": voxel_info_nce(z1, z2, self.config.temperature)}

"""Augmentation of fine-tuning patches: a run spec's ``augmentation`` preset, ``none`` (default), ``flips``, ``pgl`` or
``hybridmim``.

Why presets rather than a transform list in the config: a preset is part of a run's identity by name, and its
parameters are pinned here, next to the paper they follow. Each preset is MONAI dictionary transforms applied to
the image and label patch after cropping; spatial transforms move image and label together, intensity transforms
touch the image only. ``PatchSamples`` reseeds them per sample like the crop (``ssl3d.data.sampling``), so a run
stays reproducible and resumable with any number of workers.

* ``flips``: a flip along each axis with probability 0.5 (``RandFlipd``).
* ``pgl``: PGL's augmentations (Xie et al. 2020, §3.2), which its fine-tuning reuses (§5.1: "We employed the data
  augmentation techniques used for training the PGL model"), in the paper's order: flips as above; Gaussian noise,
  p 0.1; Gaussian blur, σ ∈ [0.5, 1], p 0.2; brightness/contrast: voxels × U(0.75, 1.25) clipped to the original
  range, p 0.5; gamma, γ ∈ [0.7, 1.5], p 0.5.
* ``hybridmim``: HybridMIM's fine-tuning (§4.3: "random flip, rotation, intensity scaling and shifts with
  probabilities of 0.2, 0.2, 0.1, and 0.1"), which are the defaults of the SwinUNETR / UNETR BTCV recipe of
  MONAI's research-contributions that its supervised rows come from (HybridMIM released no fine-tuning code):
  a flip along each axis, p 0.2 each; a rotation by k × 90° in the first two axes, k ∈ {1, 2, 3}, p 0.2
  (``RandRotate90d``, ``max_k=3``: the patch's first two sizes must be equal); voxels × (1 + f), f ∈ U(-0.1, 0.1),
  p 0.1 (``RandScaleIntensityd``); voxels + o, o ∈ U(-0.1, 0.1), p 0.1 (``RandShiftIntensityd``).

Deviations of ``pgl`` from the paper's parameterisation (MONAI's transforms, not a re-implementation):

* PGL's first augmentation, a random crop of 110-140 % of the input size rescaled to it, is pre-training's view
  generation, not used here: fine-tuning patches come from the foreground/background-balanced crop at the input
  size, unscaled.
* Noise: PGL draws the noise *variance* from U(0, 0.1); ``RandGaussianNoised`` draws the *standard deviation* from
  U(0, √0.1), so the largest noise is the same but small noise levels are less frequent.
* Blur: PGL draws one σ; ``RandGaussianSmoothd`` draws a σ per axis independently from [0.5, 1].
* Brightness/contrast: "the original dynamic range" is taken as the patch's range (the transforms see the patch,
  not the volume), per channel (``RandScaleIntensityFixedMeand`` with ``fixed_mean=False, preserve_range=True``:
  exactly ``v × (1 + f)``, f ∈ U(-0.25, 0.25), then clipped).
* Gamma: PGL's Eq. 2 (nnU-Net's gamma: intensities mapped to [0, 1], raised to γ and mapped back) is MONAI's
  ``AdjustContrast`` formula; MONAI maps with the range of the whole patch (all channels at once).
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
)

PRESETS = ("none", "flips", "pgl", "hybridmim")
ROTATING = ("hybridmim",)  # presets that rotate in the first two axes: the patch must be square in them
KEYS = ("image", "label")


def _flips(prob: float = 0.5) -> list:
    return [RandFlipd(KEYS, prob=prob, spatial_axis=axis) for axis in range(3)]


def _pgl() -> list:
    blur = (0.5, 1.0)
    return [
        *_flips(),
        RandGaussianNoised("image", prob=0.1, mean=0.0, std=math.sqrt(0.1), sample_std=True),
        RandGaussianSmoothd("image", sigma_x=blur, sigma_y=blur, sigma_z=blur, prob=0.2),
        RandScaleIntensityFixedMeand("image", factors=0.25, fixed_mean=False, preserve_range=True, prob=0.5,
                                     channel_wise=True),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.5),
    ]


def _hybridmim() -> list:
    return [
        *_flips(prob=0.2),
        RandRotate90d(KEYS, prob=0.2, max_k=3),
        RandScaleIntensityd("image", factors=0.1, prob=0.1),
        RandShiftIntensityd("image", offsets=0.1, prob=0.1),
    ]


def augmentation(preset: str = "none") -> Compose | None:
    """The preset's transforms on a ``{"image", "label"}`` patch, or None for ``none``."""
    if preset not in PRESETS:
        raise ValueError(f"augmentation: unknown preset {preset!r} (allowed: {', '.join(PRESETS)})")
    if preset == "none":
        return None
    return Compose({"flips": _flips, "pgl": _pgl, "hybridmim": _hybridmim}[preset]())

"""Named preprocessing recipes: the deterministic part of a paper's data pipeline, run once and cached per case.

A recipe fixes orientation, target spacing, foreground crop and intensity window; the random part (patch
sampling, augmentation) happens online in the loaders. Recipes are data (``recipes.yaml``) so a paper's recipe is
a named entry, and its content hash keys the cache so a changed recipe never serves stale volumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

ZSCORE_MODES = ("all", "nonzero")


@dataclass(frozen=True)
class Recipe:
    """The deterministic preprocessing of one paper, as data. Steps run in this order, each a MONAI transform:

    * ``orientation``: axis codes (``Orientationd``).
    * ``spacing``: target voxel size in mm (``Spacingd``; bilinear image, nearest label); None keeps the native grid.
    * ``crop_foreground_above``: keep the bounding box of voxels at or above this threshold, plus ``crop_margin``
      voxels (``CropForegroundd``). The threshold is in source units (HU) and the crop runs before the intensity
      steps, as vox2vec crops at -500 HU before windowing; with ``crop_after_intensity`` it is in output units and
      runs after them, as the HDSSL MRI recipe crops at 0.3 of the [0, 1]-scaled image (MRI has no absolute units).
    * ``window``: (a_min, a_max) in source units, clipped and mapped linearly onto ``scale``
      (``ScaleIntensityRanged``).
    * ``percentiles``: (lower, upper) per-volume percentiles on MONAI's 0-100 scale, clipped and mapped onto
      ``scale`` (``ScaleIntensityRangePercentilesd``); for MRI, whose intensities have no fixed range. Exclusive
      with ``window``.
    * ``scale``: (b_min, b_max), the output range of ``window`` or ``percentiles``.
    * ``zscore``: per-volume, per-channel z-score (``NormalizeIntensityd(channel_wise=True)``), last: ``"all"`` takes
      mean and sd over every voxel; ``"nonzero"`` over non-zero voxels only and leaves zeros at 0 (skull-stripped
      MRI, whose zero background is not tissue). A z-score is invariant to the affine ``window`` mapping, so
      ``window`` + ``zscore`` is exactly "clip, then z-score" (PGL).
    """

    name: str
    description: str = ""
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    crop_foreground_above: float | None = None
    crop_margin: int = 0
    crop_after_intensity: bool = False
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None
    scale: tuple[float, float] = (0.0, 1.0)
    zscore: str | None = None

    def __post_init__(self):
        if self.window is not None and self.percentiles is not None:
            raise ValueError(f"recipe {self.name!r}: window and percentiles both map intensities; give one")
        if self.zscore not in (None, *ZSCORE_MODES):
            raise ValueError(f"recipe {self.name!r}: zscore {self.zscore!r} is not one of {ZSCORE_MODES} or null")
        if self.crop_after_intensity and self.crop_foreground_above is None:
            raise ValueError(f"recipe {self.name!r}: crop_after_intensity needs crop_foreground_above")

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def builtin_recipes() -> dict[str, dict]:
    return yaml.safe_load(resources.files("ssl3d.data").joinpath("recipes.yaml").read_text())


def get_recipe(name_or_fields: str | dict) -> Recipe:
    """A recipe by name from ``recipes.yaml``, or from a dict of fields (with a ``name``)."""
    if isinstance(name_or_fields, dict):
        fields = dict(name_or_fields)
    else:
        known = builtin_recipes()
        if name_or_fields not in known:
            raise ValueError(f"preprocess.recipe: unknown recipe {name_or_fields!r}; known: {', '.join(sorted(known))}")
        fields = {"name": name_or_fields, **known[name_or_fields]}
    try:
        recipe = Recipe(**fields)
    except TypeError as err:
        raise ValueError(f"recipe {fields.get('name')!r}: {err}") from err
    for key in ("spacing", "window", "percentiles", "scale"):
        if getattr(recipe, key) is not None:
            object.__setattr__(recipe, key, tuple(float(v) for v in getattr(recipe, key)))
    return recipe


def _at_least(threshold: float):
    def select(x):
        return x >= threshold

    return select


def _intensity_steps(recipe: Recipe) -> list:
    steps = []
    if recipe.window is not None:
        steps.append(ScaleIntensityRanged("image", a_min=recipe.window[0], a_max=recipe.window[1],
                                          b_min=recipe.scale[0], b_max=recipe.scale[1], clip=True))
    if recipe.percentiles is not None:
        lower, upper = recipe.percentiles
        steps.append(ScaleIntensityRangePercentilesd("image", lower=lower, upper=upper, b_min=recipe.scale[0],
                                                     b_max=recipe.scale[1], clip=True, channel_wise=True))
    if recipe.zscore is not None:
        steps.append(NormalizeIntensityd("image", nonzero=recipe.zscore == "nonzero", channel_wise=True))
    return steps


def recipe_transform(recipe: Recipe, labelled: bool) -> Compose:
    keys = ["image", "label"] if labelled else ["image"]
    modes = ["bilinear", "nearest"] if labelled else ["bilinear"]
    steps = [Orientationd(keys, axcodes=recipe.orientation, labels=None)]
    if recipe.spacing is not None:
        steps.append(Spacingd(keys, pixdim=recipe.spacing, mode=modes, dtype=np.float32))
    crop = []
    if recipe.crop_foreground_above is not None:
        crop.append(CropForegroundd(keys, source_key="image", select_fn=_at_least(recipe.crop_foreground_above),
                                    margin=recipe.crop_margin, allow_smaller=True))
    intensity = _intensity_steps(recipe)
    steps += intensity + crop if recipe.crop_after_intensity else crop + intensity
    return Compose(steps)


def remap_labels(label: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Map source label values to the benchmark's classes; unlisted values become background.

    A lookup table rather than MONAI's ``MapLabelValue``, which keeps unlisted values (a TotalSegmentator map
    has ~100 labels of which a benchmark keeps a dozen).
    """
    lut = np.zeros(max(int(label.max()), max(label_map)) + 1, dtype=np.uint8)
    for source, target in label_map.items():
        lut[source] = target
    return lut[label.astype(np.int64)]


def apply_recipe(image: np.ndarray, affine: np.ndarray, recipe: Recipe, label: np.ndarray | None = None,
                 label_map: dict[int, int] | None = None) -> dict[str, np.ndarray]:
    """Run ``recipe`` on one volume (and its label). Returns image (X, Y, Z) float32 (a 4D image, channels last
    as NIfTI stores them, gives (C, X, Y, Z): every intensity step is channel-wise), label uint8, affine, spacing.

    ``label_map`` maps source label values to the benchmark's classes; unlisted values become background.
    """
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    channels_first = np.moveaxis(image, -1, 0) if image.ndim == 4 else image[None]
    data = {"image": MetaTensor(torch.as_tensor(channels_first, dtype=torch.float32), affine=affine_t)}
    if label is not None:
        if label_map:
            label = remap_labels(label, label_map)
        data["label"] = MetaTensor(torch.as_tensor(label.astype(np.int16))[None], affine=affine_t.clone())
    out = recipe_transform(recipe, label is not None)(data)
    out_affine = out["image"].affine.numpy().astype(np.float64)
    result = {
        "image": out["image"].numpy().squeeze(0).astype(np.float32) if image.ndim == 3
        else out["image"].numpy().astype(np.float32),
        "affine": out_affine,
        "spacing": np.sqrt((out_affine[:3, :3] ** 2).sum(axis=0)),
    }
    if label is not None:
        result["label"] = np.rint(np.asarray(out["label"])[0]).astype(np.uint8)
    return result

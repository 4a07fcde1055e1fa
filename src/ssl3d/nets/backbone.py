"""The one interface every segmentation backbone offers.

Pre-training methods and downstream protocols never ask a network's name: they read its pyramid.

* ``encode(x)`` gives the encoder's feature maps, finest first (index 0 nearest full resolution);
* ``decode(features, region=None)`` gives the decoder's feature maps, finest first;
* ``head(decoded)`` is the output layer on them (the only parameters whose shape depends on the number of
  classes): most heads read ``decoded[0]``, an FPN's linear head every level;
* ``encoder_levels`` / ``decoder_levels`` declare, per map, its channels and per-axis stride against the input
  (a map of an input of size ``n`` along an axis has size ``n / stride``);
* ``part(name)`` says whether a parameter is ``encoder``, ``decoder`` or ``head`` (weight transfer, probing and
  frozen-then-fine-tuned training act on parts);
* ``capabilities`` names the optional abilities a method may require (``Method.requires``):

  - ``region_decoding``: ``decode(features, region=(start, stop))`` decodes only a box of the deepest map
    (in its cells): every encoder map is cropped to the box first (:meth:`Backbone.crop_to_region`), and
    ``voxel_region(region)`` is the input box the result covers (HybridMIM's partial region prediction on a UNet);
  - ``hidden_states``: a transformer backbone's raw stage outputs, ``hidden_states(x)``, from which
    ``encode(x, hidden, region=None)`` builds the encoder maps, on the ``voxel_region(region)`` box only when
    ``region`` is given (HybridMIM's and SwinUNETR SSL's Swin variants read the last stage; HybridMIM crops
    before the encoder's convolution blocks as its official code).

A backbone is one class with this mixin in front of its ``torch.nn.Module`` base, a ``build`` classmethod that
maps config fields to its constructor, and ``smallest``: the fields and input size of its smallest useful
instance, on which ``tests/test_backbone_contract.py`` checks every registered backbone (levels against the
actual tensors, parts covering each parameter exactly once, capabilities). Registering it is one line in
``ssl3d.nets.BACKBONES``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

CAPABILITIES = frozenset({"region_decoding", "hidden_states"})
PARTS = ("encoder", "decoder", "head")


@dataclass(frozen=True)
class Level:
    """One map of a feature pyramid: its channels and its per-axis stride against the input."""

    channels: int
    stride: tuple[int, int, int]


INPUT = Level(0, (1, 1, 1))  # the network's input as a level of the pyramid (stride 1), for region boxes


def levels(channels, strides) -> tuple[Level, ...]:
    """Levels from parallel lists of channels and strides (an int stride is isotropic)."""
    return tuple(Level(int(c), triple(s)) for c, s in zip(channels, strides, strict=True))


def triple(value) -> tuple[int, int, int]:
    """An int ``n`` -> ``(n, n, n)``; 3 values -> a tuple of 3 ints."""
    if isinstance(value, int):
        return value, value, value
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values, got {value}")
    return value


def cumulative(pools) -> list[tuple[int, int, int]]:
    """Per-axis strides of each level from the per-axis pooling factors between levels (the first is at 1)."""
    strides = [(1, 1, 1)]
    for pool in pools:
        strides.append(tuple(a * b for a, b in zip(strides[-1], pool)))
    return strides


class Backbone(abc.ABC):
    """Mixin declaring the backbone interface (module docstring); ``forward`` is ``head(decode(encode(x)))``.

    Subclasses set ``name``, ``smallest``, ``capabilities`` and, per instance, ``encoder_levels`` and
    ``decoder_levels``, and implement ``encode``, ``decode``, ``head`` and ``part`` (a class missing one cannot be
    instantiated); ``build`` by default passes the config's fields to the constructor.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    smallest: ClassVar[dict]  # {"fields": {...}, "input": (X, Y, Z)}: the contract tests' instance
    encoder_levels: tuple[Level, ...]
    decoder_levels: tuple[Level, ...]

    @classmethod
    def build(cls, in_channels: int, out_channels: int, **fields) -> Backbone:
        """The network from a config's backbone fields (``name`` removed)."""
        return cls(in_channels=in_channels, out_channels=out_channels, **fields)

    @classmethod
    @abc.abstractmethod
    def part(cls, name: str) -> str:
        """``encoder``, ``decoder`` or ``head`` for a parameter (or buffer) name of this backbone."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, finest first."""

    @abc.abstractmethod
    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        """The decoder's feature maps, finest first; ``region`` needs ``region_decoding``."""

    @abc.abstractmethod
    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        """The output layer on the decoder's maps (``decode(...)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))

    def check_region(self, region) -> None:
        if region is not None and "region_decoding" not in self.capabilities:
            raise ValueError(f"backbone {self.name!r} cannot decode a region (it lacks 'region_decoding')")

    def region_boxes(self, region, maps: tuple[Level, ...] | None = None) -> list[tuple[slice, slice, slice]]:
        """The box of ``region`` on each of ``maps`` (the encoder's levels by default). ``region`` is (start, stop)
        in cells of the deepest map, ints or one value per axis; a shallower map's box is scaled by the ratio of the
        strides: (1, 3) on a 4³ map of stride 8 is [4:12]³ of a map of stride 2."""
        start, stop = (np.broadcast_to(np.asarray(v, dtype=int), (3,)) for v in region)
        if (start < 0).any() or (stop <= start).any():
            raise ValueError(f"{self.name}: region {region} is not a non-empty (start, stop) box")
        maps = self.encoder_levels if maps is None else maps
        deepest = maps[-1].stride
        return [tuple(slice(int(a) * (d // s), int(b) * (d // s))
                      for a, b, d, s in zip(start, stop, deepest, level.stride)) for level in maps]

    def voxel_region(self, region) -> tuple[slice, slice, slice]:
        """The box of the input that the head's output on a decoded ``region`` covers, as three slices."""
        return self.region_boxes(region, (INPUT, self.encoder_levels[-1]))[0]

    def crop_to_region(self, maps: list[torch.Tensor], region, levels: tuple[Level, ...] | None = None
                       ) -> list[torch.Tensor]:
        """``maps``, one per level of ``levels`` (the encoder's by default), each cropped to its box of ``region``
        (:meth:`region_boxes`); as given when ``region`` is None."""
        if region is None:
            return maps
        boxes = self.region_boxes(region, levels)
        for box, feature in zip(boxes, maps):
            if any(b.stop > n for b, n in zip(box, feature.shape[2:])):
                raise ValueError(f"{self.name}: region {region} reaches {tuple(b.stop for b in box)}, beyond the "
                                 f"{tuple(feature.shape[2:])} map")
        return [feature[(..., *box)] for feature, box in zip(maps, boxes)]

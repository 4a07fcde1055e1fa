"""The method contract: what one pre-training method declares, so that everything else stays generic.

A method is one file (in ``methods/`` or ``baselines/``, or an installed package exposing the entry-point group
``ssl3d.methods``) defining a subclass of :class:`Method`. It declares its paper, a typed config with the paper's
defaults, the backbones it supports, how it turns a region of a volume into views, its loss terms by name, and
which of its weights initialise which downstream modules. The loop, optimizers, logging, checkpoints and timing
live in ``ssl3d.pretrain.loop`` and are the same for every method (solo-learn / lightly style).

Loss terms are a dict so that an ablation is a config: the total loss is the sum of ``loss_weights[name] *
term`` over the configured weights, and a weight of 0 switches a term off.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ssl3d.engine import PRECISIONS
from ssl3d.nets import BACKBONES, backbone_class


@dataclass(frozen=True)
class Transfer:
    """Which pre-trained weights initialise which downstream modules.

    ``prefixes`` maps a prefix of the method's state dict to a prefix of the downstream network's state dict
    (``{"network.": ""}`` hands a whole network over). ``parts`` are the parts of the downstream network
    (``encoder``, ``decoder``; see ``ssl3d.nets.parameter_part``) that the method trains and hands over: a method
    whose loss only reaches the encoder transfers the encoder alone, even if it holds a whole network. The output
    head never transfers. ``coverage`` is the smallest fraction of the downstream network's encoder / decoder
    parameters that must be initialised; it is verified before the first pre-training step.
    """

    prefixes: dict[str, str]
    parts: tuple[str, ...] = ("encoder", "decoder")
    coverage: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0, "decoder": 1.0})


@dataclass
class MethodConfig:
    """Fields every method config has; a method's own config subclasses this with its paper's defaults.

    ``optimizer`` and ``scheduler`` are read by ``ssl3d.pretrain.optim``; ``patch_size`` is the network input;
    ``precision``, ``channels_last`` and ``compile`` are the training engine's (``ssl3d.engine``: ``auto``,
    ``float32`` or ``bfloat16``; the networks and views in channels_last_3d memory order, faster for some networks on
    a CPU; the loss terms through ``torch.compile``, faster for attention networks).
    """

    loss_weights: dict[str, float] = field(default_factory=dict)
    patch_size: tuple[int, int, int] = (64, 64, 32)
    batch_size: int = 4
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-5})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_steps": 0})
    grad_clip: float | None = None
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The fields of MethodConfig with an obvious valid range: field -> (check, what a value outside it is not). Checked
# on the overrides, before a method's own __post_init__ reads them, so a bad value fails when the workflow is planned
# rather than deep inside a pre-training job ("stack expects each tensor to be equal size").
_RANGES = {
    "patch_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_positive_int, v)),
                   "is not three positive integers, e.g. [64, 64, 32]"),
    "batch_size": (_positive_int, "is not a positive integer"),
    "grad_clip": (lambda v: v is None or (_number(v) and v > 0), "is neither null (no clipping) nor a number > 0"),
    "precision": (lambda v: v in PRECISIONS, f"is not one of {', '.join(PRECISIONS)}"),
    "channels_last": (lambda v: isinstance(v, bool), "is not true or false"),
    "compile": (lambda v: isinstance(v, bool), "is not true or false"),
    "loss_weights": (lambda v: isinstance(v, dict) and all(_number(w) and w >= 0 for w in v.values()),
                     "is not a mapping of loss terms to weights >= 0 (0 switches a term off)"),
}


_PLAIN_TYPES = {bool: ("true or false", lambda v: isinstance(v, bool)),
                int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                float: ("a number", _number), str: ("a string", lambda v: isinstance(v, str)),
                type(None): ("null", lambda v: v is None)}


def _type_problem(value, annotation) -> str | None:
    """What ``value`` is not, for a field annotated with a plain type (``bool``, ``int``, ``float``, ``str``, or
    one of them ``| None``): a string ``"false"`` for a switch would otherwise read as on. None where the value
    fits or the annotation is a container (those fields have their own checks)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if not all(option in _PLAIN_TYPES for option in options):
        return None
    if any(_PLAIN_TYPES[option][1](value) for option in options):
        return None
    return "is not " + " or ".join(_PLAIN_TYPES[option][0] for option in options)


def make_config(config_class: type[MethodConfig], overrides: dict[str, Any] | None = None,
                where: str | None = None) -> MethodConfig:
    """The method's defaults with ``overrides`` from the experiment config; an unknown key, a common field out of
    its range or a value of the wrong plain type is named as ``<where>.<field>`` (``where``: the config entry;
    default: the config class)."""
    where = where or config_class.__qualname__
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    wrong = [f"{where}.{name}: {overrides[name]!r} {rule}" for name, (valid, rule) in _RANGES.items()
             if name in overrides and not valid(overrides[name])]
    annotations = typing.get_type_hints(config_class)
    wrong += [f"{where}.{name}: {value!r} {problem}" for name, value in overrides.items()
              if name not in _RANGES and (problem := _type_problem(value, annotations[name]))]
    terms, given = config_class().loss_weights, overrides.get("loss_weights")  # the defaults name every term
    if terms and isinstance(given, dict):
        wrong += [f"{where}.loss_weights.{name}: not a loss term of this method; its terms: {', '.join(terms)}"
                  for name in given if name not in terms]
    if wrong:
        raise ValueError("; ".join(wrong))
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(overrides["patch_size"])
    try:
        return config_class(**overrides)
    except ValueError as err:  # the method's own checks (its config's __post_init__)
        raise ValueError(f"{where}: {err}") from None


Requirement = str | tuple[str, ...]  # a backbone capability, or a tuple of alternatives (any one of them)


def missing_capabilities(requires: tuple[Requirement, ...], offered: frozenset[str]) -> list[str]:
    """The requirements a backbone offering ``offered`` does not meet, spelt ``a`` or ``a or b``."""
    return [" or ".join(need) if isinstance(need, tuple) else need for need in requires
            if not set((need,) if isinstance(need, str) else need) & offered]


class Method(torch.nn.Module, abc.ABC):
    """Base class of a pre-training method: set the class attributes and implement the two abstract hooks.

    Which backbones a method runs on is computed, never listed: ``requires`` names the backbone capabilities it
    needs (``ssl3d.nets.backbone``), and every registered backbone offering them is supported
    (:meth:`supported_backbones`). ``in_channels`` is the pre-training data's channel
    count; a method whose views or targets only make sense on one channel sets ``multichannel = False`` and is
    refused multi-channel data when the workflow is planned.

    The report reads ``display_name`` (tables and legends), the first paragraph of the method module's docstring
    (:meth:`description`) and ``figures`` (method-specific figures by name, drawn where an experiment has their data).
    ``probe_features`` is the pyramid a frozen-encoder probe reads on this method's weights (``decoder`` or
    ``encoder``: a method that trains only the encoder leaves the decoder at its initialisation).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    display_name: ClassVar[str] = ""  # defaults to ``name``
    version: ClassVar[str] = "1"  # bump when a change alters results; older runs are then flagged stale
    requires: ClassVar[tuple[Requirement, ...]] = ()
    multichannel: ClassVar[bool] = True
    probe_features: ClassVar[str] = "decoder"
    figures: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    transfer: ClassVar[Transfer]

    def __init__(self, config: MethodConfig, backbone: dict, in_channels: int = 1):
        super().__init__()
        missing = missing_capabilities(self.requires, backbone_class(backbone["name"]).capabilities)
        if missing:
            raise ValueError(f"{self.name} needs a backbone with {', '.join(missing)}; {backbone['name']!r} has not "
                             f"(it runs on {', '.join(self.supported_backbones())})")
        if in_channels != 1 and not self.multichannel:
            raise ValueError(f"{self.name} pre-trains on one-channel volumes only; the data has {in_channels} channels")
        self.config = config
        self.backbone_spec = dict(backbone)
        self.in_channels = in_channels

    @classmethod
    def supported_backbones(cls) -> list[str]:
        """The registered backbones offering every capability the method requires."""
        return [name for name, backbone in BACKBONES.items()
                if not missing_capabilities(cls.requires, backbone.capabilities)]

    @classmethod
    def title(cls) -> str:
        return cls.display_name or cls.name

    @classmethod
    def description(cls) -> str:
        """The first paragraph of the class's module docstring (what the method learns)."""
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        return " ".join(doc.strip().split("\n\n")[0].split())

    def region_size(self) -> tuple[int, int, int]:
        """Size of the region cut from a volume for one sample, before ``make_views``."""
        return tuple(self.config.patch_size)

    def prepare_volume(self, volume: np.ndarray) -> np.ndarray:
        """A (C, X, Y, Z) volume of the pool as the regions ``make_views`` receives are cut from it: the volume itself,
        or with channels appended that depend on the whole volume and are computed once per volume when the pool is
        loaded, not per sample (vox2vec's body mask, computed on the whole scan as the official code does)."""
        return volume

    @abc.abstractmethod
    def make_views(self, region: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Turn one region of a prepared volume (``prepare_volume``: (C, X, Y, Z) by default) into the method's
        inputs and targets; runs in the data loader, on CPU."""

    @abc.abstractmethod
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named scalar loss terms for a collated batch of views, on the training device: one per key of
        ``loss_weights`` (a term whose weight is 0 may be skipped, saving its compute in an ablation)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (e.g. an EMA target update)."""

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.config.loss_weights
        missing = sorted(name for name, weight in weights.items() if weight and name not in terms)
        if missing:
            raise KeyError(f"method {self.name!r} returned no loss term(s) {missing} although they have weights")
        return sum(weight * terms[name] for name, weight in weights.items() if weight)

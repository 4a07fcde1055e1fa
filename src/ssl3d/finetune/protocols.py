"""The downstream protocols: which network a run trains, and which of its parameters learn how fast.

A run spec's ``protocol`` (absent: ``finetune``) and ``protocol_settings`` (present only for the last two) say:

* ``finetune``: the whole network trains with the run's optimizer and schedule (the suite's default);
* ``probe``: linear evaluation. The backbone (encoder and decoder) is frozen and a linear head per pyramid level
  learns (``ssl3d.nets.probe.LinearProbe``); only the heads are given to the optimizer. ``features`` (``decoder`` or
  ``encoder``) is the pyramid it reads; when absent, the pre-trained method's ``probe_features`` (a method that
  trains only the encoder probes the encoder), ``decoder`` from scratch;
* ``frozen_then_finetune``: the head trains from step 1 with the run's schedule; the backbone's learning rate is the
  schedule's times :func:`backbone_factor`: 0 for ``frozen_steps`` steps, then rising exponentially from
  ``start_fraction`` (default 0.1) to 1 over ``ramp_steps`` steps. This is the continuous form of PyTorch
  Lightning's ``BackboneFinetuning`` defaults (the backbone unfrozen at lr 0.1 × the head's, then ×1.5 per epoch
  up to the head's lr) that the official hierarchical-dense-SSL and vox2vec fine-tuning use. Differences: the
  backbone is in the optimizer from step 1 with lr 0 rather than added at the unfreeze, so its gradients are
  computed while it is frozen and, with Adam(W), its moment estimates start at step 1 (its weights do not move:
  AdamW's decoupled weight decay is scaled by the lr too, so lr 0 means no decay either); and the backbone stays in
  training mode, so normalisation statistics move while its weights are frozen (as with Lightning's default
  ``train_bn=True``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ssl3d.nets import build_network
from ssl3d.nets.probe import LinearProbe
from ssl3d.plan import PROTOCOL_SETTINGS
from ssl3d.pretrain.optim import build_optimizer, build_scheduler, lr_factor
from ssl3d.pretrain.registry import get_method
from ssl3d.pretrain.transfer import load_pretrained, load_released

log = logging.getLogger(__name__)

DEFAULT_SCHEDULER = {"name": "cosine"}  # to 0 over the run's steps (torch's CosineAnnealingLR, in closed form)


def protocol(spec: dict) -> tuple[str, dict]:
    """The run's protocol and its settings, checked: an unknown protocol or setting is named."""
    name = spec.get("protocol", "finetune")
    if name not in PROTOCOL_SETTINGS:
        raise ValueError(f"protocol: unknown protocol {name!r} (allowed: {', '.join(PROTOCOL_SETTINGS)})")
    settings = dict(spec.get("protocol_settings") or {})
    unknown = sorted(set(settings) - set(PROTOCOL_SETTINGS[name]))
    if unknown:
        raise ValueError(f"protocol_settings: unknown setting(s) {unknown} for protocol {name!r} "
                         f"(allowed: {', '.join(PROTOCOL_SETTINGS[name]) or 'none'})")
    if name == "frozen_then_finetune":
        missing = [key for key in ("frozen_steps", "ramp_steps") if key not in settings]
        if missing:
            raise ValueError(f"protocol_settings: frozen_then_finetune needs {' and '.join(missing)}")
        settings.setdefault("start_fraction", 0.1)
        if not 0 < settings["start_fraction"] <= 1:
            raise ValueError(f"protocol_settings.start_fraction: {settings['start_fraction']}; use a value in (0, 1]")
    return name, settings


@dataclass
class Downstream:
    """The network a run trains, what was loaded into it (``transfer``: a report dict, or None from scratch) and,
    for a probe, the pyramid it reads."""

    model: torch.nn.Module
    transfer: dict | None = None
    probe_features: str | None = None


def build_downstream(spec: dict, in_channels: int, out_channels: int, pretrained=None,
                     probe_features: str | None = None) -> Downstream:
    """The downstream model of ``spec`` for its protocol: its backbone network, initialised from the pre-training
    checkpoint ``pretrained`` (a path: a pre-training run's ``pretrained.pt``, or the ``verified`` folder of the
    released checkpoint that ``spec["released"]`` names) when given, wrapped in a :class:`LinearProbe` for ``probe``.

    Fine-tuning calls it with ``pretrained``; evaluation calls it with the ``probe_features`` that ``model.pt``
    recorded, then loads the trained weights.
    """
    name, settings = protocol(spec)
    network = build_network(spec["backbone"], in_channels=in_channels, out_channels=out_channels)
    transfer = None
    if pretrained is not None:
        report = (load_released(network, pretrained) if "released" in spec
                  else load_pretrained(network, pretrained, spec["backbone"]["name"]))
        transfer = report.as_dict()
        log.info("initialised from %s (%s): %s", spec["init"], pretrained, transfer["fractions"])
    if name != "probe":
        return Downstream(network, transfer)
    features = (probe_features or settings.get("features")
                or (get_method(report.method).probe_features if pretrained is not None else "decoder"))
    return Downstream(LinearProbe(network, out_channels, features), transfer, features)


def backbone_factor(step: int, frozen_steps: int, ramp_steps: int, start_fraction: float = 0.1) -> float:
    """``frozen_then_finetune``'s factor on the backbone's lr at training step ``step`` (from 1): 0 for steps
    1..N (``frozen_steps``), ``start_fraction ** (1 - k / M)`` at step N + 1 + k for k = 0..M-1 (``ramp_steps``),
    then 1."""
    k = step - frozen_steps - 1
    if k < 0:
        return 0.0
    return start_fraction ** (1 - k / ramp_steps) if k < ramp_steps else 1.0


def build_optimization(model: torch.nn.Module, spec: dict, steps: int):
    """The optimizer and per-step lr schedule of a run (``optimizer``, ``scheduler``: default cosine to 0) for its
    protocol: over the trainable parameters (a probe's heads only), and for ``frozen_then_finetune`` with the
    backbone's parameters (encoder and decoder, by ``part``) in their own groups, scaled by :func:`backbone_factor`.
    """
    name, settings = protocol(spec)
    schedule = spec.get("scheduler", DEFAULT_SCHEDULER)
    if name != "frozen_then_finetune":
        optimizer = build_optimizer(model, spec["optimizer"])
        return optimizer, build_scheduler(optimizer, schedule, steps)
    named = list(model.named_parameters())
    optimizer = build_optimizer([item for item in named if model.part(item[0]) == "head"], spec["optimizer"])
    for group in build_optimizer([item for item in named if model.part(item[0]) != "head"],
                                 spec["optimizer"]).param_groups:
        optimizer.add_param_group({**group, "backbone": True})
    base = lr_factor(schedule, steps)

    def backbone(epoch: int) -> float:  # LambdaLR's epoch k sets the lr of training step k + 1
        return base(epoch) * backbone_factor(epoch + 1, **settings)

    lambdas = [backbone if group.get("backbone") else base for group in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

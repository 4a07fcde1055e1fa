"""Speed of one training step of every registered method and backbone (pytest-benchmark), found automatically.

* ``test_pretraining_step[<method>-<backbone>]``: one pre-training step (loss terms, backward, the optimizer of
  the method's config, ``after_step``) of every method in ``ssl3d.pretrain.registry.methods()`` on every backbone
  it supports, each at its smallest instance (``Backbone.smallest``, as the contract tests build it). Batch 2,
  views made before timing.
* ``test_make_views[<method>]``: the method's ``make_views`` for one sample (the data loader's share), at the input
  of its smallest supported backbone: the one whose smallest instance has the smallest input, then the fewest
  parameters.
* ``test_finetuning_step[<backbone>]``: one fine-tuning step (Dice + CE, AdamW) of every registered backbone at its
  smallest instance, batch 2, 4 classes.

A method or backbone added later gets its benchmarks without editing this file. One intra-op thread (as
``test_spine_speed.py``), so the numbers vary less with the machine's load. Not part of the normal test run (the
repository's pytest ``testpaths`` is ``tests/`` and ``addopts`` has ``--benchmark-disable``); the whole file takes
about five minutes on 2 cores (Swin backbones take the most: 2-6 s per step):

    pytest benchmarks/test_method_steps.py --benchmark-enable

Baseline and comparison. ``benchmarks/baselines/method-steps-cpu-2core.json`` is the baseline measured on the
2-core CPU development machine, written with::

    pytest benchmarks/test_method_steps.py --benchmark-enable \\
        --benchmark-json benchmarks/baselines/method-steps-cpu-2core.json

``--benchmark-compare`` takes a saved run's number from the storage folder (``--benchmark-storage``, default
``.benchmarks/<machine id>/NNNN_name.json``, written by ``--benchmark-save NAME``) or, as here, the path of a JSON
file, so a later run compares against the committed baseline with::

    pytest benchmarks/test_method_steps.py --benchmark-enable \\
        --benchmark-compare=benchmarks/baselines/method-steps-cpu-2core.json --benchmark-sort=name

which prints each benchmark's baseline row above the new one (add ``--benchmark-compare-fail=median:25%`` to fail
on a slow-down of more than 25%). Compare only runs on the same kind of machine; pytest-benchmark warns when the
machine info differs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ssl3d.finetune.losses import segmentation_loss
from ssl3d.nets import BACKBONES, build_network
from ssl3d.pretrain.method import Method, make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method, methods

BATCH = 2
CLASSES = 4
ROUNDS, WARMUP_ROUNDS = 5, 1


def small_backbone(backbone: str) -> dict:
    """The backbone's smallest instance (``Backbone.smallest``), as tests/test_method_contract.py builds it."""
    return {"name": backbone, **BACKBONES[backbone].smallest["fields"]}


@functools.cache
def smallest_size(backbone: str) -> tuple[int, int]:
    """(input voxels, parameters) of the backbone's smallest instance: the order "smallest" goes by."""
    network = build_network(small_backbone(backbone), in_channels=1, out_channels=1)
    return int(np.prod(BACKBONES[backbone].smallest["input"])), sum(p.numel() for p in network.parameters())


def smallest_supported(name: str) -> str:
    return min(get_method(name).supported_backbones(), key=lambda backbone: (smallest_size(backbone), backbone))


PRETRAINING = [(name, backbone) for name in sorted(methods()) for backbone in get_method(name).supported_backbones()]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_method(name: str, backbone: str) -> Method:
    cls = get_method(name)
    torch.manual_seed(0)
    config = make_config(cls.Config, {"patch_size": list(BACKBONES[backbone].smallest["input"]), "batch_size": BATCH})
    return cls(config, small_backbone(backbone))


def batch_of_views(method: Method, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    samples = [method.make_views(method.prepare_volume(
        rng.random((method.in_channels, *method.region_size()), dtype=np.float32)), rng)
               for _ in range(method.config.batch_size)]
    return {key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])) for key in samples[0]}


@pytest.mark.parametrize("name, backbone", PRETRAINING, ids=[f"{n}-{b}" for n, b in PRETRAINING])
def test_pretraining_step(benchmark, name, backbone):
    method = small_method(name, backbone)
    method.train()
    optimizer = build_optimizer(method, method.config.optimizer)
    batch = batch_of_views(method)
    count = [0]

    def step():
        loss = method.total_loss(method.loss_terms(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(count[0], 1000)
        count[0] += 1
        return loss.detach()

    benchmark.extra_info.update(backbone=backbone, patch=list(method.config.patch_size), batch=BATCH)
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(methods()))
def test_make_views(benchmark, name):
    method = small_method(name, smallest_supported(name))
    rng = np.random.default_rng(0)
    region = method.prepare_volume(rng.random((method.in_channels, *method.region_size()), dtype=np.float32))
    benchmark.extra_info.update(region=list(method.region_size()))
    views = benchmark.pedantic(method.make_views, args=(region, rng), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                               iterations=1)
    assert views


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_finetuning_step(benchmark, backbone):
    torch.manual_seed(0)
    network = build_network(small_backbone(backbone), in_channels=1, out_channels=CLASSES)
    network.train()
    optimizer = build_optimizer(network, {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-5})
    loss_fn = segmentation_loss("dice_ce")
    generator = torch.Generator().manual_seed(0)
    patch = BACKBONES[backbone].smallest["input"]
    image = torch.rand(BATCH, 1, *patch, generator=generator)
    label = torch.randint(0, CLASSES, (BATCH, 1, *patch), generator=generator)

    def step():
        loss, _ = loss_fn(network(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    benchmark.extra_info.update(patch=list(patch), batch=BATCH, classes=CLASSES)
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert torch.isfinite(loss)

"""vox2vec (baselines/vox2vec.py): official defaults, the HU augmentations on the [0, 1] scale, the loss path (F7)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from torch.utils.data import DataLoader

from ssl3d.nets import BACKBONES
from ssl3d.pretrain.loop import RegionViews
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method

TINY_UNET = {"name": "unet", **BACKBONES["unet"].smallest["fields"]}


def vox2vec(backbone: dict = TINY_UNET, **overrides):
    cls = get_method("vox2vec")
    torch.manual_seed(0)
    return cls(make_config(cls.Config, {"patch_size": [32, 32, 32], "batch_size": 2, "max_voxels": 64,
                                        **overrides}), backbone)


def ct_volume(shape=(48, 44, 40), seed=0) -> np.ndarray:
    """A (1, X, Y, Z) [0, 1] CT-like volume: a noisy elliptic body (with a darker pocket) in air."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((x - shape[0] / 2) / 20) ** 2 + ((y - shape[1] / 2) / 17) ** 2 <= 1
    image = np.where(body, 0.55, 0.05) + 0.05 * rng.standard_normal(shape)
    return np.clip(image, 0, 1)[None].astype(np.float32)


def test_official_defaults():
    config = dataclasses.asdict(get_method("vox2vec").Config())
    assert config["patch_size"] == (128, 128, 32) and config["max_voxels"] == 1024
    assert config["batch_size"] * config["pairs_per_region"] == 10
    assert config["optimizer"] == {"name": "adamw", "lr": 3e-4, "weight_decay": 0.0}  # Adam: AdamW without decay
    assert config["scheduler"] == {"name": "constant"} and config["grad_clip"] == 1.0
    assert config["temperature"] == 0.1 and config["projection_dim"] == 128
    assert config["loss_weights"] == {"info_nce": 1.0}
    method = vox2vec()
    assert method.unit(method.config.body_threshold_hu) == pytest.approx(850 / 2350)  # -500 HU on hdssl_ct's scale
    assert method.region_size() == (63, 63, 63)


def test_rotation_and_rescale_are_a_switch_off_by_default_that_trains():
    """Off as in the official code (its comment promises them); on, a step from the loader trains on turned and
    zoomed views from a region grown to hold them."""
    assert not get_method("vox2vec").Config().rotate_rescale
    method = vox2vec(rotate_rescale=True, rotation_degrees=30, rescale=[0.8, 1.25])
    assert method.region_size() == (2 * 55 - 1, 2 * 55 - 1, 2 * 40 - 1)  # ceil(32 x 1.25 x (cos 30° + sin 30°))
    samples = RegionViews([method.prepare_volume(ct_volume(seed=s)) for s in range(2)], method, seed=0, length=2)
    batch = next(iter(DataLoader(samples, batch_size=2)))
    assert batch["valid"].sum(dim=1).min() > 0
    loss = method.total_loss(method.loss_terms(batch))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="rescale"):
        vox2vec(rotate_rescale=True, rescale=[1.2, 0.8])


def test_the_projection_head_is_the_official_mlp():
    backbone = {"name": "basicunet", "features": [16, 32, 64, 128, 256, 16]}
    method = vox2vec(backbone)
    dim = 16 + 32 + 64 + 128  # the decoder pyramid's channels, finest first
    layers = list(method.projector)
    assert [type(layer) for layer in layers] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU] * 2 + [
        torch.nn.Linear]
    assert [(layer.in_features, layer.out_features) for layer in layers[::3]] == [(dim, dim), (dim, dim), (dim, 128)]
    assert layers[1].num_features == layers[4].num_features == dim
    views = torch.rand(2, 1, 32, 32, 32)
    voxels = torch.randint(0, 32, (2, 5, 3))
    embeddings = method.embed(views, voxels, torch.ones(2, 5, dtype=torch.bool))
    assert embeddings.shape == (10, 128)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(10))


class Scripted:
    """A stand-in generator: ``random()`` answers from a script, ``uniform`` its upper bound, the noise ones."""

    def __init__(self, *randoms):
        self.randoms = iter(randoms)

    def random(self):
        return next(self.randoms)

    def uniform(self, low, high):
        return high

    def standard_normal(self, shape, dtype):
        return np.ones(shape, dtype)


def hu(view):
    return view * 2350 - 1350  # hdssl_ct's [0, 1] back to HU


def scale_hu(image_hu, low, high):
    return np.clip((image_hu - low) / (high - low), 0, 1)


def in_plane(image, sigma):
    return gaussian_filter1d(gaussian_filter1d(image, sigma, axis=1), sigma, axis=2)


@pytest.mark.parametrize("script, official", [
    ((0.9, 0.9, 0.9), lambda x: scale_hu(x, -1350, 1000)),  # nothing drawn: the default window is the identity
    ((0.9, 0.0, 0.0), lambda x: scale_hu(x + 30, -1000, 1000)),  # noise of 30 HU, the window (-1000, 1000) HU
    ((0.0, 0.0, 0.9, 0.9), lambda x: scale_hu(in_plane(x, 1.5), -1350, 1000)),  # blur, sigma 1.5
    ((0.0, 0.9, 0.9, 0.9), lambda x: scale_hu(in_plane(x, 1.0) + 30 * (in_plane(x, 1.0) - in_plane(
        in_plane(x, 1.0), 0.5)), -1350, 1000)),  # sharpening, sigma_1 1, alpha 30
])
def test_augmentations_on_the_unit_scale_are_the_official_ones_in_hu(script, official):
    view = np.random.default_rng(0).random((1, 16, 12, 6)).astype(np.float32)
    augmented = vox2vec().augment(view, Scripted(*script))
    assert augmented.dtype == np.float32 and augmented.shape == view.shape
    np.testing.assert_allclose(augmented, official(hu(view.astype(np.float64))), atol=2e-5)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_augmentations_stay_in_the_unit_range_and_move_no_voxel(axis):
    """A step edge between voxels 15 and 16: every augmentation keeps it there (intensity only)."""
    view = np.full((1, 32, 32, 32), 0.2, dtype=np.float32)
    view[(slice(None),) * axis + (slice(16, None),)] = 0.8
    method = vox2vec()
    for seed in range(30):
        augmented = method.augment(view, np.random.default_rng(seed))
        assert augmented.shape == view.shape and augmented.dtype == np.float32
        assert augmented.min() >= 0 and augmented.max() <= 1
        profile = augmented.mean(axis=tuple(a for a in range(4) if a != axis))
        assert profile[:16].max() < profile[16:].min()


def test_views_of_several_pairs_per_region():
    method = vox2vec(pairs_per_region=3)
    views = method.make_views(method.prepare_volume(ct_volume((63, 63, 63))), np.random.default_rng(0))
    assert views["view1"].shape == views["view2"].shape == (3, 1, 32, 32, 32)
    assert views["voxels1"].shape == (3, 64, 3) and views["valid"].shape == (3, 64)
    assert views["valid"].any(axis=1).all()
    assert all(0 <= views[key].min() and views[key].max() <= 1 for key in ("view1", "view2"))


def test_f7_through_the_loss_path(monkeypatch):
    """The method's loss on F7's embeddings (methods.md §10) is the official InfoNCE's 3.5452111 (tau 0.1)."""
    method = vox2vec()
    rng = np.random.default_rng(0)
    samples = [method.make_views(method.prepare_volume(ct_volume((63, 63, 63))), rng) for _ in range(2)]
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
    torch.manual_seed(0)
    e1 = F.normalize(torch.randn(64, 128))
    e2 = F.normalize(e1 + 0.5 * torch.randn(64, 128))
    calls = []

    def embed(views, voxels, valid):
        calls.append((views, voxels, valid))
        return (e1, e2)[len(calls) - 1]

    monkeypatch.setattr(method, "embed", embed)
    assert method.loss_terms(batch)["info_nce"].item() == pytest.approx(3.5452111, abs=1e-5)
    (views1, voxels1, valid1), (views2, voxels2, valid2) = calls
    torch.testing.assert_close(views1, batch["view1"].flatten(0, 1))
    torch.testing.assert_close(voxels2, batch["voxels2"].flatten(0, 1))
    assert valid1.dtype == torch.bool and torch.equal(valid1, valid2)


def test_a_step_from_the_loader_reaches_the_whole_backbone():
    """Views from the suite's loader (every value collated as float32) give a finite loss whose gradient reaches
    every encoder and decoder parameter; the output head, unused, gets none."""
    method = vox2vec(pairs_per_region=2)
    samples = RegionViews([method.prepare_volume(ct_volume(seed=s)) for s in range(3)], method, seed=0, length=2)
    batch = next(iter(DataLoader(samples, batch_size=2)))
    assert batch["voxels1"].dtype == torch.float32
    loss = method.total_loss(method.loss_terms(batch))
    assert torch.isfinite(loss)
    loss.backward()
    part = BACKBONES["unet"].part
    grads = {name: param.grad for name, param in method.backbone.named_parameters()}
    assert all(grads[name] is not None for name in grads if part(name) != "head")
    assert all(grads[name] is None for name in grads if part(name) == "head")
    assert sum(grad.abs().sum() for grad in grads.values() if grad is not None) > 0
    assert all(param.grad is not None for param in method.projector.parameters())


def test_on_fpn3d_a_voxel_is_embedded_from_the_official_pyramid():
    """vox2vec's own backbone: the embedding is every level of F_0..F_{S-1} at the voxel's cell (1008 features for
    the paper's base 16 and 6 levels)."""
    assert vox2vec({"name": "fpn3d", "base_channels": 16, "num_scales": 6}).projector[0].in_features == 1008
    method = vox2vec({"name": "fpn3d", "base_channels": 2, "num_scales": 3})
    captured = []
    method.projector.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    views, voxels = torch.rand(2, 1, 32, 32, 32), torch.randint(0, 32, (2, 5, 3))
    method.embed(views, voxels, torch.ones(2, 5, dtype=torch.bool))
    pyramid = method.backbone.fpn(views)  # the official FPN3d's output
    expected = torch.cat([torch.cat([level[b][:, x // 2 ** i, y // 2 ** i, z // 2 ** i].T
                                     for i, level in enumerate(pyramid)], dim=1)
                          for b in range(2) for x, y, z in [voxels[b].T]])
    torch.testing.assert_close(captured[0], expected, atol=0, rtol=0)

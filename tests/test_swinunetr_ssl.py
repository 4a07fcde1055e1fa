"""Tests for the SwinUNETR self-supervised baseline (baselines/swinunetr_ssl.py) against methods.md §8.1.

The contrastive term is ``nt_xent`` (fixture F1 is pinned in test_bricks_losses.py); the contract tests
run the method on the smallest Swin. Here: the views (rotation labels, in-painting boxes, the official cut-mix
order), the heads' shapes and which bottleneck tokens they read.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method

SMALL_SWIN = {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
SHAPE = (64, 64, 64)


def small_method(**overrides):
    cls = get_method("swinunetr_ssl")
    torch.manual_seed(0)
    return cls(make_config(cls.Config, {"patch_size": list(SHAPE), "batch_size": 2, **overrides}), SMALL_SWIN)


def module():
    """The loaded baseline module (methods are discovered from files, not imported as a package)."""
    return sys.modules[get_method("swinunetr_ssl").__module__]


@pytest.mark.parametrize("plane, axes", [("xy", (1, 2)), ("yz", (2, 3))])
def test_rotating_the_target_back_by_the_label_recovers_the_region(plane, axes):
    method = small_method(rotation_plane=plane)
    region = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    rng = np.random.default_rng(1)
    labels = set()
    for _ in range(12):
        views = method.make_views(region, rng)
        assert views["input"].shape == views["target"].shape == (2, 1, *SHAPE) and views["rotation"].shape == (2,)
        for target, k in zip(views["target"], views["rotation"]):
            np.testing.assert_array_equal(np.rot90(target, -int(k), axes=axes), region)
            if k % 4:
                assert not np.array_equal(target, region)
            labels.add(int(k))
    assert labels == {0, 1, 2, 3}


def test_in_painting_changes_only_box_voxels_within_the_coverage_bound():
    parts = module()
    rng = np.random.default_rng(0)
    view = rng.random((1, *SHAPE), dtype=np.float32)
    low, high = int(0.05 * SHAPE[0]), int(0.25 * SHAPE[0])
    fractions = []
    for _ in range(50):
        boxes = parts.random_boxes(SHAPE, rng)
        for box in boxes:
            for axis, side in zip(box, SHAPE):
                assert 0 <= axis.start < side - low and axis.stop <= side
                assert axis.stop - axis.start < high and (axis.stop - axis.start >= low or axis.stop == side)
        painted = parts.paint_noise(view, boxes, rng)
        inside = parts.box_mask(SHAPE, boxes)
        changed = painted != view
        assert not changed[~inside].any()
        assert painted[inside].min() >= 0 and painted[inside].max() <= 1
        fractions.append(inside.mean())
    # the summed box volume stops at the first box past U(0, 0.3) of the crop: the union is below 0.3 + one box
    assert max(fractions) < 0.3 + (high / SHAPE[0]) ** 3
    assert 0.05 < np.mean(fractions) < 0.2


def test_cutmix_pastes_from_the_partner_in_the_official_order():
    """Crop 0 takes from crop 2 (later: its clean crop), crop 1 keeps its view, crop 2 from crop 0 (earlier: its
    finished view)."""
    corrupted = torch.arange(3.0).reshape(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2).clone()
    clean = corrupted + 10
    mask = torch.zeros(3, 1, 2, 2, 2)
    mask[:, :, 0] = 1
    partner = torch.tensor([0.9, 0.5, 0.1])
    mixed = module().paste_from_partners(corrupted, clean, mask, partner)
    assert mixed[0, :, 0].eq(12).all() and mixed[0, :, 1].eq(0).all()
    assert torch.equal(mixed[1], corrupted[1])
    assert mixed[2, :, 0].eq(12).all() and mixed[2, :, 1].eq(2).all()
    # no host sync: torch.compile traces it as one graph (the eager backend: tracing only)
    traced = torch.compile(module().paste_from_partners, backend="eager", fullgraph=True)
    assert torch.equal(traced(corrupted, clean, mask, partner), mixed)


def test_head_shapes_for_a_64_cube():
    method = small_method()
    rotation, projection, reconstruction = method(torch.rand(3, 1, *SHAPE))
    assert rotation.shape == (3, 4) and projection.shape == (3, 512)
    assert reconstruction.shape == (3, 1, *SHAPE)
    assert method(torch.rand(3, 1, *SHAPE), reconstruct=False)[2] is None


def test_rotation_head_reads_token_0_and_contrastive_head_token_1():
    method = small_method()
    x = torch.rand(2, 1, *SHAPE)
    seen = {}
    for name in ("rotation_head", "contrastive_head"):
        getattr(method, name).register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0]}))
    with torch.no_grad():
        method(x, reconstruct=False)
        bottleneck = method.network.hidden_states(x)[-1]  # (2, 192, 2, 2, 2): 8 tokens in raster order
    assert bottleneck.shape == (2, 192, 2, 2, 2)
    torch.testing.assert_close(seen["rotation_head"], bottleneck[:, :, 0, 0, 0])
    torch.testing.assert_close(seen["contrastive_head"], bottleneck[:, :, 0, 0, 1])


def test_sizes_that_break_a_view_or_the_token_1_head_are_named():
    with pytest.raises(ValueError, match="square in the xy rotation plane"):
        small_method(patch_size=[64, 96, 64])
    small_method(patch_size=[64, 96, 96], rotation_plane="yz")  # square in Y-Z: fine
    with pytest.raises(ValueError, match="one bottleneck token"):
        small_method(patch_size=[32, 32, 32])
    with pytest.raises(ValueError, match="rotation_plane"):
        small_method(rotation_plane="xz")

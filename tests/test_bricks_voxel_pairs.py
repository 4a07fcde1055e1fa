"""The shared voxel-pair bricks of vox2vec and HDSSL: body mask, anchored view pairs, pyramid lookup (fixture F8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl3d.pretrain.bricks.voxel_pairs import (anchored_view_pair, body_mask, pyramid_at_voxels, split_body_mask,
                                               transformed_view_pair, with_body_mask)


def coordinate_region(size=(20, 18, 12)) -> np.ndarray:
    """A (3, X, Y, Z) region whose channels hold each voxel's own coordinates."""
    return np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij")).astype(np.float32)


def matched(pair: dict) -> tuple[np.ndarray, np.ndarray]:
    valid = pair["valid"]
    return pair["voxels1"][valid], pair["voxels2"][valid]


@pytest.mark.parametrize("seed", range(20))
def test_matched_voxels_are_one_region_voxel_inside_both_views_and_the_mask(seed):
    rng = np.random.default_rng(seed)
    region = coordinate_region()
    mask = rng.random(region.shape[1:]) < 0.3
    patch, max_voxels = (10, 8, 6), 64
    pair = anchored_view_pair(region, mask, patch, max_voxels, rng)
    assert pair["view1"].shape == pair["view2"].shape == (3, *patch) and pair["view1"].dtype == np.float32
    assert pair["voxels1"].shape == pair["voxels2"].shape == (max_voxels, 3) and pair["voxels1"].dtype == np.int64
    assert pair["valid"].shape == (max_voxels,) and pair["valid"].dtype == bool
    v1, v2 = matched(pair)
    assert 1 <= len(v1) <= max_voxels
    assert np.all((v1 >= 0) & (v1 < patch)) and np.all((v2 >= 0) & (v2 < patch))
    at1 = pair["view1"][:, v1[:, 0], v1[:, 1], v1[:, 2]].T  # the region coordinates of each matched voxel
    at2 = pair["view2"][:, v2[:, 0], v2[:, 1], v2[:, 2]].T
    np.testing.assert_array_equal(at1, at2)
    assert mask[tuple(at1.astype(int).T)].all()
    assert len(np.unique(at1, axis=0)) == len(at1)
    assert not pair["valid"][len(v1):].any() and not pair["voxels1"][len(v1):].any()


def test_all_shared_body_voxels_are_matched_when_fewer_than_max_voxels():
    region = coordinate_region()
    mask = np.zeros(region.shape[1:], dtype=bool)
    mask[5:8, 6:9, 4:6] = True  # 18 body voxels
    for seed in range(10):
        pair = anchored_view_pair(region, mask, (10, 8, 6), 1024, np.random.default_rng(seed))
        v1, _ = matched(pair)
        corner1 = pair["view1"][:, 0, 0, 0].astype(int)  # each view's start in the region
        corner2 = pair["view2"][:, 0, 0, 0].astype(int)
        inside = np.argwhere(mask)
        both = np.all((inside >= corner1) & (inside < corner1 + (10, 8, 6)) &
                      (inside >= corner2) & (inside < corner2 + (10, 8, 6)), axis=1)
        expected = {tuple(v) for v in inside[both]}
        assert {tuple(v) for v in (v1 + corner1)} == expected and len(v1) == len(expected)


def test_matches_are_capped_at_max_voxels_without_duplicates():
    region = coordinate_region()
    pair = anchored_view_pair(region, np.ones(region.shape[1:], dtype=bool), (16, 16, 10), 50,
                              np.random.default_rng(0))
    v1, _ = matched(pair)
    assert len(v1) == 50 and len(np.unique(v1, axis=0)) == 50


def test_an_empty_mask_counts_as_all_body():
    region = coordinate_region()
    pair = anchored_view_pair(region, np.zeros(region.shape[1:], dtype=bool), (10, 8, 6), 32,
                              np.random.default_rng(1))
    assert pair["valid"].sum() == 32


def test_the_pair_depends_only_on_the_generator():
    region = coordinate_region()
    mask = np.random.default_rng(0).random(region.shape[1:]) < 0.5
    first, second = (anchored_view_pair(region, mask, (10, 8, 6), 16, np.random.default_rng(7)) for _ in range(2))
    assert all(np.array_equal(first[key], second[key]) for key in first)


def test_a_patch_larger_than_the_region_is_refused():
    region = coordinate_region((8, 8, 8))
    with pytest.raises(ValueError, match="at least the patch"):
        anchored_view_pair(region, np.ones((8, 8, 8), dtype=bool), (10, 8, 8), 4, np.random.default_rng(0))


def test_f8_pyramid_at_voxels_is_select_from_pyramid():
    pyramid = [torch.arange(64).reshape(2, 4, 4, 2), torch.arange(16).reshape(4, 2, 2, 1)]
    voxels = torch.tensor([[3, 1, 1], [0, 0, 0]])
    out = pyramid_at_voxels([level[None] for level in pyramid], [(1, 1, 1), 2], voxels[None])
    assert out.tolist() == [[[27, 59, 2, 6, 10, 14], [0, 32, 0, 4, 8, 12]]]


def test_pyramid_at_voxels_reads_each_sample_at_its_cell_with_per_axis_strides():
    torch.manual_seed(0)
    strides = [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    pyramid = [torch.randn(3, 2 + i, 8 // s[0], 8 // s[1], 4 // s[2]) for i, s in enumerate(strides)]
    voxels = torch.stack([torch.randint(0, 8, (5, 5)), torch.randint(0, 8, (5, 5)),
                          torch.randint(0, 4, (5, 5))], dim=-1)[:3]  # (B=3, N=5, 3)
    out = pyramid_at_voxels(pyramid, strides, voxels)
    assert out.shape == (3, 5, 2 + 3 + 4)
    for b in range(3):
        for n in range(5):
            expected = torch.cat([level[b, :, voxels[b, n, 0] // s[0], voxels[b, n, 1] // s[1],
                                        voxels[b, n, 2] // s[2]] for level, s in zip(pyramid, strides)])
            torch.testing.assert_close(out[b, n], expected, atol=0, rtol=0)


def test_pyramid_at_voxels_passes_gradients_to_the_levels():
    level = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    pyramid_at_voxels([level], [1], torch.tensor([[[1, 2, 3]]])).sum().backward()
    assert level.grad.sum() == 2 and level.grad[0, :, 1, 2, 3].tolist() == [1, 1]


def synthetic_body(shape=(40, 36, 10)) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic cylinder of tissue (0.6) in air (0.1) with an internal air pocket (0.05); the expected body."""
    x, y, _ = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((x - 20) / 15) ** 2 + ((y - 18) / 12) ** 2 <= 1
    image = np.where(body, 0.6, 0.1)
    pocket = ((x - 20) / 5) ** 2 + ((y - 18) / 4) ** 2 <= 1
    image[pocket] = 0.05
    return image, body


def test_body_mask_keeps_internal_air_and_drops_the_outside_air():
    image, body = synthetic_body()
    mask = body_mask(image, 0.36)
    assert mask.shape == image.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, body)
    assert mask[20, 18].all() and image[20, 18, 0] < 0.36  # the pocket is air and counts as body


def test_the_whole_scan_body_mask_travels_with_the_volume_and_comes_back_with_each_region():
    """Computed once on the whole scan (official): a region cutting the air pocket keeps it as body, where a
    flood of that region alone would reach it from the region's border."""
    image, body = synthetic_body()
    image = image.astype(np.float32)
    prepared = with_body_mask(image[None], 0.36)
    assert prepared.shape == (2, *image.shape) and prepared.dtype == np.float32
    cut = (slice(None), slice(20, 36), slice(10, 30))  # through the pocket, whose air reaches the cut's border
    region, mask = split_body_mask(prepared[cut])
    np.testing.assert_array_equal(region[0], image[cut[1:]])
    np.testing.assert_array_equal(mask, body[cut[1:]])
    assert mask[0, 8].all() and not body_mask(region[0], 0.36)[0, 8].any()  # the pocket, at the cut's border


def test_body_mask_floods_air_touching_the_in_plane_border_at_any_slice():
    image, body = synthetic_body()
    image[20, 18:, 3] = 0.1  # a channel from the pocket to the border, on one slice: the pocket is outside now
    mask = body_mask(image, 0.36)
    assert not mask[20, 18].any()
    assert mask[body & (image >= 0.36)].all()
    assert not body_mask(np.full((8, 8, 4), 0.1), 0.36).any() and body_mask(np.full((8, 8, 4), 0.9), 0.36).all()


@pytest.mark.parametrize("seed", range(12))
def test_turned_and_zoomed_views_match_the_same_region_voxel(seed):
    """Each view shows the region turned in-plane and zoomed; a matched voxel shows, in either view, the region
    within one voxel per axis of the same body voxel (half a view voxel, zoomed by at most 1.4 and turned), once."""
    rng = np.random.default_rng(seed)
    region = coordinate_region((40, 36, 16))
    mask = rng.random(region.shape[1:]) < 0.3
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:], mask[..., :2], mask[..., -2:] = (False,) * 6  # away from the rim
    pair = transformed_view_pair(region, mask, (10, 8, 6), 64, rng, rotation_degrees=45, rescale=(0.7, 1.4))
    v1, v2 = matched(pair)
    assert 1 <= len(v1) <= 64 and pair["view1"].shape == (3, 10, 8, 6)
    assert np.all((v1 >= 0) & (v1 < (10, 8, 6))) and np.all((v2 >= 0) & (v2 < (10, 8, 6)))
    at1 = pair["view1"][:, v1[:, 0], v1[:, 1], v1[:, 2]].T
    at2 = pair["view2"][:, v2[:, 0], v2[:, 1], v2[:, 2]].T
    for point1, point2 in zip(at1, at2):  # a body voxel within one voxel per axis of what both views show
        low, high = np.ceil(np.maximum(point1, point2) - 1 - 1e-4), np.floor(np.minimum(point1, point2) + 1 + 1e-4)
        assert np.all(low <= high) and mask[tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))].any()
    assert len(np.unique(v1, axis=0)) == len(v1) and len(np.unique(v2, axis=0)) == len(v2)


def test_a_turned_view_pair_without_turn_or_zoom_is_two_crops_matched_exactly():
    rng = np.random.default_rng(3)
    region = coordinate_region()
    mask = rng.random(region.shape[1:]) < 0.3
    pair = transformed_view_pair(region, mask, (10, 8, 6), 64, rng, rotation_degrees=0, rescale=(1, 1))
    v1, v2 = matched(pair)
    at1 = pair["view1"][:, v1[:, 0], v1[:, 1], v1[:, 2]].T
    at2 = pair["view2"][:, v2[:, 0], v2[:, 1], v2[:, 2]].T
    np.testing.assert_allclose(at1, at2, atol=1e-4)
    assert mask[tuple(np.rint(at1).astype(int).T)].all()


def test_the_anchor_is_matched_exactly_in_turned_views():
    """A body of one voxel: it is the anchor, sampled on a voxel of each view, so both read its coordinates."""
    region = coordinate_region((30, 30, 12))
    mask = np.zeros(region.shape[1:], dtype=bool)
    mask[14, 15, 6] = True
    for seed in range(5):
        pair = transformed_view_pair(region, mask, (8, 8, 4), 16, np.random.default_rng(seed), rotation_degrees=40,
                                     rescale=(0.8, 1.3))
        v1, v2 = matched(pair)
        assert len(v1) == 1
        np.testing.assert_allclose(pair["view1"][:, v1[0, 0], v1[0, 1], v1[0, 2]], (14, 15, 6), atol=1e-4)
        np.testing.assert_allclose(pair["view2"][:, v2[0, 0], v2[0, 1], v2[0, 2]], (14, 15, 6), atol=1e-4)

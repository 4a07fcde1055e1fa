"""Tests for the Models Genesis bricks: the UNet3D (ssl3d.nets.genesis) and the transformations
(ssl3d.pretrain.bricks.genesis_transforms), against methods.md §5 and fixtures F9/F10 (§10).

F10's exact numbers are tied to the official code's RNG stream (Python ``random`` + ``np.random``), which this
port does not replay; the tests check the invariants of §10 and the distributional part of F10 instead.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from ssl3d.nets.genesis import (GENESIS_N_PARAMETERS, GenesisBatchNorm3d, UNet3D,
                                load_genesis_checkpoint)
from ssl3d.pretrain.bricks import genesis_transforms as gt
from ssl3d.pretrain.bricks.genesis_transforms import GenesisTransformConfig

SHAPE = (1, 64, 64, 32)  # the Models Genesis cube


def unique_cube(shape=SHAPE, seed=0) -> np.ndarray:
    """A cube whose voxel values are all distinct (a shuffled ramp in [0, 1)), so each value names its voxel."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) / n).astype(np.float32).reshape(shape)


def fixture_cube() -> np.ndarray:
    """The F10 cube: ``RandomState(123).rand(1, 64, 64, 32)`` (a local legacy generator, not the global one)."""
    return np.random.RandomState(123).rand(*SHAPE).astype(np.float32)


def union_mask(shape, boxes) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for corner, size in boxes:
        mask[(slice(None),) + tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def spatial_flips(cube: np.ndarray, axes=(1, 2, 3)):
    """Every combination of flips along ``axes``: {frozenset(axes flipped): flipped cube}."""
    out = {}
    for r in range(len(axes) + 1):
        for combo in itertools.combinations(axes, r):
            out[frozenset(combo)] = np.flip(cube, axis=combo) if combo else cube
    return out


def which_flip(result: np.ndarray, cube: np.ndarray) -> frozenset:
    matches = [axes for axes, flipped in spatial_flips(cube).items() if np.array_equal(result, flipped)]
    assert len(matches) == 1, "result is not a flipped copy of the cube"
    return matches[0]


# ----------------------------------------------------------------------------------------------------- Bézier


def test_bezier_curve_follows_the_bernstein_formula_in_models_genesis_orientation():
    points = [[0.0, 0.0], [0.2, 0.9], [0.7, 0.1], [1.0, 1.0]]
    xvals, yvals = gt.bezier_curve(points, n_times=5)
    p = np.asarray(points)
    # t = 0 gives the last control point, t = 1 the first (weights t^(n-i) (1-t)^i)
    assert np.allclose([xvals[0], yvals[0]], p[3]) and np.allclose([xvals[-1], yvals[-1]], p[0])
    # t = 0.5: (P0 + 3 P1 + 3 P2 + P3) / 8 ; t = 0.25: weights (1/64, 9/64, 27/64, 27/64) on P0..P3
    assert np.allclose([xvals[2], yvals[2]], (p[0] + 3 * p[1] + 3 * p[2] + p[3]) / 8)
    assert np.allclose([xvals[1], yvals[1]], (p[0] + 9 * p[1] + 27 * p[2] + 27 * p[3]) / 64)


# --------------------------------------------------------------------------------------------------- non-linear


@pytest.mark.parametrize("seed", range(8))
def test_nonlinear_map_increasing_branch_is_monotone_and_fixes_0_and_1(seed):
    ramp = np.linspace(0.0, 1.0, 8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4)
    out = gt.nonlinear_transformation(ramp, np.random.default_rng(seed), prob=1.0, inverted=False)
    flat = out.ravel()
    assert out.dtype == np.float32 and out.shape == ramp.shape
    assert np.all(np.diff(flat) >= 0)
    assert flat[0] == pytest.approx(0.0, abs=1e-6) and flat[-1] == pytest.approx(1.0, abs=1e-6)
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    assert not np.allclose(flat, ramp.ravel(), atol=1e-3)  # it did remap


@pytest.mark.parametrize("seed", range(8))
def test_nonlinear_map_inverted_branch_is_monotone_decreasing_from_1_to_0(seed):
    ramp = np.linspace(0.0, 1.0, 8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4)
    out = gt.nonlinear_transformation(ramp, np.random.default_rng(seed), prob=1.0, inverted=True).ravel()
    assert np.all(np.diff(out) <= 0)
    assert out[0] == pytest.approx(1.0, abs=1e-6) and out[-1] == pytest.approx(0.0, abs=1e-6)


def test_nonlinear_map_branches_are_drawn_half_and_half_and_prob_zero_is_identity():
    ramp = np.linspace(0.0, 1.0, 4 * 4 * 4, dtype=np.float32).reshape(1, 4, 4, 4)
    inverted = sum(gt.nonlinear_transformation(ramp, np.random.default_rng(s), prob=1.0).ravel()[0] > 0.5
                   for s in range(100))
    assert 30 <= inverted <= 70
    untouched = gt.nonlinear_transformation(ramp, np.random.default_rng(0), prob=0.0)
    assert np.array_equal(untouched, ramp) and untouched is not ramp


# ------------------------------------------------------------------------------------------------ local shuffle


def test_single_block_shuffle_permutes_one_small_block_and_preserves_all_values():
    cube = unique_cube()
    changed_any = False
    for seed in range(20):
        out = gt.local_pixel_shuffling(cube, np.random.default_rng(seed), prob=1.0, n_blocks=1)
        assert np.array_equal(np.sort(out, axis=None), np.sort(cube, axis=None))  # whole-cube multiset
        changed = np.argwhere(out != cube)
        if len(changed) == 0:
            continue  # a 1×1×1 block or an identity permutation
        changed_any = True
        low, high = changed.min(axis=0), changed.max(axis=0) + 1
        assert np.all(high[1:] - low[1:] <= (6, 6, 3))  # randint(1, dim // 10) per axis
        region = tuple(slice(a, b) for a, b in zip(low, high))
        assert np.array_equal(np.sort(out[region], axis=None), np.sort(cube[region], axis=None))
    assert changed_any


def test_local_shuffle_moves_values_only_within_a_block_and_only_from_the_original():
    cube = unique_cube()
    before = cube.copy()
    out = gt.local_pixel_shuffling(cube, np.random.default_rng(1), prob=1.0)
    assert np.array_equal(cube, before)  # input untouched
    assert np.isin(out, cube).all()  # every value comes from the original cube
    # each output value came from a voxel less than one block size away (blocks ≤ 6×6×3)
    voxel_of_rank = np.argsort(cube, axis=None)
    rank = np.searchsorted(np.sort(cube, axis=None), out.ravel())
    origin = np.stack(np.unravel_index(voxel_of_rank[rank], cube.shape))
    here = np.stack(np.unravel_index(np.arange(cube.size), cube.shape))
    shift = np.abs(origin - here).max(axis=1)
    assert tuple(shift[1:]) == (5, 5, 2)


def test_local_shuffle_changes_the_fraction_of_voxels_of_fixture_f10():
    # F10 (official code): 0.7891 of the voxels changed; our draws are independent of its RNG stream, so compare
    # the mean over three seeds (between-seed sd ≈ 0.004) with a tolerance of ~2.5 sd.
    cube = fixture_cube()
    fractions = [np.mean(gt.local_pixel_shuffling(cube, np.random.default_rng(s), prob=1.0) != cube)
                 for s in range(3)]
    assert np.mean(fractions) == pytest.approx(0.7891, abs=0.012)


def test_vectorised_shuffle_equals_the_sequential_block_loop():
    cube = fixture_cube()[0]
    rng = np.random.default_rng(5)
    corners, sizes, keys = gt._shuffle_plan(rng, np.asarray(cube.shape), 10_000)
    expected, offset = cube.copy(), 0
    for corner, size in zip(corners, sizes):
        n = int(np.prod(size))
        block = tuple(slice(c, c + s) for c, s in zip(corner, size))
        window = cube[block].ravel()[np.argsort(keys[offset:offset + n], kind="stable")]
        expected[block] = window.reshape(size)
        offset += n
    assert np.array_equal(gt.apply_shuffle_plan(cube, corners, sizes, keys), expected)


def test_overlapping_blocks_read_the_original_so_the_cube_multiset_can_change():
    """Official semantics: blocks are read from the original and written in order into a copy."""
    cube = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 8
    corners = np.array([[0, 0, 0], [0, 0, 1]])
    sizes = np.array([[1, 1, 2], [1, 1, 1]])
    keys = np.array([1, 0, 0])  # block 0 swaps (0,0,0) and (0,0,1); block 1 rewrites (0,0,1) with its own value
    out = gt.apply_shuffle_plan(cube, corners, sizes, keys)
    assert out[0, 0, 0] == cube[0, 0, 1] and out[0, 0, 1] == cube[0, 0, 1]
    assert not np.array_equal(np.sort(out, axis=None), np.sort(cube, axis=None))


# ----------------------------------------------------------------------------------------------------- painting


def test_in_painting_changes_exactly_the_painted_boxes():
    ones = np.ones(SHAPE, dtype=np.float32)
    dims = np.array(SHAPE[1:])
    counts = set()
    for seed in range(150):
        out, boxes = gt.in_painting_with_boxes(ones, np.random.default_rng(seed))
        counts.add(len(boxes))
        assert len(boxes) <= 5
        for corner, size in boxes:
            assert np.all(dims // 6 <= size) and np.all(np.asarray(size) <= dims // 3)
            assert np.all(np.asarray(corner) >= 3) and np.all(np.asarray(corner) + size <= dims - 3)
        # noise is in [0, 1), so on an all-ones cube the changed voxels are exactly the boxes
        assert np.array_equal(out < 1.0, union_mask(SHAPE, boxes))
        assert out.min() >= 0.0 and out.dtype == np.float32
    assert ones.min() == 1.0  # input untouched
    # official counting: each box, the first one too, with probability 0.95 → 0 to 5 boxes
    assert {0, 5} <= counts


def test_in_painting_leaves_voxels_outside_the_boxes_unchanged():
    cube = fixture_cube()
    out, boxes = gt.in_painting_with_boxes(cube, np.random.default_rng(3))
    assert len(boxes) >= 1
    outside = ~union_mask(SHAPE, boxes)
    assert np.array_equal(out[outside], cube[outside])
    assert np.mean(out[~outside] != cube[~outside]) > 0.99


def test_out_painting_keeps_the_original_inside_the_boxes_and_noise_elsewhere():
    ones = np.ones(SHAPE, dtype=np.float32)
    dims = np.array(SHAPE[1:])
    counts = set()
    for seed in range(100):
        out, boxes = gt.out_painting_with_boxes(ones, np.random.default_rng(seed))
        counts.add(len(boxes))
        assert 1 <= len(boxes) <= 5
        for corner, size in boxes:
            assert np.all(dims - 4 * dims // 7 <= size) and np.all(np.asarray(size) <= dims - 3 * dims // 7)
        kept = union_mask(SHAPE, boxes)
        assert np.all(out[kept] == 1.0)
        assert np.all((out[~kept] >= 0.0) & (out[~kept] < 1.0))
    assert 1 in counts and 5 in counts
    cube = fixture_cube()
    out, boxes = gt.out_painting_with_boxes(cube, np.random.default_rng(0))
    kept = union_mask(SHAPE, boxes)
    assert np.array_equal(out[kept], cube[kept]) and np.mean(out[~kept] != cube[~kept]) > 0.99


def test_painting_runs_on_cubes_too_small_for_the_official_margin():
    small = unique_cube((1, 16, 16, 8))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert gt.out_painting(small, rng).shape == small.shape
        assert gt.in_painting(small, rng).shape == small.shape
        assert gt.local_pixel_shuffling(small, rng, prob=1.0).shape == small.shape


# -------------------------------------------------------------------------------------------------------- flips


def test_flip_never_flips_z_by_default_and_flips_x_and_y_alike():
    cube = unique_cube(seed=1)
    label = (cube * 7 + 1).astype(np.float32)
    seen = set()
    for seed in range(60):
        fx, fy = gt.flip(cube, label, np.random.default_rng(seed))
        axes = which_flip(fx, cube)
        assert 3 not in axes
        assert np.array_equal(fy, spatial_flips(label)[axes])
        seen.add(axes)
    assert {frozenset(), frozenset({1}), frozenset({2})} <= seen


def test_flip_z_switch_also_flips_the_z_axis():
    cube = unique_cube(seed=2)
    seen = {which_flip(gt.flip(cube, cube, np.random.default_rng(s), flip_z=True)[0], cube) for s in range(60)}
    assert any(3 in axes for axes in seen)


# ------------------------------------------------------------------------------------------------- generate_pair


def test_generate_pair_target_is_the_flipped_original_and_is_deterministic():
    cube = fixture_cube()
    before = cube.copy()
    for seed in range(6):
        inp, target = gt.generate_pair(cube, np.random.default_rng(seed))
        axes = which_flip(target, cube)
        assert 3 not in axes
        assert inp.shape == cube.shape and inp.dtype == np.float32
        assert inp.min() >= 0.0 and inp.max() <= 1.0
        again = gt.generate_pair(cube, np.random.default_rng(seed))
        assert np.array_equal(inp, again[0]) and np.array_equal(target, again[1])
    assert np.array_equal(cube, before)
    first = gt.generate_pair(cube, np.random.default_rng(0))[0]
    assert not np.array_equal(first, gt.generate_pair(cube, np.random.default_rng(1))[0])


def test_generate_pair_follows_the_configured_rates():
    cube = fixture_cube()
    identity = GenesisTransformConfig(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=0)
    inp, target = gt.generate_pair(cube, np.random.default_rng(0), identity)
    assert np.array_equal(inp, cube) and np.array_equal(target, cube)
    # painting always, out-painting only: a noise fraction of roughly F10's 0.66 (range over seeds ≈ 0.55–0.8)
    outpaint = GenesisTransformConfig(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=1, inpaint_rate=0)
    changed = np.mean([np.mean(gt.generate_pair(cube, np.random.default_rng(s), outpaint)[0] != cube)
                       for s in range(5)])
    assert 0.5 < changed < 0.85
    with pytest.raises(ValueError, match="paint_rate"):
        GenesisTransformConfig(paint_rate=1.5)
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        gt.generate_pair(cube[0], np.random.default_rng(0))


def test_default_config_is_the_official_one():
    config = GenesisTransformConfig()
    assert (config.flip_rate, config.local_rate, config.nonlinear_rate, config.paint_rate, config.outpaint_rate,
            config.inpaint_rate, config.flip_z) == (0.4, 0.5, 0.9, 0.9, 0.8, 0.2, False)


# ------------------------------------------------------------------------------------------------------- UNet3D


@pytest.fixture(scope="module")
def unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D()


def test_unet3d_parameter_count_is_fixture_f9(unet):
    assert sum(p.numel() for p in unet.parameters()) == GENESIS_N_PARAMETERS == 19_073_665
    assert sum(p.numel() for p in UNet3D(n_class=3).parameters()) == 19_073_665 + 2 * 65


def test_unet3d_names_match_the_official_checkpoint(unet):
    assert [name for name, _ in unet.named_children()] == [
        "down_tr64", "down_tr128", "down_tr256", "down_tr512", "up_tr256", "up_tr128", "up_tr64", "out_tr"]
    state = unet.state_dict()
    for key, shape in {
        "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
        "down_tr64.ops.0.bn1.running_mean": (32,),
        "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
        "down_tr512.ops.1.bn1.weight": (512,),
        "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
        "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
        "up_tr64.ops.1.bn1.running_var": (64,),
        "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
        "out_tr.final_conv.bias": (1,),
    }.items():
        assert tuple(state[key].shape) == shape, key
    # 14 conv units × (conv w, b, bn w, b, mean, var, count) + 3 up-convs × 2 + final conv × 2
    assert len(state) == 14 * 7 + 3 * 2 + 2


def test_encoder_decoder_parts_classifies_every_key(unet):
    parts = {}
    for name, p in unet.named_parameters():
        parts[UNet3D.part(name)] = parts.get(UNet3D.part(name), 0) + p.numel()
    assert parts["head"] == 65 and sum(parts.values()) == GENESIS_N_PARAMETERS
    assert parts["encoder"] > 0 and parts["decoder"] > 0
    assert UNet3D.part("module.down_tr64.ops.0.conv1.weight") == "encoder"
    assert UNet3D.part("up_tr128.up_conv.bias") == "decoder"
    with pytest.raises(ValueError):
        UNet3D.part("backbone.conv.weight")


def test_unet3d_output_shape_and_sigmoid_range(unet):
    # the full Models Genesis cube on the meta device (shapes only, no arithmetic)
    with torch.device("meta"):
        meta = UNet3D()
    assert meta(torch.empty(2, 1, 64, 64, 32, device="meta")).shape == (2, 1, 64, 64, 32)
    torch.manual_seed(1)
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        out = unet.train()(x)
        assert out.shape == x.shape and out.min() > 0 and out.max() < 1
        logits_net = UNet3D(sigmoid_output=False)
        logits_net.load_state_dict(unet.state_dict())
        logits = logits_net.train()(x)
    assert torch.allclose(torch.sigmoid(logits), out, atol=1e-6) and (logits.min() < 0 or logits.max() > 1)
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(torch.rand(1, 1, 20, 16, 8))


def test_eval_mode_depends_on_the_batch_only_with_batch_stats_at_eval():
    torch.manual_seed(2)
    x = torch.rand(2, 1, 16, 16, 8)
    other = x.clone()
    other[1] = torch.rand(1, 16, 16, 8) * 3  # only the second sample differs
    for faithful in (True, False):
        net = UNet3D(batch_stats_at_eval=faithful).eval()
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        assert len(norms) == 14 and all(isinstance(m, GenesisBatchNorm3d) for m in norms)
        assert all(m.batch_stats_at_eval is faithful for m in norms)
        with torch.no_grad():
            for m in norms:  # running statistics away from their defaults
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            stats = norms[0].running_mean.clone()
            a, b = net(x)[0], net(other)[0]
        updated = not torch.equal(stats, norms[0].running_mean)
        if faithful:  # official ContBatchNorm3d: batch statistics in eval, running stats keep moving
            assert (a - b).abs().max() > 1e-4 and updated
        else:  # standard BatchNorm3d: sample 0 does not see sample 1, nothing updated
            assert torch.allclose(a, b, atol=1e-6) and not updated


def _released_format(model: torch.nn.Module) -> dict:
    return {"epoch": 10, "state_dict": {"module." + k: v.clone() for k, v in model.state_dict().items()}}


def test_load_genesis_checkpoint_round_trip_with_module_prefix(unet, tmp_path):
    source = copy.deepcopy(unet)
    with torch.no_grad():
        for name, buffer in source.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save(_released_format(source), path)
    target = load_genesis_checkpoint(UNet3D(), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    # a checkpoint written before num_batches_tracked existed still loads
    legacy = _released_format(source)
    legacy["state_dict"] = {k: v for k, v in legacy["state_dict"].items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "legacy.pt")
    load_genesis_checkpoint(UNet3D(), tmp_path / "legacy.pt")


def test_load_genesis_checkpoint_rejects_mismatches_naming_the_file(unet, tmp_path):
    source = unet
    broken = _released_format(source)
    del broken["state_dict"]["module.up_tr64.ops.1.conv1.weight"]
    broken["state_dict"]["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken_genesis.pt"
    torch.save(broken, path)
    with pytest.raises(ValueError, match="broken_genesis.pt") as err:
        load_genesis_checkpoint(UNet3D(), path)
    assert "up_tr64.ops.1.conv1.weight" in str(err.value) and "extra.weight" in str(err.value)
    path = tmp_path / "one_class.pt"
    torch.save(_released_format(source), path)
    with pytest.raises(ValueError, match="one_class.pt"):
        load_genesis_checkpoint(UNet3D(n_class=2), path)

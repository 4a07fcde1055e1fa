"""Hierarchical dense SSL: its augmentations' invariants, the balanced pyramid's two projection modes, the loss on a
tiny backbone, and what each of the three ablation switches changes (methods/hdssl.py, ssl3d.pretrain.hdssl_parts)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl3d.pretrain.bricks.losses import voxel_info_nce
from ssl3d.pretrain.bricks.voxel_pairs import pyramid_at_voxels
from ssl3d.pretrain.hdssl_parts import (
    AppearanceTransform,
    BalancedPyramid,
    in_painting_with_boxes,
    local_pixel_shuffling,
    shuffle_plan,
)
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method

TINY_UNET = {"name": "unet", "channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 0}
PATCH = (32, 32, 16)


def build(seed: int = 0, **overrides):
    cls = get_method("hdssl")
    torch.manual_seed(seed)
    config = make_config(cls.Config, {"patch_size": list(PATCH), "batch_size": 2, "max_voxels": 64, **overrides})
    return cls(config, TINY_UNET)


def scan_region(method, seed: int = 0) -> np.ndarray:
    """A smooth 'body' (a bright ellipsoid with texture) in air, in [0, 1], prepared as the loader does."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in method.region_size()], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8
    return method.prepare_volume((body * (0.4 + 0.5 * rng.random(body.shape)))[None].astype(np.float32))


def trained_parameters(method) -> list[torch.Tensor]:
    """The backbone's encoder and decoder parameters (its output head is unused and never transfers)."""
    return [p for name, p in method.backbone.named_parameters() if method.backbone.part(name) != "head"]


def batch(method, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    views = [method.make_views(scan_region(method, seed + i), rng) for i in range(method.config.batch_size)]
    return {key: torch.from_numpy(np.stack([v[key] for v in views])) for key in views[0]}


# ------------------------------------------------------------------------------------------------ augmentations


def test_shuffle_blocks_have_the_official_fixed_size():
    rng = np.random.default_rng(0)
    corners, size, permutation = shuffle_plan(rng, (128, 128, 32), 5000)
    assert tuple(size) == (6, 6, 1) and corners.shape == (5000, 3) and sorted(permutation) == list(range(36))
    assert (corners >= 0).all() and (corners < [122, 122, 31]).all()
    assert tuple(shuffle_plan(rng, (16, 40, 8), 1)[1]) == (1, 2, 1)  # at least one voxel per axis


def test_local_shuffle_permutes_every_block_with_one_shared_permutation():
    x = np.arange(60 * 60 * 40, dtype=np.float32).reshape(1, 60, 60, 40)  # distinct values: positions are traceable
    out = local_pixel_shuffling(x, np.random.default_rng(4), prob=1.0, n_blocks=12)
    plan_rng = np.random.default_rng(4)
    plan_rng.random()  # the application coin
    corners, size, permutation = shuffle_plan(plan_rng, x.shape[1:], 12)
    assert not np.array_equal(permutation, np.arange(len(permutation)))
    written = np.zeros(x.shape[1:], dtype=int)  # how many blocks cover each voxel
    slices = [tuple(slice(c, c + s) for c, s in zip(corner, size)) for corner in corners]
    for box in slices:
        written[box] += 1
    np.testing.assert_array_equal(out[0][written == 0], x[0][written == 0])
    whole = [box for box in slices if (written[box] == 1).all()]  # blocks no other block overlaps
    assert len(whole) >= 2
    for box in whole:
        block, shuffled = x[0][box].ravel(), out[0][box].ravel()
        assert sorted(shuffled) == sorted(block)  # the block's multiset of values is kept
        np.testing.assert_array_equal(shuffled, block[permutation])  # by the one shared permutation


def test_the_intensity_curve_is_increasing_through_0_and_1_and_never_inverted():
    ramp = np.linspace(0, 1, 1001, dtype=np.float32).reshape(1, 1001, 1, 1)
    transform = AppearanceTransform(local=False)
    changed = 0
    for seed in range(20):
        out = transform(ramp, np.random.default_rng(seed)).ravel()
        assert out[0] == pytest.approx(0, abs=1e-6) and out[-1] == pytest.approx(1, abs=1e-6)
        assert (np.diff(out) >= 0).all()
        changed += not np.allclose(out, ramp.ravel())
    assert 14 <= changed <= 20  # applied with p 0.9


def test_in_painting_changes_only_box_interiors_with_uniform_noise():
    x = np.full((1, 40, 50, 20), 2.0, dtype=np.float32)  # outside [0, 1): every painted voxel is visible
    counts = []
    for seed in range(30):
        out, boxes = in_painting_with_boxes(x, np.random.default_rng(seed))
        inside = np.zeros(x.shape[1:], dtype=bool)
        for corner, size in boxes:
            assert all(d // 10 <= s < d // 5 for s, d in zip(size, x.shape[1:]))
            assert all(3 <= c < d - s - 3 for c, s, d in zip(corner, size, x.shape[1:]))
            inside[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
        assert (out[0][~inside] == 2.0).all()
        assert ((out[0][inside] >= 0) & (out[0][inside] < 1)).all()
        counts.append(len(boxes))
    assert max(counts) <= 30 and np.mean(counts) > 5  # up to 30 boxes, each while U < 0.95


def test_appearance_transform_is_seeded_and_keeps_the_view_shape():
    x = np.random.default_rng(0).random((1, 40, 40, 20), dtype=np.float32)
    a, b = (AppearanceTransform()(x, np.random.default_rng(1)) for _ in range(2))
    assert a.dtype == np.float32 and a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, x)


# ------------------------------------------------------------------------------------------------- projections


def test_fixed_random_projections_are_frozen_buffers_that_survive_a_checkpoint(tmp_path):
    method = build(seed=1, loss_weights={"info_nce": 1.0, "restoration": 0.0})  # the backbone's only path: InfoNCE
    names = {f"balance.convs.{i}.weight" for i in range(2)} | {"balance.convs.0.bias"}
    assert names <= set(method.state_dict()) and not names & {n for n, _ in method.named_parameters()}
    assert all(not b.requires_grad for b in method.balance.buffers())
    torch.save(method.state_dict(), tmp_path / "hdssl.pt")
    other = build(seed=2)
    assert not torch.equal(other.balance.convs[0].weight, method.balance.convs[0].weight)
    other.load_state_dict(torch.load(tmp_path / "hdssl.pt"))
    for key in names:
        assert torch.equal(other.state_dict()[key], method.state_dict()[key])

    optimizer = build_optimizer(method, method.config.optimizer)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not {id(b) for b in method.balance.buffers()} & in_optimizer
    before = {key: value.clone() for key, value in method.balance.state_dict().items()}
    method.total_loss(method.loss_terms(batch(method))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained_parameters(method))  # through them
    assert all(b.grad is None for b in method.balance.buffers())
    optimizer.step()
    assert all(torch.equal(before[key], value) for key, value in method.balance.state_dict().items())


def test_learned_projections_are_trained():
    method = build(projections="learned")
    params = list(method.balance.parameters())
    assert len(params) == 3 and all(p.requires_grad for p in params)
    optimizer = build_optimizer(method, method.config.optimizer)
    assert {id(p) for p in params} <= {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = [p.detach().clone() for p in params]
    method.total_loss(method.loss_terms(batch(method))).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_unknown_projections_are_named():
    with pytest.raises(ValueError, match="projections: unknown value 'frozen'"):
        BalancedPyramid([4], projections="frozen")


# ------------------------------------------------------------------------------------------------------- loss


def test_defaults_are_the_official_code():
    config = get_method("hdssl").Config()
    assert config.loss_weights == {"info_nce": 1.0, "restoration": 10.0}
    assert (config.patch_size, config.batch_size, config.max_voxels) == ((128, 128, 32), 10, 1024)
    assert config.optimizer == {"name": "adamw", "lr": 3e-4, "weight_decay": 0.0}  # Adam: no weight decay
    assert config.scheduler == {"name": "constant"} and config.grad_clip == 1.0
    assert (config.temperature, config.projection_dim, config.body_threshold) == (0.1, 128, 0.3)
    assert config.projections == "fixed_random" and config.local_augmentations and config.balanced_pyramid


def test_views_are_fixed_shape_arrays():
    method = build()
    views = method.make_views(scan_region(method), np.random.default_rng(0))
    for key in ("input1", "input2", "target1", "target2"):
        assert views[key].shape == (1, 1, *PATCH) and views[key].dtype == np.float32  # (pairs, C, X, Y, Z)
    assert views["voxels1"].shape == views["voxels2"].shape == (1, 64, 3) and views["valid"].shape == (1, 64)
    assert views["valid"].any()


def test_pairs_per_region_cuts_several_pairs_from_one_region():
    method = build(pairs_per_region=3, batch_size=1)
    data = batch(method)
    assert data["input1"].shape == (1, 3, 1, *PATCH) and data["valid"].shape == (1, 3, 64)
    assert torch.isfinite(method.total_loss(method.loss_terms(data)))


def official_loss(method, data) -> torch.Tensor:
    """The official training_step (methods.md §4.3-4.4) re-derived on the method's modules: InfoNCE written out
    with the logits blocks, plus 10 x the mean of the two views' restoration MSE."""
    data = {key: value.flatten(0, 1) for key, value in data.items()}
    valid = data["valid"].bool()
    embeds, restored = [], []
    for k in ("1", "2"):
        pyramid = method.backbone.decode(method.backbone.encode(data[f"input{k}"]))
        projected = [conv(level) for conv, level in zip(method.balance.convs, pyramid)]
        vectors = pyramid_at_voxels(projected, method.strides, data[f"voxels{k}"].long())[valid]
        embeds.append(F.normalize(method.projector(vectors)))
        restored.append(F.interpolate(method.restoration_head(pyramid[0]), size=PATCH, mode="trilinear"))
    e1, e2 = embeds
    l11, l12, l22 = e1 @ e1.T / 0.1, e1 @ e2.T / 0.1, e2 @ e2.T / 0.1
    l11.fill_diagonal_(float("-inf"))
    l22.fill_diagonal_(float("-inf"))
    nce = ((-l12.diag() + torch.logsumexp(torch.cat([l11, l12], 1), 1)).mean()
           + (-l12.diag() + torch.logsumexp(torch.cat([l12.T, l22], 1), 1)).mean()) / 2
    mse = (((restored[0] - data["target1"]) ** 2).mean() + ((restored[1] - data["target2"]) ** 2).mean()) / 2
    return nce + 10 * mse


def test_loss_is_the_official_one_finite_and_reaches_the_backbone():
    method = build()
    data = batch(method)
    terms = method.loss_terms(data)
    assert set(terms) == {"info_nce", "restoration"} and all(torch.isfinite(t) for t in terms.values())
    loss = method.total_loss(terms)
    assert torch.allclose(loss, official_loss(method, data), atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained_parameters(method))
    assert method.restoration_head.weight.grad.abs().sum() > 0


def test_the_loop_collation_float32_voxels_and_mask_give_the_same_loss():
    method = build()
    data = batch(method)
    as_float = {key: value.float() for key, value in data.items()}  # RegionViews casts every view to float32
    assert torch.equal(method.total_loss(method.loss_terms(data)), method.total_loss(method.loss_terms(as_float)))


def test_restoration_weight_zero_drops_the_head_and_its_term():
    method = build(loss_weights={"info_nce": 1.0, "restoration": 0.0})
    terms = method.loss_terms(batch(method))
    assert set(terms) == {"info_nce"}
    method.total_loss(terms).backward()
    assert method.restoration_head.weight.grad is None


def test_unbalanced_pyramid_concatenates_the_raw_levels_as_vox2vec():
    balanced, raw = build(), build(balanced_pyramid=False)
    channels = [level.channels for level in raw.backbone.decoder_levels]
    assert len(channels) == 2 and raw.balance is None
    assert balanced.projector[0].in_features == 32 * len(channels)
    assert raw.projector[0].in_features == sum(channels)
    collated = batch(raw)
    data = {key: value.flatten(0, 1) for key, value in collated.items()}
    valid = data["valid"].bool()
    embeds = [F.normalize(raw.projector(pyramid_at_voxels(raw.backbone.decode(raw.backbone.encode(data[f"input{k}"])),
                                                          raw.strides, data[f"voxels{k}"].long())[valid]))
              for k in ("1", "2")]
    assert torch.allclose(raw.loss_terms(collated)["info_nce"], voxel_info_nce(*embeds, 0.1))


def test_without_local_augmentations_the_input_is_a_monotone_remap_of_the_target():
    def order_kept(method, seed):
        views = method.make_views(scan_region(method, seed), np.random.default_rng(seed))
        order = np.argsort(views["target1"].ravel(), kind="stable")
        return bool((np.diff(views["input1"].ravel()[order]) >= -1e-6).all())

    plain, local = build(local_augmentations=False), build()
    assert all(order_kept(plain, seed) for seed in range(5))
    assert not any(order_kept(local, seed) for seed in range(5))


def test_on_fpn3d_the_official_pyramid_is_read():
    cls = get_method("hdssl")
    fpn = {"name": "fpn3d", "base_channels": 2, "num_scales": 3}
    config = {"patch_size": [16, 16, 8], "batch_size": 2, "max_voxels": 32}
    balanced = cls(make_config(cls.Config, config), fpn)
    raw = cls(make_config(cls.Config, {**config, "balanced_pyramid": False}), fpn)
    assert [c.in_channels for c in balanced.balance.convs] == [2, 4, 8]  # F_0..F_2
    assert balanced.projector[0].in_features == 3 * 32 and raw.projector[0].in_features == 2 + 4 + 8
    assert balanced.restoration_head.in_channels == 2  # official: a 1x1x1 conv on F_0
    assert torch.isfinite(balanced.total_loss(balanced.loss_terms(batch(balanced))))

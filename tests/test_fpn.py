"""vox2vec's / hierarchical dense SSL's FPN3d (``ssl3d.nets.fpn``) against the official facts (``reference/methods.md``
§4.2, §7.2, §10 F8/F9): parameter counts, state-dict keys, pyramid shapes, the linear head's computation and the
voxel lookup. The expected keys are written from the official module structure (``vox2vec/nn/fpn.py``,
``vox2vec/nn/blocks.py``), not imported from it."""

import pytest
import torch
import torch.nn.functional as F

from ssl3d.nets import build_network, parameter_part
from ssl3d.nets.fpn import FPN3d, FPN3dBackbone, from_official, to_official


def resblock_keys(prefix: str) -> list[str]:
    """Official ``ResBlock3d`` with equal channels: BN (0), Conv (2), BN (3), Conv (5) in ``layers``; no skip conv."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return [f"{prefix}layers.{i}.{name}" for i in (0, 2, 3, 5) for name in (bn if i in (0, 3) else bn[:2])]


def stack_keys(prefix: str) -> list[str]:
    """Official ``StackMoreLayers(ResBlock3d, [c] * 3)``: two blocks in ``layers``."""
    return [key for block in range(2) for key in resblock_keys(f"{prefix}layers.{block}.")]


def official_fpn_keys(num_scales: int) -> set[str]:
    keys = ["first_conv.weight", "first_conv.bias", *stack_keys("bottom_block.")]
    for i in range(num_scales - 1):
        keys += [*stack_keys(f"left_blocks.{i}."), f"down_blocks.{i}.1.weight", f"down_blocks.{i}.1.bias",
                 f"up_blocks.{i}.0.weight", f"up_blocks.{i}.0.bias", f"skip_blocks.{i}.weight",
                 f"skip_blocks.{i}.bias", *stack_keys(f"right_blocks.{i}.")]
    return set(keys)


# a few official keys of FPN3d(1, 16, 6) with their shapes (the top-down modules are indexed coarsest first)
PINNED_16_6 = {
    "first_conv.weight": (16, 1, 3, 3, 3),
    "left_blocks.0.layers.1.layers.3.running_var": (16,),
    "left_blocks.4.layers.0.layers.2.weight": (256, 256, 3, 3, 3),
    "down_blocks.4.1.weight": (512, 256, 1, 1, 1),
    "bottom_block.layers.1.layers.5.weight": (512, 512, 3, 3, 3),
    "up_blocks.0.0.weight": (256, 512, 1, 1, 1),
    "skip_blocks.0.weight": (256, 256, 1, 1, 1),
    "skip_blocks.4.weight": (16, 16, 1, 1, 1),
    "right_blocks.0.layers.1.layers.2.bias": (256,),
    "right_blocks.4.layers.0.layers.0.num_batches_tracked": (),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("base, scales, params, keys", [(16, 6, 47_624_448, 340), (32, 5, 47_567_872, 278)])
def test_official_parameter_counts_and_state_dict_keys(base, scales, params, keys):
    """F9; 2 + 28 + 62 per extra level state-dict entries (first conv, bottom, left+down+up+skip+right)."""
    network = build_network({"name": "fpn3d", "base_channels": base, "num_scales": scales}, 1, 13)
    assert count(network.fpn) == params
    state = network.fpn.state_dict()
    assert len(state) == keys == 2 + 28 + 62 * (scales - 1)
    assert set(state) == official_fpn_keys(scales)
    # the official FPNLinearHead: one Conv1³ per level to the classes, bias at level 0 only
    assert count(network.out) == 13 * base * (2 ** scales - 1) + 13  # 12,909 (32 × 5), 13,117 (16 × 6)
    assert set(network.out.state_dict()) == {"layers.0.bias", *(f"layers.{i}.weight" for i in range(scales))}
    if (base, scales) == (16, 6):
        assert {key: tuple(state[key].shape) for key in PINNED_16_6} == PINNED_16_6


def test_official_state_dicts_convert_both_ways_and_load_strictly():
    network = FPN3dBackbone(1, 3, base_channels=2, num_scales=3, head="nonlinear")
    official_fpn = FPN3d(1, 2, 3).state_dict()
    official_head = FPN3dBackbone(1, 3, 2, 3, head="nonlinear").out.state_dict()
    assert set(official_head) >= {"bottom_block.layers.0.weight", "up_blocks.1.0.weight", "skip_blocks.0.bias",
                                  "right_blocks.1.layers.5.weight", "final_block.weight"}
    state = from_official(official_fpn, official_head)
    assert all(key.startswith(("fpn.", "out.")) for key in state)
    network.load_state_dict(state, strict=True)
    fpn, head = to_official(network.state_dict())
    assert fpn.keys() == official_fpn.keys() and head.keys() == official_head.keys()
    assert all(torch.equal(fpn[k], official_fpn[k]) for k in fpn)
    assert to_official(from_official(official_fpn, official_head)) == (official_fpn, official_head)
    assert from_official(*to_official(state)) == state
    with pytest.raises(ValueError, match="outside"):
        to_official({"backbone.first_conv.weight": torch.zeros(1)})


def test_parts():
    assert parameter_part("fpn3d", "fpn.first_conv.weight") == "encoder"
    assert parameter_part("fpn3d", "fpn.left_blocks.3.layers.1.layers.0.running_mean") == "encoder"
    assert parameter_part("fpn3d", "fpn.down_blocks.0.1.weight") == "encoder"
    assert parameter_part("fpn3d", "fpn.bottom_block.layers.0.layers.2.weight") == "encoder"
    for name in ("fpn.up_blocks.0.0.weight", "fpn.skip_blocks.1.bias", "fpn.right_blocks.0.layers.0.layers.5.bias"):
        assert parameter_part("fpn3d", name) == "decoder"
    assert parameter_part("fpn3d", "out.layers.2.weight") == "head"
    assert parameter_part("fpn3d", "out.bottom_block.layers.0.weight") == "head"  # the non-linear head


@pytest.mark.parametrize("base, scales", [(2, 5), (1, 6)])
def test_pyramid_channels_and_strides_at_128_128_32(base, scales):
    network = FPN3dBackbone(1, 2, base_channels=base, num_scales=scales)
    x = torch.rand(1, 1, 128, 128, 32)
    with torch.no_grad():
        features = network.encode(x)
        decoded = network.decode(features)
    expected = [(base * 2 ** i, 128 // 2 ** i, 128 // 2 ** i, 32 // 2 ** i) for i in range(scales)]
    assert [tuple(f.shape[1:]) for f in features] == expected
    assert [tuple(p.shape[1:]) for p in decoded] == expected  # 5 levels: ... 8×8×2; 6 levels: ... 4×4×1
    assert network.encoder_levels == network.decoder_levels
    assert [(level.channels, level.stride) for level in network.decoder_levels] == [
        (base * 2 ** i, (2 ** i,) * 3) for i in range(scales)]


def official_linear_head(head: torch.nn.Module, pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The official ``FPNLinearHead`` computation written out: a 1³ conv per level, then from the coarsest level
    down: repeat every cell twice per axis (nearest ×2), cut to the next level's size, add."""
    logits = [F.conv3d(level, conv.weight, conv.bias) for level, conv in zip(pyramid, head.layers)]
    x = logits[-1]
    for finer in reversed(logits[:-1]):
        for axis in (2, 3, 4):
            x = x.repeat_interleave(2, dim=axis)
        x = x[..., :finer.shape[2], :finer.shape[3], :finer.shape[4]] + finer
    return x


@pytest.mark.parametrize("size", [(16, 16, 8), (18, 14, 10)])  # the second crops at every level
def test_linear_head_is_the_official_computation(size):
    torch.manual_seed(0)
    network = FPN3dBackbone(1, 3, base_channels=2, num_scales=3).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        pyramid = network.decode(network.encode(x))
        expected = official_linear_head(network.out, pyramid)
        assert expected.shape == (2, 3, *size)
        torch.testing.assert_close(network(x), expected)
        torch.testing.assert_close(network.head(pyramid), expected)


def test_nonlinear_head_reads_the_pyramid():
    torch.manual_seed(0)
    network = FPN3dBackbone(1, 3, base_channels=2, num_scales=3, head="nonlinear").eval()
    x = torch.rand(2, 1, 18, 14, 10)
    with torch.no_grad():
        expected = network.out(network.fpn(x))
        torch.testing.assert_close(network(x), expected)
    assert expected.shape == (2, 3, 18, 14, 10)
    with pytest.raises(ValueError, match="head 'mlp'"):
        FPN3dBackbone(1, 3, head="mlp")

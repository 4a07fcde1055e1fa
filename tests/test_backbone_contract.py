"""The contract every registered backbone meets, run automatically on each (backbones added later included):
its declared levels match the tensors, its parts classify every parameter by what actually uses it, and its
declared capabilities behave. See ``ssl3d.nets.backbone``."""

import functools
import re

import pytest
import torch

from ssl3d.nets import BACKBONES, build_network
from ssl3d.nets.backbone import CAPABILITIES, PARTS, Backbone, levels
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method
from ssl3d.validate import backbone_problems

NAMES = sorted(BACKBONES)
# parameters MONAI creates but its own forward never uses: every ViT block's LayerNorm for cross-attention, which
# UNETR does not do. They sit in ``vit.`` (encoder, so a ViT checkpoint transfers whole) but no pass trains them.
DEAD = {"unetr": re.compile(r"vit\.blocks\.\d+\.norm_cross_attn\.")}


@functools.cache
def built(name: str, classes: int = 3):
    torch.manual_seed(0)
    return build_network({"name": name, **BACKBONES[name].smallest["fields"]}, in_channels=1, out_channels=classes)


def example(name: str, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, *BACKBONES[name].smallest["input"], generator=torch.Generator().manual_seed(1))


def used_by(network: torch.nn.Module, outputs) -> set[str]:
    network.zero_grad(set_to_none=True)
    sum(o.sum() for o in outputs).backward()
    used = {n for n, p in network.named_parameters() if p.grad is not None}
    network.zero_grad(set_to_none=True)
    return used


def of_part(name: str, part: str) -> set[str]:
    return {n for n, _ in built(name).named_parameters() if BACKBONES[name].part(n) == part}


def assert_levels(maps, levels, size):
    assert len(maps) == len(levels)
    for tensor, level in zip(maps, levels):
        assert tensor.shape[1] == level.channels
        assert tuple(tensor.shape[2:]) == tuple(n // s for n, s in zip(size, level.stride))


@pytest.mark.parametrize("name", NAMES)
def test_declared_levels_are_the_tensors_and_forward_is_head_of_decode(name):
    network, x = built(name), example(name)
    with torch.no_grad():
        features = network.encode(x)
        decoded = network.decode(features)
        assert_levels(features, network.encoder_levels, x.shape[2:])
        assert_levels(decoded, network.decoder_levels, x.shape[2:])
        logits = network.head(decoded)
        assert logits.shape == (2, 3, *x.shape[2:])
    strides = [level.stride for level in network.encoder_levels]
    assert strides == sorted(strides)  # finest first


@pytest.mark.parametrize("name", NAMES)
def test_parts_classify_every_parameter_by_what_uses_it(name):
    network, x = built(name), example(name, batch=1)
    assert {BACKBONES[name].part(n) for n in network.state_dict()} == set(PARTS)
    features = network.encode(x)
    dead = {n for n in {n for n, _ in network.named_parameters()} - used_by(network, [network(x)])}
    assert all(DEAD[name].match(n) for n in dead) if name in DEAD else not dead
    assert used_by(network, features) == of_part(name, "encoder") - dead
    detached = [f.detach() for f in network.encode(x)]
    assert used_by(network, [network.head(network.decode(detached))]) == of_part(name, "decoder") | of_part(
        name, "head")


@pytest.mark.parametrize("name", NAMES)
def test_head_is_exactly_what_depends_on_the_number_of_classes(name):
    a, b = built(name, 3).state_dict(), built(name, 5).state_dict()
    differing = {n for n in a if a[n].shape != b[n].shape}
    assert differing and {n for n in a if BACKBONES[name].part(n) == "head"} == differing


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_known_and_a_region_is_refused_without_one(name):
    network = built(name)
    assert network.capabilities <= CAPABILITIES
    if "region_decoding" not in network.capabilities:
        with torch.no_grad(), pytest.raises(ValueError, match="region_decoding"):
            network.decode(network.encode(example(name)), region=(0, 1))


@pytest.mark.parametrize("name", [n for n in NAMES if "region_decoding" in BACKBONES[n].capabilities])
def test_region_decoding_decodes_the_declared_box_from_the_box_alone(name):
    """The whole box is the full decode; on a smaller box the head's output covers ``voxel_region`` and does not
    depend on any feature outside the box at any level (it is not the crop of the full decode: instance norm and
    zero padding see only the box)."""
    network, x = built(name).eval(), example(name)
    with torch.no_grad():
        features = network.encode(x)
        deepest = features[-1].shape[2:]
        whole = network.decode(features, region=((0, 0, 0), tuple(deepest)))
        torch.testing.assert_close(whole[0], network.decode(features)[0])
        box = ((0, 0, 0), tuple(max(1, n // 2) for n in deepest))
        part = network.head(network.decode(features, region=box))
        voxels = network.voxel_region(box)
        assert tuple(part.shape[2:]) == tuple(s.stop - s.start for s in voxels)
        outside = []
        for level, feature in zip(network.encoder_levels, features):
            noisy = feature + 10.0
            cells = tuple(slice(s.start // st, s.stop // st) for s, st in zip(voxels, level.stride))
            noisy[(..., *cells)] = feature[(..., *cells)]
            outside.append(noisy)
        torch.testing.assert_close(network.head(network.decode(outside, region=box)), part)
    network.train()


@pytest.mark.parametrize("name", [n for n in NAMES if "hidden_states" in BACKBONES[n].capabilities])
def test_hidden_states_rebuild_the_encoder_and_crop_before_its_blocks(name):
    network, x = built(name).eval(), example(name)
    with torch.no_grad():
        hidden = network.hidden_states(x)
        assert_levels(hidden, network.hidden_levels, x.shape[2:])
        for a, b in zip(network.encode(x, hidden), network.encode(x)):
            torch.testing.assert_close(a, b)
        box = ((0, 0, 0), (2, 2, 1))  # instance norm needs more than one voxel of the deepest map
        decoded = network.decode(network.encode(x, hidden, region=box))[0]
        voxels = network.voxel_region(box)
        assert tuple(decoded.shape[2:]) == tuple(s.stop - s.start for s in voxels)
    network.train()


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="backbone.name: unknown backbone 'vit'; known: basicunet, fpn3d, genesis_unet3d"):
        build_network({"name": "vit"}, 1, 2)


class TinyNet(Backbone, torch.nn.Module):
    """A backbone as a user adds one: one class, then one registration line."""

    name = "tiny"
    smallest = {"fields": {}, "input": (16, 16, 16)}

    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.enc = torch.nn.Conv3d(in_channels, width, 3, stride=2, padding=1)
        self.dec = torch.nn.ConvTranspose3d(width, width, 2, stride=2)
        self.out = torch.nn.Conv3d(width, out_channels, 1)
        self.encoder_levels = levels([width], [2])
        self.decoder_levels = levels([width], [1])

    @classmethod
    def part(cls, name: str) -> str:
        return {"enc": "encoder", "dec": "decoder", "out": "head"}[name.split(".")[0]]

    def encode(self, x):
        return [self.enc(x)]

    def decode(self, features, region=None):
        self.check_region(region)
        return [self.dec(features[0])]

    def head(self, decoded):
        return self.out(decoded[0])


def test_a_new_backbone_is_one_class_and_one_registration_line(monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny", TinyNet)
    assert "tiny" in get_method("byol").supported_backbones()
    assert "tiny" not in get_method("hybridmim").supported_backbones()
    assert backbone_problems({"name": "tiny", "width": 2}, "x") == []
    method = get_method("byol")
    byol = method(make_config(method.Config, {"patch_size": [16] * 3, "batch_size": 2, "projector_hidden": 8,
                                              "predictor_hidden": 8, "projection_dim": 4}), {"name": "tiny"})
    views = {key: torch.rand(2, 1, 16, 16, 16) for key in ("view1", "view2")}
    assert torch.isfinite(byol.total_loss(byol.loss_terms(views)))

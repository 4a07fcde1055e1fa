"""Backbones: the encoder pass, and the encoder / decoder / head classification that weight transfer relies on."""

import pytest
import torch

from ssl3d.nets import build_network, parameter_part

SPECS = [
    {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
    {"name": "unet", "channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1},
    {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['name']}-{len(s.get('channels', s.get('features')))}")
def test_encoder_parameters_are_exactly_those_the_encoder_pass_uses(spec):
    network = build_network(spec, in_channels=1, out_channels=3)
    features = network.encode(torch.rand(2, 1, 32, 32, 32))
    assert [f.shape[1] for f in features][-1] == network.encoder_channels[-1]
    features[-1].sum().backward()
    used = {name for name, p in network.named_parameters() if p.grad is not None}
    encoder = {name for name, _ in network.named_parameters() if parameter_part(spec["name"], name) == "encoder"}
    assert used == encoder


@pytest.mark.parametrize("spec", SPECS[1:], ids=["unet", "basicunet"])
def test_head_is_what_depends_on_the_number_of_classes(spec):
    a, b = build_network(spec, 1, 3).state_dict(), build_network(spec, 1, 5).state_dict()
    differing = {name for name in a if a[name].shape != b[name].shape}
    assert differing and all(parameter_part(spec["name"], name) == "head" for name in differing)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="backbone.name: unknown backbone 'vit'; known: basicunet, genesis_unet3d"):
        build_network({"name": "vit"}, 1, 2)

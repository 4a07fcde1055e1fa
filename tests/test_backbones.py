"""Backbone specifics beyond the contract (``test_backbone_contract.py``): the split forward passes equal MONAI's,
the constructor checks, and HybridMIM's UNet against its official counts and partial region decoding."""

import functools

import pytest
import torch
from monai.networks import nets as monai_nets

from ssl3d.nets import build_network, parameter_part

SIZE = 32
SWIN_SIZE = 64  # Swin needs sizes divisible by 32, and at 32³ the 1³ bottleneck breaks InstanceNorm
SPECS = {
    "segresnet": {"name": "segresnet", "init_filters": 4, "blocks_down": [1, 1, 2], "blocks_up": [1, 1],
                  "norm": ["GROUP", {"num_groups": 2}], "dropout_prob": 0.1},
    "unetr": {"name": "unetr", "img_size": [SIZE] * 3, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96,
              "num_heads": 4},
    "swinunetr": {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1]},
    "hybridmim_unet": {"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]},
    "unet": {"name": "unet", "channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1},
    "basicunet": {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]},
}
# the same networks as MONAI builds them, to check that the split forward passes change nothing
MONAI_TWINS = {
    "segresnet": lambda out: monai_nets.SegResNet(in_channels=1, out_channels=out, init_filters=4,
                                                  blocks_down=(1, 1, 2), blocks_up=(1, 1),
                                                  norm=("GROUP", {"num_groups": 2}), dropout_prob=0.1),
    "unetr": lambda out: monai_nets.UNETR(1, out, img_size=SIZE, feature_size=4, hidden_size=48, mlp_dim=96,
                                          num_heads=4),
    "swinunetr": lambda out: monai_nets.SwinUNETR(1, out, feature_size=12, depths=(1, 1, 1, 1)),
    "unet": lambda out: monai_nets.UNet(3, 1, out, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1,
                                        norm="instance"),
    "basicunet": lambda out: monai_nets.BasicUNet(3, 1, out, features=(4, 4, 8, 8, 16, 4),
                                                  norm=("instance", {"affine": True})),
}
TWINS = list(MONAI_TWINS)


def size(name: str) -> int:
    return SWIN_SIZE if name == "swinunetr" else SIZE


@functools.cache
def built(name: str) -> torch.nn.Module:
    """The test network of that backbone (3 classes), built once."""
    torch.manual_seed(0)
    return build_network(SPECS[name], in_channels=1, out_channels=3)


@pytest.mark.parametrize("name", TWINS)
def test_split_forward_is_monai_forward(name):
    network = built(name).eval()
    twin = MONAI_TWINS[name](3).eval()
    twin.load_state_dict(network.state_dict())
    x = torch.rand(1, 1, *[size(name)] * 3)
    with torch.no_grad():
        torch.testing.assert_close(network(x), twin(x))
    network.train()


def test_swinunetr_rejects_img_size_and_unetr_requires_it():
    with pytest.raises(ValueError, match="img_size"):
        build_network({**SPECS["swinunetr"], "img_size": [SIZE] * 3}, 1, 2)
    with pytest.raises(ValueError, match="img_size"):
        build_network({key: value for key, value in SPECS["unetr"].items() if key != "img_size"}, 1, 2)


def test_swinunetr_names_an_input_size_not_divisible_by_32():
    with pytest.raises(ValueError, match=r"divisible by 32, got \(64, 48, 64\)"):
        built("swinunetr").hidden_states(torch.rand(1, 1, 64, 48, 64))

# --- HybridMIM's UNet -----------------------------------------------------------------------------------------


def test_hybridmim_unet_has_the_official_parameter_counts():
    """methods.md F9: the official DeepUNet has 22,202,482 parameters with its three pretext heads (Linear(512, 9),
    Linear(512, 8), Linear(512, 384): 205,713) and 14,274,240 in its encoder."""
    network = build_network({"name": "hybridmim_unet"}, in_channels=1, out_channels=1)
    total = sum(p.numel() for p in network.parameters())
    encoder = sum(p.numel() for n, p in network.named_parameters() if parameter_part("hybridmim_unet", n) == "encoder")
    assert total == 22_202_482 - (512 * 9 + 9 + 512 * 8 + 8 + 512 * 384 + 384) == 21_996_769
    assert encoder == 14_274_240
    assert [level.channels for level in network.encoder_levels] == [64, 64, 128, 256, 512]
    assert [level.stride for level in network.encoder_levels][-2:] == [(8, 8, 8)] * 2
    assert network.voxel_region((4, 12)) == (slice(32, 96),) * 3  # the official box of a 96³ crop


def test_hybridmim_unet_dropout_only_in_conv_0_and_the_upcats():
    network = build_network({"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]}, 1, 1)
    with_dropout = {n.split(".")[0] for n, m in network.named_modules()
                    if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert with_dropout == {"conv_0", "upcat_1", "upcat_2", "upcat_3", "upcat_4"}


def test_hybridmim_unet_spatial_path_and_partial_region_decoding():
    network = built("hybridmim_unet").eval()
    x = torch.rand(2, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        features = network.encode(x)
        assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 4]  # last pool is 1 (official 96→48→24→12→12)
        partial = network.head(network.decode(features, region=(1, 3)))
        assert partial.shape == (2, 3, 16, 16, 16)
        assert network.voxel_region((1, 3)) == (slice(8, 24),) * 3
        anisotropic = network.decode(features, region=((0, 1, 2), (2, 4, 3)))[0]
        assert anisotropic.shape == (2, 4, 16, 24, 8)
        assert network.voxel_region(((0, 1, 2), (2, 4, 3))) == (slice(0, 16), slice(8, 32), slice(16, 24))
        whole = network.head(network.decode(features, region=(0, 4)))
        torch.testing.assert_close(whole, network(x))
        with pytest.raises(ValueError, match="beyond"):
            network.decode(features, region=(2, 5))
    network.train()

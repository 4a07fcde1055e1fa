"""HybridMIM on MONAI's SwinUNETR (methods.md §2.3): partial region decoding of ``SplitSwinUNETR`` (the input and
every hidden state cropped before the encoder's conv blocks, as the official ``swinunetr.py``) and what the pretext
heads read (the last hidden state's tokens; token 1 alone for the contrast head)."""

import functools
import warnings

import pytest
import torch

from ssl3d.nets import build_network
from ssl3d.pretrain.hybridmim_parts import region_features
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method

SWIN = {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
SWIN_WITH_DROPOUT = {**SWIN, "drop_rate": 0.1}  # the official SimCSE dropout
HYBRIDMIM = get_method("hybridmim")


@functools.cache
def swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(SWIN, in_channels=1, out_channels=2).eval()


def cropped(network, x, hidden, region):
    return network.head(network.decode(network.encode(x, hidden, region=region)))


def method(backbone: dict = SWIN_WITH_DROPOUT, **config):
    settings = {"patch_size": [96] * 3, "batch_size": 2, "region_position": "corner", **config}
    return HYBRIDMIM(make_config(HYBRIDMIM.Config, settings), backbone)


def test_region_boxes_are_the_official_stages():
    """(1, 3) of a 96³ crop's 3³ bottleneck: [2:6]³ of hidden state 3, .., [32:96]³ of the input."""
    network = swin()
    assert network.region_boxes((1, 3)) == [(slice(a, b),) * 3 for a, b in
                                            ((32, 96), (16, 48), (8, 24), (4, 12), (2, 6), (1, 3))]
    assert network.voxel_region(((0, 1, 1), (1, 2, 2))) == (slice(0, 32), slice(32, 64), slice(32, 64))
    with pytest.raises(ValueError, match="non-empty"):
        network.region_boxes((2, 2))


@pytest.mark.parametrize("size, region, voxels", [(96, (1, 3), (64, 64, 64)),
                                                   (64, ((0, 0, 1), (2, 1, 2)), (64, 32, 32))])
def test_cropped_decode_covers_the_voxel_region(size, region, voxels):
    network = swin()
    x = torch.rand(2, 1, size, size, size)
    with torch.no_grad():
        out = cropped(network, x, network.hidden_states(x), region)
    assert out.shape == (2, 2, *voxels)
    assert tuple(s.stop - s.start for s in network.voxel_region(region)) == voxels


def test_the_whole_region_is_monai_forward_and_a_region_past_the_bottleneck_is_named():
    network = swin()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        hidden = network.hidden_states(x)
        assert torch.equal(cropped(network, x, hidden, (0, 2)), network(x))
        with pytest.raises(ValueError, match=r"region \(1, 3\) reaches \(96, 96, 96\), beyond the \(64, 64, 64\) map"):
            network.encode(x, hidden, region=(1, 3))


def test_the_region_sees_only_its_box_at_every_level():
    """Given the Swin's hidden states, the cropped output depends on the box of the input and of each hidden state
    alone: the crop comes before encoder1..4 and encoder10 (cropping their outputs instead would let the values
    outside in through the 3³ convs and the instance norms)."""
    network = swin()
    x = torch.rand(1, 1, 64, 64, 64)
    region = ((0, 0, 1), (2, 1, 2))
    with torch.no_grad():
        levels = [x, *network.hidden_states(x)]
        reference = cropped(network, levels[0], levels[1:], region)
        for level, box in enumerate(network.region_boxes(region)):
            changed = levels[level] + 1
            changed[(..., *box)] = levels[level][(..., *box)]  # everything outside the box changed
            swapped = levels[:level] + [changed] + levels[level + 1:]
            assert torch.equal(cropped(network, swapped[0], swapped[1:], region), reference), level
        inside = x.clone()
        inside[(..., *network.voxel_region(region))] += 1
        assert not torch.equal(cropped(network, inside, levels[1:], region), reference)


def test_heads_read_the_last_hidden_state_tokens_and_decode_the_official_box():
    hybridmim = method().eval()
    x = torch.rand(2, 1, 96, 96, 96)
    with torch.no_grad():
        bottleneck, decode = hybridmim._encode(x)
        assert torch.equal(bottleneck, hybridmim.network.hidden_states(x)[-1])  # not encoder10's output
        assert bottleneck.shape == (2, 16 * 12, 3, 3, 3)
        regions = region_features(bottleneck, regions_per_axis=3)
        assert torch.equal(regions, bottleneck.flatten(start_dim=2).transpose(1, 2))  # one token per sub-volume
        assert hybridmim.count_head(regions).shape == (2, 27, 9)
        assert hybridmim.position_head(regions).shape == (2, 27, 8)
        box = hybridmim._target_box(bottleneck.shape[-1], 96)
        assert box == (1, 3) and hybridmim.network.voxel_region(box) == (slice(32, 96),) * 3
        assert hybridmim.network.head(decode(box)).shape == (2, 1, 64, 64, 64)


def test_contrast_reads_token_1_on_the_swin_and_the_mean_on_the_unet():
    for hybridmim, channels, cells, touched in (
            (method(), 192, 3, lambda grad: grad.flatten().nonzero().flatten().tolist() == [1]),
            (method({"name": "hybridmim_unet", "features": [4, 4, 8, 8, 16]}, patch_size=[32] * 3), 16, 4,
             lambda grad: bool((grad == grad.flatten()[0]).all() and grad.flatten()[0] != 0))):
        bottleneck = torch.randn(2, channels, cells, cells, cells, requires_grad=True)
        hybridmim.contrast_head(hybridmim._contrast_input(bottleneck)).sum().backward()
        assert touched(bottleneck.grad.abs().sum(dim=(0, 1))), hybridmim.backbone_spec["name"]


def test_loss_terms_at_the_official_size():
    hybridmim = method()
    torch.manual_seed(0)
    x = torch.rand(2, 1, 96, 96, 96)
    mask = torch.zeros(2, 216)
    mask[:, ::3] = 1
    terms = hybridmim.loss_terms({"input": x, "target": x, "mask": mask})
    assert set(terms) == set(hybridmim.config.loss_weights)
    assert all(torch.isfinite(t) for t in terms.values())


def test_a_64_voxel_region_cannot_be_centred_on_the_swin_grid():
    with pytest.raises(ValueError, match=r"hybridmim.region_position: .*cannot be centred.*region_position: corner"):
        method(region_position="center")._target_box(3, 96)


def test_a_one_cell_region_is_named_on_the_swin():
    with pytest.raises(ValueError, match=r"hybridmim.reconstruction_size: 32 is one 32-voxel bottleneck cell"):
        method(patch_size=[64] * 3, reconstruction_size=32)._target_box(2, 64)


def test_a_swin_without_dropout_is_warned_about_when_the_contrastive_term_counts():
    with pytest.warns(UserWarning, match="give the backbone a dropout of 0.1"):
        method(SWIN)
    weights = {**HYBRIDMIM.Config().loss_weights, "contrastive": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method()
        method(SWIN, loss_weights=weights)

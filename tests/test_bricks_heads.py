"""The shared projector / predictor heads."""

from __future__ import annotations

import pytest
import torch

from ssl3d.pretrain.bricks.heads import conv_head, mlp_head, voxel_projector


def test_mlp_head_shapes():
    head = mlp_head(32, 64, 8)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head(torch.randn(5, 32)).shape == (5, 8)


@pytest.mark.parametrize("train", [True, False])
def test_conv_head_on_one_voxel_equals_mlp_head_with_the_same_weights(train):
    torch.manual_seed(0)
    conv, mlp = conv_head(32, 64, 8), mlp_head(32, 64, 8)
    assert [type(m) for m in conv] == [torch.nn.Conv3d, torch.nn.BatchNorm3d, torch.nn.ReLU, torch.nn.Conv3d]
    for source, target in zip(conv.parameters(), mlp.parameters(), strict=True):
        with torch.no_grad():
            target.copy_(source.reshape(target.shape))
    with torch.no_grad():  # non-trivial running statistics for eval mode
        conv[1].running_mean.normal_()
        conv[1].running_var.uniform_(0.5, 2.0)
        mlp[1].running_mean.copy_(conv[1].running_mean)
        mlp[1].running_var.copy_(conv[1].running_var)
    conv.train(train), mlp.train(train)
    x = torch.randn(5, 32, 1, 1, 1)
    out = conv(x)
    assert out.shape == (5, 8, 1, 1, 1)
    torch.testing.assert_close(out.flatten(start_dim=1), mlp(x.flatten(start_dim=1)))
    assert conv(torch.randn(2, 32, 3, 4, 2)).shape == (2, 8, 3, 4, 2)


def test_voxel_projector_is_the_official_three_layer_mlp():
    head = voxel_projector(40, 8)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert [(m.in_features, m.out_features) for m in head[::3]] == [(40, 40), (40, 40), (40, 8)]
    assert head(torch.randn(5, 40)).shape == (5, 8)

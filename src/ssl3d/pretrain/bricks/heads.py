"""Projector and predictor heads, kept in one place so that methods citing the same head build the same layers.

BYOL, PGL, vox2vec, hierarchical dense SSL and the contrastive methods put small heads on top of the encoder and throw them away after
pre-training; whether a head is an MLP on pooled vectors or its 1×1×1 convolutional twin on feature maps should be
the only difference between two methods that use them, which ``tests/test_bricks_heads.py`` checks.
"""

from __future__ import annotations

import torch


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> torch.nn.Sequential:
    """BYOL's projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear (4096 hidden, 256 out in BYOL)."""
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.BatchNorm1d(hidden_dim),
                               torch.nn.ReLU(inplace=True), torch.nn.Linear(hidden_dim, out_dim))


def conv_head(in_channels: int, hidden: int, out: int) -> torch.nn.Sequential:
    """PGL's voxel-wise projector / predictor: 1×1×1 Conv3d -> BatchNorm3d -> ReLU -> 1×1×1 Conv3d.

    The convolutional form of :func:`mlp_head` (PGL: conv 4096, BN, ReLU, conv 256), applied at every voxel of a
    (B, C, X, Y, Z) map; batch norm pools its statistics over the batch and all voxels.
    """
    return torch.nn.Sequential(torch.nn.Conv3d(in_channels, hidden, kernel_size=1), torch.nn.BatchNorm3d(hidden),
                               torch.nn.ReLU(inplace=True), torch.nn.Conv3d(hidden, out, kernel_size=1))


def voxel_projector(dim: int, out_dim: int) -> torch.nn.Sequential:
    """vox2vec's and hierarchical dense SSL's projector of voxel embeddings (methods.md §4.3, §7.2):
    Linear(D, D) -> BN -> ReLU -> Linear(D, D) -> BN -> ReLU -> Linear(D, out); the caller L2-normalises its output."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, dim), torch.nn.BatchNorm1d(dim), torch.nn.ReLU(inplace=True),
        torch.nn.Linear(dim, dim), torch.nn.BatchNorm1d(dim), torch.nn.ReLU(inplace=True),
        torch.nn.Linear(dim, out_dim))

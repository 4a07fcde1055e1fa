"""vox2vec's ``FPN3d`` (Goncharov et al., MICCAI 2023), the backbone of vox2vec and of hierarchical dense SSL (Kats et
al., ISBI 2024), behind the suite's backbone interface (``reference/methods.md`` §4.2, §4.3, §4.8, §7.2, §7.6).

Why hand-written: MONAI has no 3D FPN of this kind (its FPN blocks are 2D / detection oriented), and released
weights (vox2vec's ``FPN3d(1, 16, 6)``, HDSSL's ``FPN3d(1, 32, 5)``) only load into a module with the official
structure and names. Written from the official ``vox2vec/nn/fpn.py``, ``vox2vec/nn/blocks.py`` and
``vox2vec/nn/functional/fpn.py`` (HDSSL's ``hb_ssl/nn`` copies are the same code); nothing is vendored.

What is official (module and parameter names included, so ``FPN3d().state_dict()`` has the official keys):

* ``ResBlock3d``: pre-activation residual block, BN → ReLU → Conv → BN → ReLU → Conv plus the identity (every use
  keeps the channels, so the official 1³ ``skip`` conv for a channel change never exists and is left out).
  A stack of them is ``StackMoreLayers`` (``layers.N``).
* ``FPN3d(in_channels, base_channels, num_scales)``: ``first_conv`` Conv3³(in → c); per level i < S−1
  ``left_blocks.i`` (2 ResBlocks, its output is the skip map), ``down_blocks.i`` = MaxPool(2, ceil_mode) →
  Conv1³(c → 2c); ``bottom_block`` (2 ResBlocks at 2^(S−1)·c); top-down, coarsest first, ``up_blocks.i`` =
  Conv1³(2c → c) → nearest ×2, cropped to the skip map's size, plus ``skip_blocks.i`` = Conv1³ of the skip map,
  then ``right_blocks.i`` (2 ResBlocks). Output: the pyramid F_0..F_{S−1}, base·2^i channels at stride 2^i.
  Parameters: ``FPN3d(1, 16, 6)`` 47,624,448 (vox2vec), ``FPN3d(1, 32, 5)`` 47,567,872 (HDSSL). The official
  ``deep`` flag (more blocks at coarse levels) is used by neither paper and is left out.
* ``FPNLinearHead``: a Conv1³ per level to the classes (bias only at level 0); from the coarsest level down, up-sample
  ×2 nearest, crop to the next level's size, add. ``FPNNonLinearHead``: a top-down path of its own (Conv1³ up,
  Conv1³ skip, kernel-1 ResBlocks) and a final Conv1³ to the classes. The official downstream runs use the linear
  head (fine-tuning, linear probing) and the non-linear one for non-linear probing.
* The voxel lookup of vox2vec / HDSSL (official ``select_from_pyramid``) is the shared brick
  ``ssl3d.pretrain.bricks.voxel_pairs.pyramid_at_voxels`` (batched, per-axis strides).

The backbone :class:`FPN3dBackbone` (``fpn3d``) holds the official network as ``fpn`` and the head as ``out``, so
its keys are the official ``FPN3d`` keys under ``fpn.`` and the official head's keys under ``out.``
(:func:`from_official` / :func:`to_official` convert). The official downstream module (``EndToEnd``) names them
``backbone.`` and ``head.``; renaming that Lightning prefix is left to the checkpoint loader. (``head`` is the
interface's method, which a sub-module of that name would hide.)

Parts: ``first_conv``, ``left_blocks``, ``down_blocks`` and ``bottom_block`` are the encoder (``encode`` returns the
left maps finest first, then the bottom); ``up_blocks``, ``skip_blocks`` and ``right_blocks`` the decoder
(``decode`` returns the official pyramid F_0..F_{S−1}, whose levels are the encoder's: base·2^i channels at stride
2^i); the head module is ``out``, which reads the whole pyramid. With the non-linear head, ``out`` also holds
class-independent layers (its own top-down path): they are trained from scratch downstream, as officially, so they
count as head and never transfer.

Sizes: pooling uses ``ceil_mode``, so an input size n gives ceil(n / 2^i) at level i; the declared levels
(``n / stride``) hold for inputs divisible by 2^(S−1), e.g. 128×128×32 with 5 or 6 levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.nets.backbone import Backbone, levels
from ssl3d.nets.split import by_prefix

FPN_PREFIX = "fpn."
HEAD_PREFIX = "out."
HEADS = ("linear", "nonlinear")
ENCODER = tuple(FPN_PREFIX + name + "." for name in ("first_conv", "left_blocks", "down_blocks", "bottom_block"))


def crop_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` cut to the spatial size of ``reference`` (keeping the first cells), as the official top-down paths."""
    return x[(..., *(slice(n) for n in reference.shape[-3:]))]


class ResBlock3d(nn.Module):
    """Pre-activation residual block with the identity skip (official names: ``layers.0`` .. ``layers.5``)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        padding = kernel_size // 2  # the official FPN passes padding=1 with 3³ kernels; the head's 1³ kernels none
        self.layers = nn.Sequential(
            nn.BatchNorm3d(channels), nn.ReLU(), nn.Conv3d(channels, channels, kernel_size, padding=padding),
            nn.BatchNorm3d(channels), nn.ReLU(), nn.Conv3d(channels, channels, kernel_size, padding=padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x


class StackMoreLayers(nn.Module):
    """``blocks`` ResBlocks in a row (official name and key ``layers.N``)."""

    def __init__(self, channels: int, blocks: int = 2):
        super().__init__()
        self.layers = nn.Sequential(*(ResBlock3d(channels) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FPN3d(nn.Module):
    """The official ``FPN3d``: ``forward(x)`` is the pyramid F_0..F_{S−1}, finest first (module docstring)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_scales: int = 5):
        super().__init__()
        if num_scales < 1 or base_channels < 1:
            raise ValueError(f"fpn3d: base_channels and num_scales must be positive, got {base_channels}, "
                             f"{num_scales}")
        self.base_channels, self.num_scales = base_channels, num_scales
        widths = [base_channels * 2 ** i for i in range(num_scales)]
        self.first_conv = nn.Conv3d(in_channels, base_channels, kernel_size=3, padding=1)
        self.left_blocks = nn.ModuleList(StackMoreLayers(c) for c in widths[:-1])
        self.down_blocks = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(kernel_size=2, ceil_mode=True), nn.Conv3d(c, 2 * c, kernel_size=1))
            for c in widths[:-1])
        self.bottom_block = StackMoreLayers(widths[-1])
        coarsest_first = widths[-2::-1]  # the top-down modules are indexed from the coarsest level, as officially
        self.up_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1), nn.Upsample(scale_factor=2, mode="nearest"))
            for c in coarsest_first)
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in coarsest_first)
        self.right_blocks = nn.ModuleList(StackMoreLayers(c) for c in coarsest_first)

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The left maps, finest first, then the bottom block's map (the encoder)."""
        x, maps = self.first_conv(x), []
        for left, down in zip(self.left_blocks, self.down_blocks):
            x = left(x)
            maps.append(x)
            x = down(x)
        return [*maps, self.bottom_block(x)]

    def top_down(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The output pyramid from :meth:`bottom_up`'s maps, finest first (its coarsest level is the bottom map)."""
        x, pyramid = maps[-1], [maps[-1]]
        for up, skip, right, left in zip(self.up_blocks, self.skip_blocks, self.right_blocks, maps[-2::-1]):
            x = right(crop_like(up(x), left) + skip(left))
            pyramid.insert(0, x)
        return pyramid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.top_down(self.bottom_up(x))


class FPNLinearHead(nn.Module):
    """The official linear head: Conv1³ per level (bias at level 0 only), summed from the coarsest level down."""

    def __init__(self, base_channels: int, num_scales: int, num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv3d(base_channels * 2 ** i, num_classes, kernel_size=1, bias=i == 0)
                                    for i in range(num_scales))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = [layer(level) for layer, level in zip(self.layers, pyramid, strict=True)]
        x = logits[-1]
        for finer in logits[-2::-1]:
            x = crop_like(self.up(x), finer) + finer
        return x


class FPNNonLinearHead(nn.Module):
    """The official non-linear head: its own top-down path with kernel-1 ResBlocks, then Conv1³ to the classes."""

    def __init__(self, base_channels: int, num_scales: int, num_classes: int):
        super().__init__()
        coarsest_first = [base_channels * 2 ** i for i in range(num_scales - 2, -1, -1)]
        self.bottom_block = ResBlock3d(base_channels * 2 ** (num_scales - 1), kernel_size=1)
        self.up_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1), nn.Upsample(scale_factor=2, mode="nearest"))
            for c in coarsest_first)
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in coarsest_first)
        self.right_blocks = nn.ModuleList(ResBlock3d(c, kernel_size=1) for c in coarsest_first)
        self.final_block = nn.Conv3d(base_channels, num_classes, kernel_size=1)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(pyramid) != len(self.up_blocks) + 1:
            raise ValueError(f"FPNNonLinearHead: {len(pyramid)} levels for a head of {len(self.up_blocks) + 1}")
        x = self.bottom_block(pyramid[-1])
        for up, skip, right, finer in zip(self.up_blocks, self.skip_blocks, self.right_blocks, pyramid[-2::-1]):
            x = right(crop_like(up(x), finer) + skip(finer))
        return self.final_block(x)


def from_official(fpn_state: dict, head_state: dict | None = None) -> dict:
    """An official ``FPN3d`` state dict (and optionally an official head's) → this backbone's keys."""
    state = {FPN_PREFIX + key: value for key, value in fpn_state.items()}
    state.update({HEAD_PREFIX + key: value for key, value in (head_state or {}).items()})
    return state


def to_official(state: dict) -> tuple[dict, dict]:
    """This backbone's state dict → (official ``FPN3d`` state dict, official head state dict)."""
    fpn = {key.removeprefix(FPN_PREFIX): value for key, value in state.items() if key.startswith(FPN_PREFIX)}
    head = {key.removeprefix(HEAD_PREFIX): value for key, value in state.items() if key.startswith(HEAD_PREFIX)}
    if len(fpn) + len(head) != len(state):
        unknown = sorted(key for key in state if not key.startswith((FPN_PREFIX, HEAD_PREFIX)))
        raise ValueError(f"fpn3d: keys outside fpn. and out.: {unknown[:5]}")
    return fpn, head


class FPN3dBackbone(Backbone, nn.Module):
    """``fpn3d``: the official FPN3d (``fpn.``) and its linear or non-linear head (``out.``); module docstring.

    ``encode`` gives the left maps and the bottom, ``decode`` the official output pyramid F_0..F_{S−1}, ``head`` the
    official head on that pyramid.
    """

    name = "fpn3d"
    smallest = {"fields": {"base_channels": 2, "num_scales": 3}, "input": (16, 16, 16)}  # 16: MIM mask patches

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, num_scales: int = 5,
                 head: str = "linear"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"fpn3d: head {head!r}; use one of {', '.join(HEADS)}")
        self.fpn = FPN3d(in_channels, base_channels, num_scales)
        self.out = (FPNLinearHead if head == "linear" else FPNNonLinearHead)(base_channels, num_scales, out_channels)
        pyramid = levels([base_channels * 2 ** i for i in range(num_scales)], [2 ** i for i in range(num_scales)])
        self.encoder_levels = self.decoder_levels = pyramid

    @classmethod
    def part(cls, name: str) -> str:
        return by_prefix(name, ENCODER, (HEAD_PREFIX,))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn.bottom_up(x)

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        return self.fpn.top_down(features)

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.out(decoded)

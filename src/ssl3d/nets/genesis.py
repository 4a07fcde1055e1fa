"""The Models Genesis 3D UNet (Zhou et al., MICCAI 2019 / MedIA 2021), re-implemented from its description.

Architecture (methods.md §5.2): every convolution unit is ``Conv3d(3³, pad 1) → batch norm → ReLU``.

* encoder: 1→32→64 | max-pool 2 | 64→64→128 | pool | 128→128→256 | pool | 256→256→512 (no pool);
* decoder: ``ConvTranspose3d(k=2, s=2)`` keeping the channel count (512, 256, 128), concatenation with the
  encoder skip (256 / 128 / 64 channels), two convolution units down to 256 / 128 / 64 channels;
* head: ``Conv3d(1³, 64 → n_class)`` followed by a sigmoid inside the model (switchable, see below).

With ``n_class=1`` the network has exactly 19,073,665 parameters (methods.md fixture F9).

Module and parameter names follow the released PyTorch checkpoint ``Genesis_Chest_CT.pt`` (whose keys carry a
``module.`` prefix from ``nn.DataParallel``): ``down_tr64 / down_tr128 / down_tr256 / down_tr512`` (each with
``ops``, a Sequential of two units with ``conv1`` and ``bn1``, and ``maxpool``), ``up_tr256 / up_tr128 /
up_tr64`` (``up_conv`` and ``ops``) and ``out_tr.final_conv``, so the checkpoint loads with
``load_state_dict(strict=True)`` through :func:`load_genesis_checkpoint`.

Two switches make the official behaviour explicit rather than silent:

* ``batch_stats_at_eval`` (default True, faithful): the official batch norm always normalises with the
  statistics of the current batch, also in ``eval()`` mode, and keeps updating its running statistics there;
  False gives standard ``BatchNorm3d`` behaviour (running statistics at evaluation).
* ``sigmoid_output`` (default True, faithful): the official model ends with a sigmoid because its pretext task
  regresses intensities in [0, 1]; segmentation fine-tuning with a logits-based loss wants it off.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssl3d.nets.backbone import Backbone, levels

GENESIS_N_PARAMETERS = 19_073_665  # UNet3D(n_class=1), methods.md fixture F9

ENCODER_BLOCKS = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
DECODER_BLOCKS = ("up_tr256", "up_tr128", "up_tr64")
HEAD_BLOCK = "out_tr"


class GenesisBatchNorm3d(nn.BatchNorm3d):
    """``BatchNorm3d`` that can keep normalising with batch statistics in eval mode (the official quirk).

    Why it exists: the official ``ContBatchNorm3d`` of Models Genesis calls ``F.batch_norm(..., training=True)``
    unconditionally, so in ``eval()`` mode a sample's output depends on the other samples in its batch and the
    running statistics keep being updated. The released weights were trained (and their authors evaluated them)
    that way, so ``batch_stats_at_eval=True`` (default) reproduces it; ``batch_stats_at_eval=False`` gives the
    standard ``BatchNorm3d`` behaviour (running statistics in eval mode, nothing updated). In training mode both
    settings behave like ``BatchNorm3d``.
    """

    def __init__(self, num_features: int, batch_stats_at_eval: bool = True, **kwargs):
        super().__init__(num_features, **kwargs)
        self.batch_stats_at_eval = batch_stats_at_eval

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        if self.training or not self.batch_stats_at_eval:
            return super().forward(input)
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            training=True, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_stats_at_eval={self.batch_stats_at_eval}"


class LUConv(nn.Module):
    """Conv3d 3³ (padding 1) → batch norm → ReLU; attribute names as in the official checkpoint."""

    def __init__(self, in_channels: int, out_channels: int, batch_stats_at_eval: bool = True):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = GenesisBatchNorm3d(out_channels, batch_stats_at_eval=batch_stats_at_eval)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_units(in_channels: int, mid_channels: int, out_channels: int, batch_stats_at_eval: bool) -> nn.Sequential:
    return nn.Sequential(LUConv(in_channels, mid_channels, batch_stats_at_eval),
                         LUConv(mid_channels, out_channels, batch_stats_at_eval))


class DownTransition(nn.Module):
    """Two units (``ops``) then a 2× max-pool, except at the bottom; returns ``(output, skip)``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pool: bool,
                 batch_stats_at_eval: bool = True):
        super().__init__()
        self.ops = _two_units(in_channels, mid_channels, out_channels, batch_stats_at_eval)
        self.maxpool = nn.MaxPool3d(2)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (self.maxpool(skip) if self.pool else skip), skip


class UpTransition(nn.Module):
    """``up_conv`` (ConvTranspose3d k=2 s=2, channels kept), concatenation with the skip, two units (``ops``)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, batch_stats_at_eval: bool = True):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_units(in_channels + skip_channels, out_channels, out_channels, batch_stats_at_eval)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class OutputTransition(nn.Module):
    """``final_conv`` (Conv3d 1³), then a sigmoid when ``sigmoid_output``."""

    def __init__(self, in_channels: int, n_class: int, sigmoid_output: bool = True):
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, n_class, kernel_size=1)
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_conv(x)
        return torch.sigmoid(out) if self.sigmoid_output else out


class UNet3D(Backbone, nn.Module):
    """The Models Genesis 3D UNet; input ``(B, 1, X, Y, Z)`` with X, Y, Z divisible by 8.

    ``n_class``: output channels. ``sigmoid_output``: apply the sigmoid inside the model (official pretext
    setting; set False to get logits for segmentation fine-tuning). ``batch_stats_at_eval``: see
    :class:`GenesisBatchNorm3d` (True = official behaviour).
    """

    name = "genesis_unet3d"
    smallest = {"fields": {}, "input": (16, 16, 16)}  # 16: two voxels at the bottom (three poolings)

    def __init__(self, n_class: int = 1, sigmoid_output: bool = True, batch_stats_at_eval: bool = True,
                 in_channels: int = 1):
        super().__init__()
        self.encoder_levels = levels([64, 128, 256, 512], [1, 2, 4, 8])
        self.decoder_levels = self.encoder_levels[:3]
        b = batch_stats_at_eval
        self.down_tr64 = DownTransition(in_channels, 32, 64, pool=True, batch_stats_at_eval=b)
        self.down_tr128 = DownTransition(64, 64, 128, pool=True, batch_stats_at_eval=b)
        self.down_tr256 = DownTransition(128, 128, 256, pool=True, batch_stats_at_eval=b)
        self.down_tr512 = DownTransition(256, 256, 512, pool=False, batch_stats_at_eval=b)
        self.up_tr256 = UpTransition(512, 256, 256, batch_stats_at_eval=b)
        self.up_tr128 = UpTransition(256, 128, 128, batch_stats_at_eval=b)
        self.up_tr64 = UpTransition(128, 64, 64, batch_stats_at_eval=b)
        self.out_tr = OutputTransition(64, n_class, sigmoid_output=sigmoid_output)

    @classmethod
    def build(cls, in_channels: int, out_channels: int, batch_stats_at_eval: bool = True) -> UNet3D:
        """Logits out (the sigmoid of the restoration task is the method's)."""
        return cls(n_class=out_channels, sigmoid_output=False, batch_stats_at_eval=batch_stats_at_eval,
                   in_channels=in_channels)

    @classmethod
    def part(cls, name: str) -> str:
        """For a UNet3D parameter/buffer name (a ``module.`` prefix is ok)."""
        block = name.removeprefix("module.").split(".", 1)[0]
        if block in ENCODER_BLOCKS:
            return "encoder"
        if block in DECODER_BLOCKS:
            return "decoder"
        if block == HEAD_BLOCK:
            return "head"
        raise ValueError(f"{name!r} is not a Models Genesis UNet3D parameter name")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three skips (64, 128, 256 channels) and the bottom (512 channels, 1/8 resolution)."""
        if any(size % 8 for size in x.shape[2:]):
            raise ValueError(f"UNet3D needs spatial sizes divisible by 8, got {tuple(x.shape[2:])}")
        out, skip64 = self.down_tr64(x)
        out, skip128 = self.down_tr128(out)
        out, skip256 = self.down_tr256(out)
        return [skip64, skip128, skip256, self.down_tr512(out)[0]]

    def decode(self, features: list[torch.Tensor], region=None) -> list[torch.Tensor]:
        self.check_region(region)
        skip64, skip128, skip256, bottom = features
        d256 = self.up_tr256(bottom, skip256)
        d128 = self.up_tr128(d256, skip128)
        return [self.up_tr64(d128, skip64), d128, d256]

    def head(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return self.out_tr(decoded[0])


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> OrderedDict:
    stripped = OrderedDict((key.removeprefix("module."), value) for key, value in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # keeps the per-module versions torch uses when loading old batch-norm entries
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if key == "module" else key.removeprefix("module."), value) for key, value in metadata.items())
    return stripped


def load_genesis_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a released Models Genesis checkpoint (e.g. ``Genesis_Chest_CT.pt``) into ``model`` and return it.

    The released format is a dict whose ``state_dict`` entry holds the weights with ``module.``-prefixed keys
    (saved from ``nn.DataParallel``); the prefix is stripped (keys without it are accepted too, and so is a bare
    state dict). Loading is strict; missing ``num_batches_tracked`` buffers are tolerated (torch fills them for
    checkpoints written before they existed). Raises ``ValueError`` naming the file when the keys or shapes do not
    match the model. The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
    """
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise ValueError(f"{path}: not a Models Genesis checkpoint (expected a dict with a 'state_dict' entry)")
    state = _strip_module_prefix(state)
    expected = set(model.state_dict())
    given = set(state)
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint keys do not match the model: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: checkpoint does not fit the model: {err}") from err
    return model

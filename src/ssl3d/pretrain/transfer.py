"""Verified weight transfer from a pre-trained method into a downstream segmentation network.

Following nnssl's lesson, the mapping is checked before any pre-training step runs (on a freshly built method and
downstream network), so a wrong prefix or a shape mismatch fails in seconds, not after hours of pre-training;
fine-tuning runs the same check when it loads the checkpoint and records the report in its manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ssl3d.nets import parameter_part
from ssl3d.pretrain.method import Transfer

PARTS = ("encoder", "decoder", "head")


class TransferError(ValueError):
    """The declared transfer does not fit the downstream network."""


@dataclass
class TransferReport:
    loaded: int                  # downstream tensors initialised (parameters and buffers)
    fractions: dict[str, float]  # per part: fraction of the downstream parameters (by count) initialised
    unused: list[str]            # pre-trained tensors under a transfer prefix that the downstream net has no use for
    method: str | None = None           # the checkpoint's method and its version, so that a fine-tuning run's
    method_version: str | None = None   # manifest says which code pre-trained it (the leaderboard flags stale runs)

    def as_dict(self) -> dict:
        return asdict(self)


def map_names(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename the tensors under each source prefix to the downstream prefix; drop the rest (pretext heads)."""
    mapped = {}
    for name, tensor in state.items():
        for source, target in prefixes.items():
            if name.startswith(source):
                mapped[target + name.removeprefix(source)] = tensor
                break
    return mapped


def plan_transfer(pretrained: dict[str, torch.Tensor], downstream: torch.nn.Module, backbone: str,
                  transfer: Transfer) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """The tensors to load into ``downstream`` and the report; raises TransferError when the declaration is off.

    Only the declared parts transfer; head tensors (the output convolution, sized by the number of classes) never
    do. ``unused`` lists the mapped tensors left behind, so the report shows what was deliberately not handed over.
    """
    mapped = map_names(pretrained, transfer.prefixes)
    if not mapped:
        raise TransferError(f"no pre-trained tensor starts with a transfer prefix {sorted(transfer.prefixes)}")
    target = downstream.state_dict()
    wanted = {name: tensor for name, tensor in mapped.items()
              if name in target and parameter_part(backbone, name) in transfer.parts}
    mismatched = [f"{name}: {tuple(tensor.shape)} vs downstream {tuple(target[name].shape)}"
                  for name, tensor in wanted.items() if tensor.shape != target[name].shape]
    if mismatched:
        raise TransferError("pre-trained and downstream shapes differ: " + "; ".join(mismatched[:5]))
    load = wanted
    totals = dict.fromkeys(PARTS, 0)
    loaded = dict.fromkeys(PARTS, 0)
    for name, parameter in downstream.named_parameters():
        part = parameter_part(backbone, name)
        totals[part] += parameter.numel()
        loaded[part] += parameter.numel() if name in load else 0
    fractions = {part: loaded[part] / totals[part] if totals[part] else 0.0 for part in PARTS}
    short = {part: (fractions[part], need) for part, need in transfer.coverage.items() if fractions[part] < need - 1e-9}
    if short:
        missing = [name for name, _ in downstream.named_parameters()
                   if name not in load and parameter_part(backbone, name) in short][:5]
        raise TransferError(f"transfer covers too little of the downstream network "
                            f"({', '.join(f'{p} {got:.1%} < {need:.0%}' for p, (got, need) in short.items())}); "
                            f"not initialised, e.g. {missing}")
    unused = sorted(set(mapped) - set(load))
    return load, TransferReport(loaded=len(load), fractions=fractions, unused=unused)


def load_pretrained(downstream: torch.nn.Module, checkpoint_path, backbone: str) -> TransferReport:
    """Initialise ``downstream`` from a ``pretrained.pt`` written by the pre-training loop."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if checkpoint["backbone"]["name"] != backbone:
        raise TransferError(f"{checkpoint_path}: pre-trained on backbone {checkpoint['backbone']['name']!r}, "
                            f"fine-tuning uses {backbone!r}")
    transfer = Transfer(**checkpoint["transfer"])
    try:
        load, report = plan_transfer(checkpoint["state_dict"], downstream, backbone, transfer)
    except TransferError as err:
        raise TransferError(f"{checkpoint_path}: {err}") from err
    downstream.load_state_dict(load, strict=False)
    return replace(report, method=checkpoint["method"], method_version=str(checkpoint["method_version"]))

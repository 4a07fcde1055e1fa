"""Verified weight transfer from a pre-trained method into a downstream segmentation network.

Following nnssl's lesson, the mapping is checked before any pre-training step runs (on a freshly built method and
downstream network), so a wrong prefix or a shape mismatch fails in seconds, not after hours of pre-training;
fine-tuning runs the same check when it loads the checkpoint and records the report in its manifest. A released
checkpoint (``ssl3d.pretrain.released``) goes through the same check, when it is fetched and when it is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ssl3d.data.fetch import ManualDataMissing, download, verify_file
from ssl3d.io import built_folder, link_or_copy, read_json, write_json
from ssl3d.nets import build_network, parameter_part
from ssl3d.pretrain.method import Transfer
from ssl3d.pretrain.released import ReleasedCheckpoint, get_released

log = logging.getLogger(__name__)

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


def read_state(entry: ReleasedCheckpoint, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``path`` (tensors only, never unpickling code)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for a file it cannot read
        raise TransferError(f"{path}: not a checkpoint torch can read as tensors ({type(err).__name__}: {err}); "
                            f"delete it and fetch {entry.name} again") from err
    state = saved.get(entry.state_key) if entry.state_key and isinstance(saved, dict) else saved
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        where = f"its {entry.state_key!r} entry" if entry.state_key else "the file"
        raise TransferError(f"{path}: {where} is not a state dict of tensors, as {entry.name}'s release is")
    return state


def check_released(entry: ReleasedCheckpoint, state: dict, downstream: torch.nn.Module
                   ) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """The tensors to load into ``downstream`` and the transfer report; raises TransferError naming every key
    without a place in the backbone and every shape that differs."""
    try:
        mapped = entry.to_suite(state)
    except ValueError as err:
        raise TransferError(str(err)) from err
    unknown = sorted(set(mapped) - set(downstream.state_dict()))
    if unknown:
        raise TransferError(f"{entry.name}: {len(unknown)} tensor(s) have no place in backbone "
                            f"{entry.backbone['name']!r}, e.g. {unknown[:5]}; is this the release the registry names?")
    transfer = Transfer(prefixes={"": ""}, coverage=entry.coverage)
    try:
        load, report = plan_transfer(mapped, downstream, entry.backbone["name"], transfer)
    except TransferError as err:
        raise TransferError(f"{entry.name}: {err}") from err
    return load, replace(report, method=entry.method, method_version=f"released: {entry.name}")


def fetch_released(entry: ReleasedCheckpoint, data_root: str | Path = Path("data")) -> Path:
    """Download (or find) and check ``entry``'s file; returns ``<data_root>/weights/<name>/verified``, a folder
    that holds the file (a hard link where the file system allows it, else a copy) beside ``verified.json``: the
    workflow's output, which a job on another machine receives whole."""
    path = entry.copy(data_root)
    if entry.access == "automatic":
        download(list(entry.urls), path, entry.size, sha256=entry.sha256)  # which logs the sha256 to pin
    elif not path.is_file():
        raise ManualDataMissing(entry.name, path, entry.instructions)
    record = verify_file(path, entry.size, sha256=entry.sha256)
    if entry.sha256 is None and entry.access == "manual":
        log.warning("%s: no sha256 pinned in released.yaml; this file's is %s: pin it", entry.name, record["sha256"])
    network = build_network(entry.backbone, in_channels=1, out_channels=2)
    _, report = check_released(entry, read_state(entry, path), network)
    log.info("%s: %d tensors fit %s (%s)", entry.name, report.loaded, entry.backbone["name"], report.fractions)
    with built_folder(entry.verified(data_root)) as work:
        link_or_copy(path, work / entry.file)
        write_json(work / "verified.json", {"name": entry.name, "file": entry.file, "size": record["size"],
                                            "sha256": record["sha256"], "pinned": entry.sha256 is not None,
                                            "transfer": report.as_dict()})
    return entry.verified(data_root)


def load_released(downstream: torch.nn.Module, verified: str | Path) -> TransferReport:
    """Initialise ``downstream`` from the released checkpoint in the folder ``verified`` (fetch_released's)."""
    record = read_json(Path(verified) / "verified.json")
    entry = get_released(record["name"])
    path = Path(verified) / record["file"]
    if verify_file(path)["sha256"] != record["sha256"]:
        raise TransferError(f"{path} changed since it was verified ({verified}); delete {verified} and fetch again")
    load, report = check_released(entry, read_state(entry, path), downstream)
    downstream.load_state_dict(load, strict=False)
    return report

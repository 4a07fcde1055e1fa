"""Checkpoints the papers' authors released, as fine-tuning inits beside the suite's own pre-training runs.

Why: the HDSSL paper's Table 2 compares against the released vox2vec weights, and a reader checking a
reimplementation wants the official weights through the same downstream protocol. A released checkpoint is an
init like a pre-training entry (``finetune.inits: [scratch, vox2vec, vox2vec_official]``); its weights fix the
network, so its arms run on the entry's backbone. The registry is data (``released.yaml``, one entry per
checkpoint); adding one is an entry, and ``tests/test_released.py`` checks every entry against a synthetic file
with its official key layout.

Fetching (``ssl3d fetch-weights``, the workflow's ``fetch_weights`` rule; ``ssl3d.pretrain.transfer.fetch_released``)
downloads an automatic entry with the datasets' resumable, verified download (``ssl3d.data.fetch``) or finds the
user's copy of a manual one at ``<data_root>/weights/<name>/<file>``, then maps its keys onto the backbone and
checks them (every tensor must land on a parameter or buffer of the backbone, with its shape; the mapped tensors
must cover ``coverage`` of the backbone's encoder and decoder), then puts the file and ``verified.json`` in the
folder ``<data_root>/weights/<name>/verified``.
Fine-tuning loads it (``load_released``) through the same check and ``plan_transfer`` as a pre-training
checkpoint, so its manifest holds the same transfer report. Files are read with ``torch.load(weights_only=True)``:
third-party pickles never run code. This module is the registry alone, free of torch, since the workflow's plan
reads it.

Entry fields (every one required unless marked optional):

* ``title``, ``licence``: str. ``method``: the suite's method the weights were trained with (its ``probe_features``
  serve the probe protocol; the transfer report names it).
* ``access``: ``automatic`` (``urls`` given) or ``manual`` (``instructions`` say how to obtain the file).
* ``file``: the file name under ``<data_root>/weights/<name>/``. ``urls`` (automatic): mirrors, tried in order.
* ``size`` (bytes), ``sha256``: null until pinned; an unpinned download logs the sha256 to pin.
* ``backbone``: the suite's backbone entry the weights fit (``{name, <constructor fields>}``).
* ``state_key``: the key of the state dict inside the file, or null when the file is the state dict.
* ``keys``: the official -> suite key mapping, hand-written because no library maps arbitrary checkpoints:
  ``prefixes`` (official prefix -> suite prefix, tried in order; the first is the canonical one for the way back)
  and optional ``renames`` (official infix -> suite infix). A key under none of the prefixes is an error.
* ``coverage``: the smallest fraction of the backbone's ``encoder`` / ``decoder`` parameters the file must fill.
* ``in_channels`` (optional, default 1): the image channels the weights take (every released model is CT); the
  plan refuses them for a dataset with other channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

_STRING = {"type": "string", "minLength": 1}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
SCHEMA = {
    "type": "object",
    "propertyNames": {"pattern": "^[a-z0-9_]+$"},
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "required": ["title", "method", "licence", "access", "file", "size", "sha256", "backbone", "state_key",
                     "keys", "coverage"],
        "properties": {
            "title": _STRING, "method": _STRING, "licence": _STRING, "file": _STRING, "instructions": _STRING,
            "access": {"enum": ["automatic", "manual"]},
            "urls": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^https?://"}},
            "size": {"type": ["integer", "null"], "minimum": 1},
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
            "backbone": {"type": "object", "required": ["name"], "properties": {"name": _STRING}},
            "state_key": {"type": ["string", "null"]},
            "keys": {"type": "object", "additionalProperties": False, "required": ["prefixes"], "properties": {
                "prefixes": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
                "renames": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "coverage": {"type": "object", "additionalProperties": False, "required": ["encoder", "decoder"],
                         "properties": {"encoder": _FRACTION, "decoder": _FRACTION}},
            "in_channels": {"type": "integer", "minimum": 1},
        },
        "if": {"properties": {"access": {"const": "automatic"}}},
        "then": {"required": ["urls"]},
        "else": {"required": ["instructions"]},
    },
}


@dataclass(frozen=True)
class ReleasedCheckpoint:
    name: str
    title: str
    method: str
    licence: str
    access: str
    file: str
    size: int | None
    sha256: str | None
    backbone: dict
    state_key: str | None
    keys: dict
    coverage: dict
    urls: tuple[str, ...] = ()
    instructions: str | None = None
    in_channels: int = 1

    @property
    def renames(self) -> dict:
        return self.keys.get("renames", {})

    def identity(self) -> dict:
        """What a fine-tuning run's identity holds of these weights: a pinned hash, else where they come from."""
        return {"name": self.name, "sha256": self.sha256, "urls": list(self.urls)}

    def to_suite(self, state: dict) -> dict:
        """Official keys -> the backbone's; a key under none of the official prefixes raises, naming it."""
        prefixes = self.keys["prefixes"]
        mapped, foreign = {}, []
        for key, tensor in state.items():
            source = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
            if source is None:
                foreign.append(key)
                continue
            mapped[_renamed(prefixes[source] + key.removeprefix(source), self.renames)] = tensor
        if foreign:
            raise ValueError(f"{self.name}: {len(foreign)} key(s) outside the official layout (prefixes "
                             f"{list(prefixes)}), e.g. {foreign[:5]}")
        return mapped

    def to_official(self, state: dict) -> dict:
        """The backbone's keys -> the official ones (each suite prefix back to its first official prefix)."""
        back = {}
        for official, suite in self.keys["prefixes"].items():
            back.setdefault(suite, official)
        inverse = {suite: official for official, suite in self.renames.items()}
        official = {}
        for key, tensor in state.items():
            suite = max((prefix for prefix in back if key.startswith(prefix)), key=len, default=None)
            if suite is None:
                raise ValueError(f"{self.name}: {key!r} is under none of the suite prefixes {list(back)}")
            official[back[suite] + _renamed(key, inverse).removeprefix(suite)] = tensor
        return official

    def folder(self, data_root: str | Path) -> Path:
        return Path(data_root) / "weights" / self.name

    def copy(self, data_root: str | Path) -> Path:
        """Where the file is downloaded to, or where the user puts a manual one."""
        return self.folder(data_root) / self.file

    def verified(self, data_root: str | Path) -> Path:
        """The folder of the checked file and its ``verified.json`` (``ssl3d.pretrain.transfer.fetch_released``)."""
        return self.folder(data_root) / "verified"


def _renamed(key: str, renames: dict) -> str:
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


@cache
def released_checkpoints() -> dict[str, ReleasedCheckpoint]:
    raw = yaml.safe_load(resources.files("ssl3d.pretrain").joinpath("released.yaml").read_text())
    jsonschema.validate(raw, SCHEMA)
    return {name: ReleasedCheckpoint(name=name, **{**entry, "urls": tuple(entry.get("urls", ()))})
            for name, entry in raw.items()}


def get_released(name: str) -> ReleasedCheckpoint:
    known = released_checkpoints()
    if name not in known:
        raise ValueError(f"unknown released checkpoint {name!r}; known: {', '.join(known)}")
    return known[name]

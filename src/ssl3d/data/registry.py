"""The dataset registry: every dataset the three papers use, how to get and verify it, and where it lives on disk.

Why: fetching, verifying, converting and listing datasets all need the same facts (URLs and hashes, licence,
manual steps, converter layout, expected case counts). They live as data in ``registry.yaml``, one entry per
dataset, so adding a dataset is an entry, not code. The file is validated on load: a typo or a missing hash
fails at once, naming the entry and the field.

On-disk conventions, under a data root (``$SSL3D_DATA``, else ``data/``: ``ssl3d.data.files.data_root``).
Fetching, conversion, the Snakemake rules and ``ssl3d datasets`` all follow them; each marker file is written
last, so its presence means the stage finished::

    <data_root>/sources/<name>/                            an automatic entry's downloaded archives
    <data_root>/manual/<name>/                             a manual entry's copy (or a symlink to it), unless the
                                                           config's `path` points elsewhere
    <data_root>/sources/<name>/verified.json               written by verification
    <data_root>/raw/<name>/dataset.json                    written by conversion (MSD layout, ssl3d.data.convert)
    <data_root>/preprocessed/<recipe>/<name>/index.json    written by preprocessing (ssl3d.data.cache)

:func:`dataset_status` reports the furthest of these stages it finds: ``absent`` < ``placed`` (something is where
the copy is expected) < ``verified`` < ``converted`` < ``preprocessed``. A manual copy kept elsewhere (the config's
``path``) shows as absent until it is verified.

Entry schema (``registry.yaml``, keyed by the dataset's name; every field is required unless marked optional):

* ``title``: str, the dataset's full name.
* ``used_by``: list of ``{paper, role}``: ``paper`` is ``hybridmim``, ``pgl`` or ``hdssl``; ``role`` is
  ``pretrain`` (part of the paper's pre-training corpus) or ``downstream`` (fine-tuned and evaluated on).
  HybridMIM's task-specific mode also pre-trains on its downstream training sets; that is a pre-training entry's
  ``pool: downstream`` in the experiment config, not listed here.
* ``modality``: ``CT`` or ``MRI``, or a list of channel names in the converted image's channel order (BraTS).
* ``access``: ``automatic`` (the suite downloads it), ``manual`` (the user registers and places a copy) or
  ``unavailable`` (cannot be obtained).
* ``licence``: str. ``redistributable``: bool, whether the suite may mirror it.
* ``size_gb``: approximate download size in GB, or null if unknown.
* ``archives``: list (empty for manual and unavailable entries) of files to download, each:

  - ``name``: the file name under ``sources/<name>/`` (a folder name for per-case files);
  - ``urls``: mirrors of the one file, tried in order;
  - ``size`` (bytes), ``md5``, ``sha256``: null where not published;
  - ``unhashed`` (optional): why neither hash is known; required when both are null;
  - ``url_template``, ``case_ids``, ``file_template`` (optional, together, instead of ``urls``): one file per case,
    ``url_template.format(case=i)`` for ``i`` in the inclusive range ``case_ids: [first, last]``, saved at
    ``file_template.format(case=i)`` below the archive's folder (KiTS19's images); see :meth:`Archive.case_files`.
* ``layout``: the converter that turns the source into the MSD layout (a key of
  :data:`ssl3d.data.convert.CONVERTERS` other than ``folder``), or ``none`` for an unavailable entry.
* ``layout_options`` (optional): the converter's options, e.g. ``images_folder``'s glob ``pattern``.
* ``labels``: label index (int) -> name, as the dataset publishes them (informational for datasets converted as
  unlabelled images).
* ``regions`` (optional): evaluated region -> the label indices it unites (BraTS: ET, TC, WT).
* ``expected``: ``{labelled, unlabelled}`` case counts after conversion; null where unknown.
* ``verify``: glob pattern -> number of files a copy must hold matching it, relative to the copy (required for
  ``manual``; :func:`ssl3d.data.fetch.verify_manual` checks it).
* ``instructions``: the steps a user takes to get a manual dataset (required for ``manual``).
* ``substitute``: ``{entry, why}``, the registry entry to use instead and why (required for ``unavailable``).
* ``unverified`` (optional): names of the fields whose values the sources could not confirm.
* ``notes`` (optional): list of str: provenance, quirks, and what makes a value unverified.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from ssl3d.data.convert import CONVERTERS
from ssl3d.data.files import manual_copy

PAPERS = ("hybridmim", "pgl", "hdssl")
ROLES = ("pretrain", "downstream")
ACCESS = ("automatic", "manual", "unavailable")
LAYOUTS = (*sorted(set(CONVERTERS) - {"folder"}), "none")
STATUSES = ("absent", "placed", "verified", "converted", "preprocessed")
WIDTH = 118  # `ssl3d datasets --show` wraps its text to this width

_FIELDS = ("title", "used_by", "modality", "access", "licence", "redistributable", "size_gb", "archives", "layout",
           "layout_options", "labels", "regions", "expected", "verify", "instructions", "substitute", "unverified",
           "notes")
_REQUIRED = ["title", "used_by", "modality", "access", "licence", "redistributable", "size_gb", "archives", "layout",
             "labels", "expected"]
_STRING = {"type": "string", "minLength": 1}
_COUNT = {"type": ["integer", "null"], "minimum": 0}
_ARCHIVE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "size", "md5", "sha256"],
    "properties": {
        "name": _STRING,
        "urls": {"type": "array", "items": {"type": "string", "pattern": "^https?://"}},
        "size": {"type": ["integer", "null"], "minimum": 1},
        "md5": {"type": ["string", "null"], "pattern": "^[0-9a-f]{32}$"},
        "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "unhashed": _STRING,
        "url_template": {"type": "string", "pattern": r"^https?://.*\{case"},
        "case_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2},
        "file_template": {"type": "string", "pattern": r"\{case"},
    },
    "dependentRequired": {"url_template": ["case_ids", "file_template"], "case_ids": ["url_template"],
                          "file_template": ["url_template"]},
}
SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"pattern": "^[a-z0-9_]+$"},
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "required": _REQUIRED,
        "properties": {
            "title": _STRING,
            "used_by": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["paper", "role"],
                "properties": {"paper": {"enum": list(PAPERS)}, "role": {"enum": list(ROLES)}}}},
            "modality": {"anyOf": [_STRING, {"type": "array", "items": _STRING, "minItems": 1}]},
            "access": {"enum": list(ACCESS)},
            "licence": _STRING,
            "redistributable": {"type": "boolean"},
            "size_gb": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "archives": {"type": "array", "items": _ARCHIVE},
            "layout": {"enum": list(LAYOUTS)},
            "layout_options": {"type": "object"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "regions": {"type": "object", "additionalProperties": {
                "type": "array", "items": {"type": "integer"}, "minItems": 1}},
            "expected": {"type": "object", "additionalProperties": False, "required": ["labelled", "unlabelled"],
                         "properties": {"labelled": _COUNT, "unlabelled": _COUNT}},
            "verify": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
            "instructions": _STRING,
            "substitute": {"type": "object", "additionalProperties": False, "required": ["entry", "why"],
                           "properties": {"entry": _STRING, "why": _STRING}},
            "unverified": {"type": "array", "items": {"enum": list(_FIELDS)}},
            "notes": {"type": "array", "items": {"type": "string"}},
        },
    },
}


class RegistryError(ValueError):
    """A registry file that breaks the schema; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Use:
    paper: str
    role: str


@dataclass(frozen=True)
class Archive:
    name: str
    urls: tuple[str, ...] = ()
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    unhashed: str | None = None
    url_template: str | None = None
    case_ids: tuple[int, int] | None = None
    file_template: str | None = None

    def case_files(self) -> list[tuple[str, str]]:
        """(URL, path below the archive's folder) of each per-case file; empty for a single-file archive."""
        if self.url_template is None:
            return []
        first, last = self.case_ids
        return [(self.url_template.format(case=case), self.file_template.format(case=case))
                for case in range(first, last + 1)]


@dataclass(frozen=True)
class Substitute:
    entry: str
    why: str

    def __str__(self) -> str:
        return f"Substitute: registry entry {self.entry}. {self.why}"


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry; the fields are those of ``registry.yaml`` (see the module docstring)."""

    name: str
    title: str
    used_by: tuple[Use, ...]
    modality: str | tuple[str, ...]
    access: str
    licence: str
    redistributable: bool
    size_gb: float | None
    archives: tuple[Archive, ...]
    layout: str
    labels: dict[int, str]
    expected: dict[str, int | None]
    layout_options: dict = field(default_factory=dict)
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    verify: dict[str, int] = field(default_factory=dict)
    instructions: str | None = None
    substitute: Substitute | None = None
    unverified: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def steps(self, data_root: str | Path) -> str:
        """The instructions, with the copy's place under ``data_root`` (``$SSL3D_DATA``) where they say
        ``data/manual/``."""
        return (self.instructions or "").replace("data/manual/", f"{Path(data_root)}/manual/")


def _breach(raw: dict, known: dict) -> tuple[str, str] | None:
    """(field, problem) of the first rule across fields that the JSON schema does not express; None if all hold."""
    access = raw["access"]
    if access == "automatic" and not raw["archives"]:
        return "archives", "an automatic entry needs at least one archive to download (or access: manual)"
    for i, archive in enumerate(raw["archives"]):
        where = f"archives.{i} ({archive['name']})"
        if not archive.get("urls") and "url_template" not in archive:
            return where, "no download address: give urls, or url_template with case_ids and file_template"
        if archive["md5"] is None and archive["sha256"] is None and "unhashed" not in archive:
            return where, "no md5 or sha256: add one, or say in `unhashed` why none is published"
        if "case_ids" in archive and archive["case_ids"][0] > archive["case_ids"][1]:
            return where, "case_ids must be [first, last] with first <= last"
    if access == "manual" and "instructions" not in raw:
        return "instructions", "a manual entry needs the steps a user takes to get and place the data"
    if access == "manual" and not raw.get("verify"):
        return "verify", "a manual entry needs {glob pattern: file count} to check a user's copy against"
    if access == "unavailable":
        if "substitute" not in raw:
            return "substitute", "an unavailable entry needs {entry, why}: the dataset to use instead"
        substitute = raw["substitute"]["entry"]
        if substitute not in known or known[substitute]["access"] == "unavailable":
            return "substitute.entry", f"{substitute!r} is not an obtainable entry of this registry"
    if (raw["layout"] == "none") != (access == "unavailable"):
        return "layout", "`none` is the layout of unavailable entries only (and theirs must be `none`)"
    bad_keys = [key for key in raw["labels"] if not isinstance(key, int)]
    if bad_keys:
        return "labels", f"keys must be label indices (integers), got {bad_keys!r}"
    for region, indices in raw.get("regions", {}).items():
        if not set(indices) <= set(raw["labels"]):
            return f"regions.{region}", f"{indices} names labels not in `labels` ({sorted(raw['labels'])})"
    return None


def _entry(name: str, raw: dict) -> DatasetEntry:
    archives = tuple(Archive(**{**a, "urls": tuple(a.get("urls", ())),
                                **({"case_ids": tuple(a["case_ids"])} if "case_ids" in a else {})})
                     for a in raw["archives"])
    modality = raw["modality"] if isinstance(raw["modality"], str) else tuple(raw["modality"])
    return DatasetEntry(
        name=name, title=raw["title"], used_by=tuple(Use(**use) for use in raw["used_by"]), modality=modality,
        access=raw["access"], licence=raw["licence"], redistributable=raw["redistributable"],
        size_gb=raw["size_gb"], archives=archives, layout=raw["layout"], labels=dict(raw["labels"]),
        expected=dict(raw["expected"]), layout_options=dict(raw.get("layout_options", {})),
        regions={region: tuple(indices) for region, indices in raw.get("regions", {}).items()},
        verify=dict(raw.get("verify", {})), instructions=raw.get("instructions"),
        substitute=Substitute(**raw["substitute"]) if "substitute" in raw else None,
        unverified=tuple(raw.get("unverified", ())), notes=tuple(raw.get("notes", ())))


def read_registry(path: str | Path) -> dict[str, DatasetEntry]:
    """Read and validate a registry file; any breach raises :class:`RegistryError` naming file, entry and field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: not valid YAML ({err})") from err
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(part) for part in errors[0].absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RegistryError(f"{path}: {where}: {errors[0].message}{more}; the fields are documented in "
                            "ssl3d.data.registry")
    for name, entry in raw.items():
        breach = _breach(entry, raw)
        if breach:
            raise RegistryError(f"{path}: {name}.{breach[0]}: {breach[1]}")
    return {name: _entry(name, entry) for name, entry in raw.items()}


@cache
def load_registry() -> dict[str, DatasetEntry]:
    """The suite's own registry (``ssl3d/data/registry.yaml``), read once per process."""
    with resources.as_file(resources.files("ssl3d.data") / "registry.yaml") as path:
        return read_registry(path)


def get_entry(name: str) -> DatasetEntry:
    known = load_registry()
    if name not in known:
        raise ValueError(f"unknown dataset {name!r} (not in the registry); known: {', '.join(known)}")
    return known[name]


def source_dir(name: str, data_root: str | Path = Path("data")) -> Path:
    return Path(data_root) / "sources" / name


def dataset_status(name: str, data_root: str | Path = Path("data"), recipe: str | None = None) -> str:
    """How far dataset ``name`` has got on this machine: one of :data:`STATUSES` (see the module docstring).

    ``preprocessed`` means an ``index.json`` under any recipe, or under ``recipe`` when one is given.
    """
    root = Path(data_root)
    if any((root / "preprocessed").glob(f"{recipe or '*'}/{name}/index.json")):
        return "preprocessed"
    if (root / "raw" / name / "dataset.json").is_file():
        return "converted"
    if (source_dir(name, root) / "verified.json").is_file():
        return "verified"
    expected = expected_location(get_entry(name), root) if name in load_registry() else source_dir(name, root)
    if expected is not None and expected.is_dir() and any(expected.iterdir()):
        return "placed"
    return "absent"


def expected_location(entry: DatasetEntry, data_root: str | Path = Path("data")) -> Path | None:
    """Where the suite looks for (or puts) the source copy; a manual copy may instead be at the config's ``path``.
    None for an unavailable entry."""
    if entry.access == "unavailable":
        return None
    return manual_copy(entry.name, {}, data_root) if entry.access == "manual" else source_dir(entry.name, data_root)


def _mark(entry: DatasetEntry, name: str, text: str, mark: str = "?") -> str:
    return f"{text}{mark}" if name in entry.unverified else text


def _modality(entry: DatasetEntry) -> str:
    return entry.modality if isinstance(entry.modality, str) else ", ".join(entry.modality)


def _size(entry: DatasetEntry) -> str:
    return "unknown" if entry.size_gb is None else f"{entry.size_gb:g} GB"


def _location(entry: DatasetEntry, data_root: str | Path) -> str:
    location = expected_location(entry, data_root)
    return "not obtainable" if location is None else f"{location}/"


def registry_table(data_root: str | Path = Path("data")) -> str:
    """Every entry as one row of a Markdown table, with its status under ``data_root``."""
    header = ["name", "modality", "access", "licence", "redistributable", "size", "status", "expected at"]
    rows = [[name, _modality(entry), entry.access, _mark(entry, "licence", entry.licence),
             "yes" if entry.redistributable else "no", _mark(entry, "size_gb", _size(entry)),
             dataset_status(name, data_root), _location(entry, data_root)]
            for name, entry in load_registry().items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([
        line(header), line(["-" * width for width in widths]), *map(line, rows), "",
        "? = not confirmed by the sources. Status: " + " < ".join(STATUSES) + ". A manual copy may instead be "
        "where your config's `path` says. `ssl3d datasets --show NAME` prints an entry in full, with the steps "
        "to get a manual one."])


def _field(label: str, text: str) -> str:
    return textwrap.fill(text, width=WIDTH, initial_indent=f"  {label + ':':<17}", subsequent_indent=" " * 19,
                         break_on_hyphens=False, break_long_words=False)


def describe_entry(entry: DatasetEntry, data_root: str | Path = Path("data")) -> str:
    """One entry in full, for a person: every registry field, its status here and, if manual, the steps."""
    def marked(name: str, text: str) -> str:
        return _mark(entry, name, text, " (unverified)")

    labels = ", ".join(f"{index} {name}" for index, name in entry.labels.items()) or "none"
    expected = ", ".join(f"{'unknown' if n is None else n} {kind}" for kind, n in entry.expected.items())
    options = f" {entry.layout_options}" if entry.layout_options else ""
    lines = [f"{entry.name}: {entry.title}",
             _field("used by", ", ".join(f"{use.paper} ({use.role})" for use in entry.used_by)),
             _field("modality", marked("modality", _modality(entry))),
             _field("access", entry.access),
             _field("licence", marked("licence", entry.licence)
                    + ("; redistributable" if entry.redistributable else "; not redistributable")),
             _field("size", marked("size_gb", _size(entry))),
             _field("status", f"{dataset_status(entry.name, data_root)}; source copy: {_location(entry, data_root)}"),
             _field("layout", entry.layout + marked("layout_options", options)),
             _field("labels", marked("labels", labels)),
             _field("expected cases", marked("expected", expected) + " (after conversion)")]
    if entry.regions:
        lines.append(_field("regions", "; ".join(f"{region} = {'+'.join(map(str, indices))}"
                                                 for region, indices in entry.regions.items())))
    for archive in entry.archives:
        lines.append(f"  archive {archive.name}")
        if archive.url_template:
            first, last = archive.case_ids
            lines += [_field("  url per case", f"{archive.url_template} (case {first}..{last})"),
                      _field("  saved as", archive.file_template)]
        lines += [_field("  url", url) for url in archive.urls]
        lines += [_field(f"  {key}", str(value)) for key, value in
                  (("size", archive.size), ("md5", archive.md5), ("sha256", archive.sha256),
                   ("no hash", archive.unhashed)) if value is not None]
    if entry.verify:
        lines.append("  verify (files a copy must hold):")
        lines += [f"    {pattern}: {count}" for pattern, count in entry.verify.items()]
    if entry.instructions:
        lines += ["  instructions:", *(f"    {step}" for step in entry.steps(data_root).rstrip().splitlines())]
    if entry.substitute:
        lines.append(_field("substitute", f"{entry.substitute.entry}: {entry.substitute.why}"))
    if entry.notes:
        lines += ["  notes:", *(textwrap.fill(note, width=WIDTH, initial_indent="    - ", subsequent_indent=" " * 6,
                                              break_on_hyphens=False, break_long_words=False)
                                for note in entry.notes)]
    return "\n".join(lines)

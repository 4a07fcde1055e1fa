"""The three papers' published results, one row per printed number, as package data.

``published/<paper>.csv`` (``hybridmim``, ``pgl``, ``hdssl``) holds every number of every results table of the paper
(and of a figure where the paper's text prints the figure's numbers), transcribed from the text extractions in
``../shared/papers`` (``hybridmim.txt``, ``pgl.txt``, ``dense-hierarchical-ssl.txt``). Columns (``COLUMNS``):

- ``paper``: hybridmim | pgl | hdssl (the file's name).
- ``table``: "Table N" or "Figure N".
- ``dataset``: a key of the dataset registry (``ssl3d.data.registry``), e.g. btcv, msd_liver, brats2020, amos_mri.
- ``method``: the row label as printed, without its citation marker ("MG [39]" -> "MG"); where the extraction lost
  the label, the label the inference gives (see ``inferred``).
- ``init``: the suite's init name for that row: ``scratch``, the ``name`` of a registered method
  (``ssl3d.pretrain.registry``) or a released checkpoint (``ssl3d.pretrain.released``); empty where the suite has
  none (TransVW), which the paper tables call "method not implemented", or where the row cannot be attributed
  (its ``setting`` then says "components not recoverable", which the tables say instead). The methods a table names
  are this data (``method``); the methods the suite implements are the registry's, so a row is tied to a method by
  filling its init once the method exists.
- ``backbone``: the suite's backbone name where there is one (segresnet, unetr, swinunetr, hybridmim_unet,
  genesis_unet3d), else the paper's network in a few words (unetformer, resnet50_aspp, fpn3d).
- ``setting``: what the row or column means beyond the method (pre-training mode, loss terms, label share, number of
  training scans, linear or fine-tuning), a short string; its first ``;``-part names the protocol where the paper
  has several (:func:`protocol_of`); ``label_fraction``: the share of the training labels, where meaningful (empty
  for pre-training speed).
- ``target``: the registry's label (or BraTS region) name, or ``avg`` for the paper's mean over targets; empty for
  a speed.
- ``metric``: dice, iou, hd95 (the paper says HD95), hd (the paper says Hausdorff distance, percentile not stated),
  nsd, time_per_step_s; ``scale``: percent | fraction | mm | s; ``value``: as printed, in the paper's scale;
  ``pm``: the printed ± value, else empty.
- ``source_line``: the 1-based line of the paper's .txt holding the number.
- ``inferred``: empty, or ``;``-separated keys of ``published/INFERENCES.md`` naming each inference the row depends
  on (a lost table caption, column header or row label, and how the prose pins it).

``load_published`` reads and validates the files; ``published_tables`` lists the tables they hold; ``implemented``
says whether the suite has a row's init and ``protocol_of`` which protocol its number was measured under.
"""

from __future__ import annotations

import csv
import math
import re
from functools import cache
from importlib import resources

import pandas as pd

from ssl3d.analysis.stats import SCRATCH
from ssl3d.pretrain import registry
from ssl3d.pretrain.released import released_checkpoints

COLUMNS = ("paper", "table", "dataset", "method", "init", "backbone", "setting", "label_fraction", "target",
           "metric", "value", "scale", "pm", "source_line", "inferred")
PAPERS = ("hybridmim", "pgl", "hdssl")
# the paper's .txt in ../shared/papers for each CSV
PAPER_TEXTS = {"hybridmim": "hybridmim.txt", "pgl": "pgl.txt", "hdssl": "dense-hierarchical-ssl.txt"}
# metric -> the scales it may be printed in
METRICS = {"dice": ("percent", "fraction"), "iou": ("percent", "fraction"), "nsd": ("percent", "fraction"),
           "hd95": ("mm",), "hd": ("mm",), "time_per_step_s": ("s",)}
SCALES = ("percent", "fraction", "mm", "s")
_TABLE = re.compile(r"^(Table|Figure) [1-9][0-9]*$")
_KEYS = re.compile(r"^[a-z0-9_]+(;[a-z0-9_]+)*$")
_REQUIRED = ("paper", "table", "dataset", "method", "setting", "metric", "value", "scale", "source_line")
# The protocol of a published number, by the first ";"-part of its setting. Only HDSSL reports several (§3.2):
# "linear" evaluation trains a linear head on the frozen backbone (our probe), and its "fine-tuning" freezes the
# backbone for 15K steps before training it too (our frozen_then_finetune). Every other setting, HDSSL's "from
# scratch" included (trained end to end, methods.md §4.8), is whole-network fine-tuning.
SETTING_PROTOCOLS = {"linear": "probe", "fine-tuning": "frozen_then_finetune"}
DEFAULT_PROTOCOL = "finetune"


class PublishedSchemaError(ValueError):
    """A published CSV breaks the schema; the message names the file, the row and the column."""


def _folder():
    return resources.files("ssl3d.report") / "published"


@cache
def _datasets() -> frozenset[str]:
    from ssl3d.data.registry import load_registry
    return frozenset(load_registry())


def implemented(init: str) -> bool:
    """Whether the suite has a published row's init: scratch, a method of the registry or a released checkpoint
    (empty: no init)."""
    return init == SCRATCH or init in registry.methods() or init in released_checkpoints()


def protocol_of(setting: str) -> str:
    """The protocol a published number was measured under (``SETTING_PROTOCOLS``), so that it is compared with our
    runs of that protocol only."""
    return SETTING_PROTOCOLS.get(setting.split(";")[0].strip(), DEFAULT_PROTOCOL)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def validate_rows(name: str, header: list[str], rows: list[dict[str, str]], paper: str | None = None) -> None:
    """Raise PublishedSchemaError naming ``name``, the row (1-based data row, and its line of the file) and the
    column of the first breach. ``paper``: the paper the file must hold (its stem)."""
    if tuple(header) != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        raise PublishedSchemaError(f"{name}: header must be {','.join(COLUMNS)}; missing {missing}, unexpected "
                                   f"{extra}" + ("" if missing or extra else ", order differs"))
    if not rows:
        raise PublishedSchemaError(f"{name}: no rows")

    for i, row in enumerate(rows, start=1):
        def fail(column: str, why: str):
            raise PublishedSchemaError(f"{name}: row {i} (line {i + 1}), column {column!r}: {why} "
                                       f"(value {row.get(column)!r})")

        if None in row or any(v is None for v in row.values()):
            fail("paper", f"row has {len([v for v in row.values() if v is not None])} fields, want {len(COLUMNS)}")
        for column in _REQUIRED:
            if not row[column].strip():
                fail(column, "empty")
        if row["paper"] not in PAPERS:
            fail("paper", f"not one of {PAPERS}")
        if paper is not None and row["paper"] != paper:
            fail("paper", f"file holds paper {paper!r}")
        if not _TABLE.match(row["table"]):
            fail("table", "want 'Table N' or 'Figure N'")
        if row["dataset"] not in _datasets():
            fail("dataset", "not a dataset registry key")
        if row["init"] and not implemented(row["init"]):
            fail("init", f"neither empty, {SCRATCH!r}, a registered method ({', '.join(registry.methods())}) nor a "
                         "released checkpoint; leave it empty for a method the suite does not implement")
        if row["metric"] not in METRICS:
            fail("metric", f"not one of {tuple(METRICS)}")
        if row["scale"] not in SCALES:
            fail("scale", f"not one of {SCALES}")
        if row["scale"] not in METRICS[row["metric"]]:
            fail("scale", f"metric {row['metric']!r} takes {METRICS[row['metric']]}")
        value = _number(row["value"])
        if value is None:
            fail("value", "not a finite number")
        if value < 0 or (row["scale"] == "percent" and value > 100) or (row["scale"] == "fraction" and value > 1):
            fail("value", f"out of range for scale {row['scale']!r}")
        if row["pm"] and (_number(row["pm"]) is None or _number(row["pm"]) < 0):
            fail("pm", "not empty nor a non-negative number")
        if row["label_fraction"]:
            fraction = _number(row["label_fraction"])
            if fraction is None or not 0 < fraction <= 1:
                fail("label_fraction", "not empty nor a number in (0, 1]")
        if row["metric"] != "time_per_step_s" and not row["target"]:
            fail("target", "empty (a segmentation metric needs its target)")
        if not row["source_line"].isdigit() or int(row["source_line"]) < 1:
            fail("source_line", "not a positive integer")
        if row["inferred"] and not _KEYS.match(row["inferred"]):
            fail("inferred", "want empty or ';'-separated lower-case keys")


def _read(paper: str) -> pd.DataFrame:
    name = f"{paper}.csv"
    path = _folder() / name
    if not path.is_file():
        raise FileNotFoundError(f"no published results for paper {paper!r} ({name}); papers: {PAPERS}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    validate_rows(name, header, rows, paper=paper)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("value", "pm", "label_fraction"):
        frame[column] = frame[column].map(lambda text: float(text) if text else math.nan).astype(float)
    frame["source_line"] = frame["source_line"].astype(int)
    return frame


def load_published(paper: str | None = None) -> pd.DataFrame:
    """The published numbers of one paper (hybridmim, pgl, hdssl) or of all three, validated.

    ``value``, ``pm`` and ``label_fraction`` are floats (NaN where empty), ``source_line`` an int, the rest
    strings (empty where the CSV cell is). A file that breaks the schema raises PublishedSchemaError naming the
    file, the row and the column."""
    if paper is not None and paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; papers: {PAPERS}")
    frames = [_read(p) for p in ((paper,) if paper else PAPERS)]
    return pd.concat(frames, ignore_index=True)


def _table_order(table: str) -> tuple[int, int]:
    kind, number = table.split()
    return (0 if kind == "Table" else 1, int(number))


def published_tables() -> list[tuple[str, str]]:
    """(paper, table) of every table and figure the CSVs hold: papers in PAPERS order, tables before figures."""
    frame = load_published()
    pairs = set(zip(frame["paper"], frame["table"]))
    return sorted(pairs, key=lambda pt: (PAPERS.index(pt[0]), _table_order(pt[1])))

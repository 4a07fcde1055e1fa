"""From a config's dataset entry to a verified source copy and the MSD-layout folder the suite reads.

The workflow's data stages, one function each (``ssl3d fetch`` and ``ssl3d prepare`` call them):

* :func:`fetch_dataset` brings a registry dataset to ``<data_root>/sources/<name>/``, a folder that appears only
  once verified (``verified.json`` in it; built in ``.<name>.kept`` beside it, which keeps the downloads, so a
  killed fetch resumes and a forced rerun fetches nothing verified again: ``ssl3d.io.kept_folder``): automatic
  sources are downloaded (resumable), checked against the registry's size and hashes, and safely extracted; manual
  sources (BTCV, BraTS, FLARE, ...) are never downloaded: the user's copy at the config's ``path`` is counted and
  hashed against a trust-on-first-use manifest (``<data_root>/manifests/<name>.json``, written on first
  verification; commit it), and an absent copy stops with the registry's instructions.
* :func:`prepare_dataset` writes ``<data_root>/raw/<name>/`` (``dataset.json`` + ``imagesTr``/``labelsTr``/
  ``imagesTs``): phantoms are generated, registry datasets converted from their verified source by the entry's
  layout, and a folder of your own NIfTI images (``source: folder``) converted as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ssl3d.data.convert import convert
from ssl3d.data.fetch import ManualDataMissing, download, safe_extract, verify_manual
from ssl3d.data.files import manual_copy
from ssl3d.data.registry import Archive, get_entry, source_dir
from ssl3d.io import built_folder, kept_folder, read_json, write_json

log = logging.getLogger(__name__)


def _fetch_archive(archive: Archive, sources: Path) -> Path:
    """Download (or reuse) one archive of a dataset and extract it; returns the extracted folder.

    Per-case archives (KiTS19's images) are downloaded file by file into the folder directly. An archive another
    dataset already holds (AMOS CT and MRI share one zip) is hard-linked, then verified like a download.
    """
    extracted = sources / "extracted" / archive.name
    if archive.url_template is not None:
        for url, relpath in archive.case_files():
            download([url], extracted / relpath)
        return extracted
    path = sources / archive.name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        for other in sorted(sources.parent.glob(f"*/{archive.name}")):
            os.link(other, path)
            log.info("%s: reusing %s", archive.name, other)
            break
    download(list(archive.urls), path, archive.size, archive.md5, archive.sha256)
    if not extracted.exists():
        safe_extract(path, extracted)
    return extracted


def fetch_dataset(name: str, settings: dict, data_root: Path = Path("data")) -> Path:
    """Download or locate, then verify, the source of registry dataset ``name``; returns its ``verified.json``."""
    entry = get_entry(settings.get("entry", name))
    sources = source_dir(name, data_root)
    if entry.access == "unavailable":
        raise ManualDataMissing(name, sources, f"{entry.title} cannot be obtained by the suite. {entry.substitute}")
    with kept_folder(sources) as work:  # downloads resume; verified ones are never fetched again
        if entry.access == "manual":
            copy = manual_copy(name, settings, data_root)
            if not copy.exists():
                raise ManualDataMissing(name, copy, entry.steps(data_root))
            record = {"access": "manual", "path": str(copy.resolve()),
                      **verify_manual(copy, entry.verify, Path(data_root) / "manifests" / f"{name}.json")}
        else:
            record = {"access": "automatic", "archives": [str(_fetch_archive(archive, work).relative_to(work))
                                                          for archive in entry.archives]}
        write_json(work / "verified.json", {"dataset": name, "entry": entry.name, **record})
    log.info("%s: verified (%s)", name, entry.access)
    return sources / "verified.json"


def _verified_source(name: str, data_root: Path) -> Path:
    """The folder the converter reads: the user's copy, or the extracted archives."""
    verified = read_json(source_dir(name, data_root) / "verified.json")
    if verified["access"] == "manual":
        return Path(verified["path"])
    return source_dir(name, data_root) / "extracted"


def prepare_dataset(name: str, settings: dict, data_root: Path = Path("data")) -> Path:
    """Write ``<data_root>/raw/<name>`` in the MSD layout; returns its ``dataset.json``."""
    out = Path(data_root) / "raw" / name
    source = settings["source"]
    if source == "phantom":
        from ssl3d.data.phantom import write_phantom_dataset

        with built_folder(out) as work:  # phantoms are made again in seconds
            write_phantom_dataset(work, n_labelled=settings["labelled"], n_unlabelled=settings["unlabelled"],
                                  seed=settings["seed"], shape=tuple(settings["shape"]),
                                  spacing=tuple(settings["spacing"]))
        return out / "dataset.json"
    if source == "folder":
        options = {key: settings[key] for key in ("labels", "labels_map", "modality") if key in settings}
        return convert("folder", Path(settings["images"]), out, **options)  # the images (folder or glob) are the source
    entry = get_entry(settings.get("entry", name))
    return convert(entry.layout, _verified_source(name, data_root), out,
                   **{**entry.layout_options, **settings.get("options", {})})

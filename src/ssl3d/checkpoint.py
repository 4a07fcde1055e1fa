"""Resumable training state: written atomically every N steps, loaded back when a killed job is re-run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ssl3d.io import atomic_path

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(last: Path, run_id: str, modules: dict, device, fresh: dict) -> dict:
    """Load ``last`` into ``modules`` (name -> object with load_state_dict) and return its loop state, or
    ``fresh`` when there is no checkpoint. A checkpoint of another run is refused."""
    if not last.is_file():
        return fresh
    saved = torch.load(last, map_location=device, weights_only=False)
    if saved["run_id"] != run_id:
        raise ValueError(f"{last}: checkpoint of run {saved['run_id']}, not {run_id}; delete it to start over")
    for name, module in modules.items():
        module.load_state_dict(saved[name])
    log.info("resuming %s from step %d", run_id, saved["state"]["step"])
    return saved["state"]

"""Evaluate a fine-tuned run on its test cases: the rows of the per-case results table.

The per-case long table (one row per case x target x metric) is the suite's single source of truth: every
summary, test and figure is computed from it. Metrics are computed on the preprocessed grid (the recipe's
orientation, spacing and crop), so HD95 and NSD are in mm of that grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssl3d.data.cache import load_cached_case, read_index
from ssl3d.data.splits import run_split
from ssl3d.evaluate.columns import PER_CASE_COLUMNS
from ssl3d.evaluate.metrics import EmptyPolicy, case_metrics
from ssl3d.io import atomic_path, read_json
from ssl3d.finetune.protocols import build_downstream
from ssl3d.nets import predict_volume
from ssl3d.plan import read_run

log = logging.getLogger(__name__)

def load_model(model_path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The trained network of a ``model.pt``, rebuilt for its run's protocol (a probe reads the pyramid it
    recorded), and the checkpoint."""
    checkpoint = torch.load(model_path, map_location=device, weights_only=False)
    model = build_downstream(checkpoint["spec"], checkpoint["in_channels"], len(checkpoint["classes"]) + 1,
                             probe_features=checkpoint.get("probe_features")).model
    model.load_state_dict(checkpoint["weights"])
    return model.to(device), checkpoint


def target_metrics(pred: np.ndarray, ref: np.ndarray, classes: dict[int, str], regions: dict[str, list[int]],
                   spacing: tuple[float, float, float], nsd_tolerance_mm: dict[str, float] | float,
                   policy: EmptyPolicy) -> list[dict]:
    """The metric rows of one case: per class, or per region where the dataset declares regions (BraTS's TC, WT
    and ET: each the union of its classes, in the prediction and in the reference, scored as one binary mask)."""
    if not regions:
        return case_metrics(pred, ref, classes, spacing, nsd_tolerance_mm, policy)
    rows = []
    for name, members in regions.items():
        rows += case_metrics(np.isin(pred, members).astype(np.uint8), np.isin(ref, members).astype(np.uint8),
                             {1: name}, spacing, nsd_tolerance_mm, policy)
    return rows


def evaluate_run(run_config: str | Path | dict, model_path: str | Path, out_csv: str | Path,
                 nsd_tolerance_mm: dict[str, float] | float, policy: EmptyPolicy, device: str = "cpu") -> Path:
    config = read_run(run_config)
    spec, inputs = config["spec"], config["inputs"]
    device = torch.device(device)
    model, checkpoint = load_model(model_path, device)
    if checkpoint["run_id"] != config["run_id"]:
        raise ValueError(f"{model_path}: model of run {checkpoint['run_id']}, but the run config is run "
                         f"{config['run_id']}")
    index = read_index(inputs["cache"])
    test_ids = run_split(read_json(inputs["splits"]), spec.get("fold"), inputs["splits"])["test"]
    inference = spec["inference"]
    policy_text = ";".join(f"{key}={value}" for key, value in policy.as_dict().items())
    rows = []
    for number, case_id in enumerate(test_ids, start=1):
        case = load_cached_case(index["dir"] / index["cases"][case_id]["file"])
        pred = predict_volume(model, case["image"], inference["roi_size"], inference["overlap"],
                              inference["sw_batch_size"], device)
        for row in target_metrics(pred, case["label"][0], checkpoint["classes"], index.get("regions", {}),
                                  tuple(case["spacing"]), nsd_tolerance_mm, policy):
            rows.append({"dataset": spec["dataset"], "case_id": case_id, **row, "init": spec["init"],
                         "backbone": spec["backbone"]["name"], "protocol": spec["protocol"],
                         "label_fraction": spec["label_fraction"], "subset": spec["subset"], "seed": spec["seed"],
                         "run_id": config["run_id"], "empty_policy": policy_text, "fold": spec.get("fold", 0)})
        log.info("evaluated %s (%d/%d)", case_id, number, len(test_ids))
    table = pd.DataFrame(rows, columns=PER_CASE_COLUMNS)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return Path(out_csv)

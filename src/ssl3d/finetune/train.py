"""Supervised fine-tuning of a segmentation network on one label fraction, with validation-based selection.

The run's protocol (``ssl3d.finetune.protocols``: whole network, linear probe, or frozen then fine-tuned) decides
which network trains and at which rates; its ``augmentation`` preset (``ssl3d.finetune.augment``) what the patches
go through; ``early_stopping: {patience: k}`` stops it after k validations without a better validation Dice;
``loss`` (``ssl3d.finetune.losses``) is softmax Dice + cross-entropy (``dice_ce``, the default) or vox2vec's and
HDSSL's per-class sigmoid BCE + soft Dice (``sigmoid_bce_dice``); ``channels_last`` trains in channels_last_3d
memory order and ``compile`` through ``torch.compile`` (``ssl3d.engine``). The step loop (AMP, clipping, workers,
timing, checkpoint/resume) is the shared ``ssl3d.engine.Engine``: a run killed after its checkpoint at step k and
re-run replays steps k+1... exactly as an uninterrupted run would (on CPU, same thread count), which
``tests/test_resume.py`` checks. A spec without these keys trains as before them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pandas as pd
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
from monai.utils import set_determinism

from ssl3d.checkpoint import save_checkpoint
from ssl3d.data.cache import load_cached_case, read_index
from ssl3d.data.sampling import SeededSamples
from ssl3d.data.splits import run_split, training_cases
from ssl3d.engine import TIMED, Engine
from ssl3d.finetune.augment import augmentation
from ssl3d.finetune.protocols import build_downstream, build_optimization
from ssl3d.io import atomic_path, read_json, write_json
from ssl3d.manifest import run_manifest
from ssl3d.finetune.losses import segmentation_loss
from ssl3d.nets import predict_volume
from ssl3d.plan import read_run

log = logging.getLogger(__name__)

TRAIN_LOG_COLUMNS = ["step", "loss", "loss_dice", "loss_ce", "lr", "val_dice", *TIMED, "peak_memory_mb"]
class PatchSamples(SeededSamples):
    """A case, a foreground/background-balanced patch of it (MONAI's RandCropByPosNegLabeld) and the
    ``augmentation`` preset's transforms of that patch."""

    def __init__(self, cases: list[dict], patch_size, pos_neg, seed: int, length: int, augment: str = "none"):
        keys = ["image", "label"]
        self.crop = Compose([
            SpatialPadd(keys, spatial_size=patch_size),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch_size, pos=pos_neg[0], neg=pos_neg[1],
                                   num_samples=1),
        ])
        self.augment = augmentation(augment)  # never test it for truth: len() of a MONAI Compose reseeds its parts
        super().__init__(cases, seed, length,
                         transforms=[self.crop] + ([] if self.augment is None else [self.augment]))

    def sample(self, case, rng):
        patch = self.crop({"image": case["image"], "label": case["label"]})[0]
        if self.augment is not None:
            patch = self.augment(patch)
        return plain(patch["image"]), plain(patch["label"]).long()


def plain(value) -> torch.Tensor:
    """A transform's output (a MetaTensor, tensor or array) as a plain tensor: batches carry no metadata."""
    return torch.as_tensor(value).as_subclass(torch.Tensor)


def mean_foreground_dice(model, cases: list[dict], n_classes: int, inference: dict, device) -> float:
    """Mean over cases and foreground classes of the Dice of the whole-volume prediction (NaN classes skipped)."""
    scores = []
    for case in cases:
        pred = predict_volume(model, case["image"], inference["roi_size"], inference["overlap"],
                              inference["sw_batch_size"], device)
        dice = compute_dice(one_hot(torch.as_tensor(pred)[None, None], n_classes + 1),
                            one_hot(torch.as_tensor(case["label"])[None].long(), n_classes + 1),
                            include_background=False)
        scores.append(dice)
    return float(torch.nanmean(torch.cat(scores)))


def load_cases(index: dict, case_ids: list[str]) -> list[dict]:
    return [load_cached_case(index["dir"] / index["cases"][case_id]["file"]) for case_id in case_ids]


def finetune(run_config: str | Path | dict, out_dir: str | Path, device: str = "cpu", workers: int = 0,
             log_every: int = 10) -> Path:
    """Train the run described by ``run_config`` (written by the workflow) into ``out_dir``; returns model.pt.

    ``init`` is ``scratch`` or a pre-training method, whose checkpoint (``inputs.pretrained``) initialises the
    network through the verified transfer; the manifest records what was loaded. model.pt holds the weights of the
    validation step with the best Dice; a run where no validation step was selected (NaN scores) fails instead.

    ``out_dir/checkpoints/last.pt`` is written every ``checkpoint_every`` steps; if it exists when this starts,
    training resumes from it.
    """
    config = read_run(run_config)
    run_id, spec, inputs = config["run_id"], config["spec"], config["inputs"]
    out_dir = Path(out_dir)
    device = torch.device(device)
    set_determinism(seed=spec["seed"])

    index = read_index(inputs["cache"])
    splits = run_split(read_json(inputs["splits"]), spec.get("fold"), inputs["splits"])
    classes = {int(k): v for k, v in index["classes"].items()}
    n_classes = len(classes)
    train_cases = load_cases(index, training_cases(splits, spec["label_fraction"], spec["subset"]))
    val_cases = load_cases(index, splits["validation"])

    in_channels = index.get("channels", 1)
    downstream = build_downstream(spec, in_channels, n_classes + 1,
                                  pretrained=None if spec["init"] == "scratch" else inputs["pretrained"])
    model = downstream.model.to(device)
    steps, batch_size = spec["steps"], spec["batch_size"]
    optimizer, scheduler = build_optimization(model, spec, steps)
    engine = Engine(run_id, model, optimizer, scheduler, out_dir, steps, spec["checkpoint_every"], device,
                    grad_clip=spec.get("grad_clip"), channels_last=spec.get("channels_last", False),
                    compile=spec.get("compile", False),
                    precision=spec.get("precision", "auto"), workers=workers, log_every=log_every,
                    fresh={"best": {"score": -1.0, "step": 0, "weights": None}, "validations_since_best": 0})
    loss_fn = segmentation_loss(spec.get("loss", "dice_ce"))

    def forward(batch) -> tuple[torch.Tensor, dict]:
        """The loss and its Dice and (binary) cross-entropy terms."""
        image, label = batch
        return loss_fn(model(image), label)

    patience = spec.get("early_stopping", {}).get("patience")

    def validate(step: int, row: dict) -> bool:
        """Every ``val_every`` steps and at the last: keep the best weights; True once ``patience`` validations in
        a row did not improve on the best."""
        row["val_dice"] = ""
        if step % spec["val_every"] and step != steps:
            return False
        state = engine.state
        row["val_dice"] = score = mean_foreground_dice(model, val_cases, n_classes, spec["inference"], device)
        if score > state["best"]["score"]:
            state["best"] = {"score": score, "step": step, "weights": copy.deepcopy(model.state_dict())}
            state["validations_since_best"] = 0
        else:
            state["validations_since_best"] += 1
        log.info("step %d: validation Dice %.4f (best %.4f at step %d)", step, score, state["best"]["score"],
                 state["best"]["step"])
        return patience is not None and state["validations_since_best"] >= patience

    samples = PatchSamples(train_cases, spec["patch_size"], spec["pos_neg_ratio"], spec["seed"], steps * batch_size,
                           spec.get("augmentation", "none"))
    state = engine.run(samples, batch_size, forward, after_step=validate)
    best = state["best"]
    if not best["step"]:
        scores = ", ".join(f"{row['val_dice']} at step {row['step']}" for row in state["rows"] if row["val_dice"] != "")
        raise ValueError(f"run {run_id}: no validation step was selected (validation Dice: {scores}), so no model.pt "
                         f"was written; check the validation cases ({', '.join(splits['validation'])}) and their "
                         "labels")

    model_path = out_dir / "model.pt"
    save_checkpoint(model_path, {
        "run_id": run_id, "spec": spec, "classes": classes, "in_channels": in_channels,
        "probe_features": downstream.probe_features, "selected_step": best["step"], "validation_dice": best["score"],
        "weights": best["weights"],
    })
    with atomic_path(out_dir / "train_log.csv") as tmp:
        pd.DataFrame(state["rows"], columns=TRAIN_LOG_COLUMNS).to_csv(tmp, index=False)
    write_json(out_dir / "manifest.json", run_manifest(
        spec, run_id, device,
        **engine.measurements(),
        selected_step=best["step"],
        validation_dice=best["score"],
        train_cases=len(train_cases),
        validation_cases=len(val_cases),
        transfer=downstream.transfer,
        protocol=spec.get("protocol", "finetune"),
        probe_features=downstream.probe_features,
        stopped_at_step=state.get("stopped_at"),
    ))
    engine.finish()
    return model_path

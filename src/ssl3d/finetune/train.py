"""Supervised fine-tuning of a segmentation network on one label fraction, with validation-based selection.

Determinism and resume: samples come from ``ssl3d.data.sampling.SeededSamples``, so a run killed after its
checkpoint at step k and re-run replays steps k+1... exactly as an uninterrupted run would (on CPU, same thread
count), which ``tests/test_resume.py`` checks.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from ssl3d.checkpoint import resume, save_checkpoint
from ssl3d.data.cache import load_cached_case, read_index
from ssl3d.data.sampling import SeededSamples
from ssl3d.data.splits import run_split, training_cases
from ssl3d.io import atomic_path, read_json, write_json
from ssl3d.manifest import run_manifest
from ssl3d.nets import build_network, predict_volume
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.transfer import load_pretrained

log = logging.getLogger(__name__)


class PatchSamples(SeededSamples):
    """A case and a foreground/background-balanced patch of it (MONAI's RandCropByPosNegLabeld)."""

    def __init__(self, cases: list[dict], patch_size, pos_neg, seed: int, length: int):
        keys = ["image", "label"]
        self.crop = Compose([
            SpatialPadd(keys, spatial_size=patch_size),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch_size, pos=pos_neg[0], neg=pos_neg[1],
                                   num_samples=1),
        ])
        super().__init__(cases, seed, length, transforms=[self.crop])

    def sample(self, case, rng):
        patch = self.crop({"image": case["image"], "label": case["label"]})[0]
        return patch["image"].as_tensor(), patch["label"].as_tensor().long()


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


def finetune(run_config: str | Path, out_dir: str | Path, device: str = "cpu", log_every: int = 10) -> Path:
    """Train the run described by ``run_config`` (written by the workflow) into ``out_dir``; returns model.pt.

    ``init`` is ``scratch`` or a pre-training method, whose checkpoint (``inputs.pretrained``) initialises the
    network through the verified transfer; the manifest records what was loaded.

    ``out_dir/checkpoints/last.pt`` is written every ``checkpoint_every`` steps; if it exists when this starts,
    training resumes from it.
    """
    config = read_json(run_config)
    run_id, spec, inputs = config["run_id"], config["spec"], config["inputs"]
    out_dir = Path(out_dir)
    device = torch.device(device)
    set_determinism(seed=spec["seed"])

    index = read_index(inputs["cache_index"])
    splits = run_split(read_json(inputs["splits"]), spec.get("fold"), inputs["splits"])
    classes = {int(k): v for k, v in index["classes"].items()}
    n_classes = len(classes)
    train_cases = load_cases(index, training_cases(splits, spec["label_fraction"], spec["subset"]))
    val_cases = load_cases(index, splits["validation"])

    in_channels = index.get("channels", 1)
    model = build_network(spec["backbone"], in_channels=in_channels, out_channels=n_classes + 1)
    transfer = None
    if spec["init"] != "scratch":
        transfer = load_pretrained(model, inputs["pretrained"], spec["backbone"]["name"]).as_dict()
        log.info("initialised from %s (%s): %s", spec["init"], inputs["pretrained"], transfer["fractions"])
    model = model.to(device)
    optimizer = build_optimizer(model, spec["optimizer"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec["steps"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    last = out_dir / "checkpoints" / "last.pt"
    state = resume(last, run_id, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, device,
                   fresh={"step": 0, "history": [], "best": {"score": -1.0, "step": 0, "weights": None}, "seconds": 0.0})
    resumed_from = state["step"]

    steps, batch_size = spec["steps"], spec["batch_size"]
    samples = PatchSamples(train_cases, spec["patch_size"], spec["pos_neg_ratio"], spec["seed"], steps * batch_size)
    loader = DataLoader(samples, batch_size=batch_size, sampler=range(resumed_from * batch_size, steps * batch_size))
    start = time.perf_counter()
    for step, (image, label) in enumerate(loader, start=resumed_from + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image.to(device)), label.to(device))
        loss.backward()
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "val_dice": ""}
        if step % spec["val_every"] == 0 or step == steps:
            score = mean_foreground_dice(model, val_cases, n_classes, spec["inference"], device)
            row["val_dice"] = score
            if score > state["best"]["score"]:
                state["best"] = {"score": score, "step": step, "weights": copy.deepcopy(model.state_dict())}
        state["history"].append(row)
        state["step"] = step
        elapsed = time.perf_counter() - start
        if step % log_every == 0 or step == steps:
            rate = (step - resumed_from) / elapsed
            log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f s%s", step, steps, row["loss"], rate,
                     (steps - step) / rate, f"  val dice {row['val_dice']:.4f}" if row["val_dice"] != "" else "")
        if step % spec["checkpoint_every"] == 0 and step < steps:
            save_checkpoint(last, {"run_id": run_id, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(),
                                   "state": {**state, "seconds": state["seconds"] + elapsed}})
    elapsed = time.perf_counter() - start
    state["seconds"] += elapsed

    model_path = out_dir / "model.pt"
    save_checkpoint(model_path, {
        "run_id": run_id, "spec": spec, "classes": classes, "in_channels": in_channels,
        "selected_step": state["best"]["step"], "validation_dice": state["best"]["score"],
        "weights": state["best"]["weights"],
    })
    with atomic_path(out_dir / "train_log.csv") as tmp:
        pd.DataFrame(state["history"], columns=["step", "loss", "lr", "val_dice"]).to_csv(tmp, index=False)
    write_json(out_dir / "manifest.json", run_manifest(
        spec, run_id, device,
        wall_seconds=round(state["seconds"], 2),
        steps=steps,
        resumed_from_step=resumed_from,
        steps_per_second=round((steps - resumed_from) / elapsed, 3) if steps > resumed_from else None,
        selected_step=state["best"]["step"],
        validation_dice=state["best"]["score"],
        train_cases=len(train_cases),
        validation_cases=len(val_cases),
        transfer=transfer,
    ))
    last.unlink(missing_ok=True)
    return model_path

"""One pre-training loop for every method: data, optimizer and schedule, AMP, clipping, checkpoints, step timing.

A method only says how a region becomes views and which loss terms those views give (``ssl3d.pretrain.method``);
everything here is shared, so methods are compared under the same loop and the same clock.

Per step the loop records the time waiting for data, the forward pass (views to loss terms) and the backward pass
with the optimizer step, synchronised on GPU so that asynchronous kernels are counted where they run, plus peak
memory (allocated GPU memory on CUDA, the process's peak resident set on CPU). The timing charts read
``step_log.csv``.

Like fine-tuning, samples come from ``ssl3d.data.sampling.SeededSamples``, so a killed run resumed from its
checkpoint replays the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, RandSpatialCrop, SpatialPad
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from ssl3d.checkpoint import resume, save_checkpoint
from ssl3d.data.cache import load_cached_case, read_index
from ssl3d.data.sampling import SeededSamples
from ssl3d.io import atomic_path, read_json, write_json
from ssl3d.manifest import peak_memory_mb, run_manifest
from ssl3d.nets import build_network
from ssl3d.pretrain.method import Method, make_config
from ssl3d.pretrain.optim import build_optimizer, build_scheduler
from ssl3d.pretrain.registry import get_method
from ssl3d.pretrain.transfer import plan_transfer

log = logging.getLogger(__name__)


class RegionViews(SeededSamples):
    """A volume of the pool, a random region of the method's size, and the method's views of it."""

    def __init__(self, volumes: list[np.ndarray], method: Method, seed: int, length: int):
        size = method.region_size()
        self.crop = Compose([SpatialPad(size), RandSpatialCrop(size, random_size=False)])
        self.method = method
        super().__init__(volumes, seed, length, transforms=[self.crop])

    def sample(self, volume, rng):
        region = np.asarray(self.crop(volume), dtype=np.float32)
        return {key: torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32))
                for key, view in self.method.make_views(region, rng).items()}


def pretraining_pool(cache_indexes: list[str], cases: list[str]) -> tuple[list[np.ndarray], int]:
    """The (C, X, Y, Z) volumes of every cached dataset of the pool, in the order given, and their channel count C:
    each dataset's unlabelled cases, or all of them where its ``pretrain_cases`` is ``all`` (PGL pre-trains on
    every image of the MSD tasks, labelled ones too). One pool has one channel count (BraTS's four modalities
    pre-train HybridMIM's task-specific rows)."""
    volumes, channels = [], {}
    for path, which in zip(cache_indexes, cases, strict=True):
        index = read_index(path)
        channels[path] = index.get("channels", 1)
        volumes += [load_cached_case(index["dir"] / case["file"])["image"] for case in index["cases"].values()
                    if which == "all" or not case["labelled"]]
    if len(set(channels.values())) > 1:
        raise ValueError(f"one pre-training pool mixes channel counts: {channels}; pre-train on datasets with the "
                         "same channels")
    if not volumes:
        raise ValueError(f"{', '.join(cache_indexes)}: no cases to pre-train on (only labelled ones, and "
                         "pretrain_cases is not 'all')")
    return volumes, next(iter(channels.values()))


def build_method(spec: dict, in_channels: int = 1) -> Method:
    cls = get_method(spec["method"])
    return cls(make_config(cls.Config, spec.get("method_config")), spec["backbone"], in_channels)


def check_transfer(method: Method) -> dict:
    """Verify the declared transfer into a fresh downstream network before any step is spent."""
    downstream = build_network(method.backbone_spec, in_channels=method.in_channels, out_channels=2)
    _, report = plan_transfer(method.state_dict(), downstream, method.backbone_spec["name"], method.transfer)
    log.info("transfer verified: %s", ", ".join(f"{part} {fraction:.0%}" for part, fraction in
                                              report.fractions.items()))
    return report.as_dict()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain(run_config: str | Path, out_dir: str | Path, device: str = "cpu", workers: int = 0,
             log_every: int = 10) -> Path:
    """Pre-train the run described by ``run_config`` into ``out_dir``; returns ``pretrained.pt``."""
    config = read_json(run_config)
    run_id, spec, inputs = config["run_id"], config["spec"], config["inputs"]
    out_dir = Path(out_dir)
    device = torch.device(device)
    set_determinism(seed=spec["seed"])

    volumes, channels = pretraining_pool(inputs["cache_indexes"], [member["data"].get("pretrain_cases", "unlabelled")
                                                                   for member in spec["pool"]])
    method = build_method(spec, channels).to(device)
    transfer_report = check_transfer(method)

    settings = method.config
    steps = spec["steps"]
    optimizer = build_optimizer(method, settings.optimizer)
    scheduler = build_scheduler(optimizer, settings.scheduler, steps)
    last = out_dir / "checkpoints" / "last.pt"
    state = resume(last, run_id, {"method": method, "optimizer": optimizer, "scheduler": scheduler}, device,
                   fresh={"step": 0, "rows": [], "seconds": 0.0})
    resumed_from = state["step"]

    batch_size = settings.batch_size
    samples = RegionViews(volumes, method, spec["seed"], steps * batch_size)
    loader = DataLoader(samples, batch_size=batch_size, num_workers=workers,
                        sampler=range(resumed_from * batch_size, steps * batch_size))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = iter(loader)
    start = time.perf_counter()
    for step in range(resumed_from + 1, steps + 1):
        method.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tick = time.perf_counter()
        batch = {key: value.to(device, non_blocking=True) for key, value in next(batches).items()}
        _synchronize(device)
        loaded = time.perf_counter()
        with autocast:
            terms = method.loss_terms(batch)
            loss = method.total_loss(terms)
        _synchronize(device)
        forwarded = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(method.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        method.after_step(step, steps)
        _synchronize(device)
        done = time.perf_counter()
        state["rows"].append({"step": step, "loss": loss.item(), **{f"loss_{k}": v.item() for k, v in terms.items()},
                              "lr": scheduler.get_last_lr()[0], "data_s": loaded - tick,
                              "forward_s": forwarded - loaded, "backward_s": done - forwarded,
                              "peak_memory_mb": peak_memory_mb(device)})
        state["step"] = step
        elapsed = time.perf_counter() - start
        if step % log_every == 0 or step == steps:
            rate = (step - resumed_from) / elapsed
            log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f s", step, steps, loss.item(), rate,
                     (steps - step) / rate)
        if step % spec["checkpoint_every"] == 0 and step < steps:
            save_checkpoint(last, {"run_id": run_id, "method": method.state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "state": {**state, "seconds": state["seconds"] + elapsed}})
    elapsed = time.perf_counter() - start
    state["seconds"] += elapsed

    pretrained = out_dir / "pretrained.pt"
    save_checkpoint(pretrained, {
        "run_id": run_id, "method": method.name, "method_version": method.version, "backbone": method.backbone_spec,
        "config": dataclasses.asdict(settings), "transfer": dataclasses.asdict(method.transfer),
        "state_dict": method.state_dict(),
    })
    log_table = pd.DataFrame(state["rows"])
    with atomic_path(out_dir / "step_log.csv") as tmp:
        log_table.to_csv(tmp, index=False)
    timing = log_table.iloc[1:] if len(log_table) > 1 else log_table  # the first step pays one-off start-up costs
    write_json(out_dir / "manifest.json", run_manifest(
        spec, run_id, device,
        method_version=method.version,
        method_config=dataclasses.asdict(settings),
        wall_seconds=round(state["seconds"], 2),
        steps=steps,
        resumed_from_step=resumed_from,
        steps_per_second=round((steps - resumed_from) / elapsed, 3) if steps > resumed_from else None,
        median_step_seconds={key: round(float(timing[key].median()), 5)
                             for key in ("data_s", "forward_s", "backward_s")},
        transfer=transfer_report,
        pool_cases=len(volumes),
    ))
    last.unlink(missing_ok=True)
    return pretrained

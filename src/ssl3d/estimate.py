"""The compute a config will cost before anything runs: device-hours and memory per stage, and per-job resources.

Why: a paper config is thousands of runs of hours each; its cost should be known (and a scheduler should know each
job's memory and wall time) before the first job is queued, not from the first job that is killed.

The model. Each run of the plan (``ssl3d.plan``) has an arm: pre-training, its method, method settings (patch and
batch among them), backbone and pool channels; fine-tuning, its backbone, patch, batch, protocol, loss, optimizer and
dataset channels and classes. One training step of an arm (forward, loss, backward, optimizer step) is run once on
PyTorch's ``meta`` device, where tensors have shapes and no data: ``torch.utils.flop_counter.FlopCounterMode`` counts
its FLOPs (matrix products, convolutions, attention: the ops it knows; element-wise ops, normalisation and the
optimizer are not counted), and its peak memory is parameters and buffers + gradients + optimizer state + the
tensors autograd saves for backward (``saved_tensors_hooks``, each storage once), in float32: an upper bound for a
GPU run under bf16 autocast. Boolean-mask indexing is counted as if every element were selected (vox2vec's and
HDSSL's valid voxel pairs: all are, nearly always). A step with an op that has no meta implementation (SwinUNETR
SSL's cutmix pastes by value) is run on the CPU instead, at batch 1 (else 2) and the patch of fewest voxels the arm
runs at whose sides are 1/4, 1/2 or all of its own (rounded up to multiples of 32), and its FLOPs and activations
scaled linearly in batch x voxels; the estimate names such arms. Each arm is counted once per process (memoised
on its canonical JSON), so a config with thousands of runs costs its few arms.

Seconds per step = a fixed part + FLOPs per step / a FLOP rate, both from the benchmark file of a device class
``benchmarks/results/<class>.json`` (written by ``benchmarks/gpu_step.py``, FLOPs counted by this module), which
times each method at two sizes: its paper arm and its demo arm. The line through the two gives the method's fixed
part (where it meets zero FLOPs: Python, kernel launches, small tensors, which dominate a demo-size step) and its
rate; a method timed at one size, or a fine-tuning arm, takes the medians (:func:`step_time_model`). Because the
benchmark times the same counted FLOPs, what the counter leaves out is in the rate. A
run's time is its steps times that (fine-tuning: its ``steps``, an upper bound where early stopping ends it
sooner). Left out: validation and test inference (their sliding windows depend on case sizes the plan does not
know before preprocessing), data loading (loader workers overlap it on a GPU), checkpoints and process start-up.
Device-hours are summed over runs on one device each: the plan holds no GPU count (the profile's ``gpu`` does), and
a run data-parallel over N GPUs takes about 1/N of the time on N devices, the same device-hours at best.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from ssl3d.data import phantom
from ssl3d.data.registry import get_entry
from ssl3d.finetune.losses import segmentation_loss
from ssl3d.nets import build_network
from ssl3d.nets.probe import LinearProbe
from ssl3d.plan import finetune_runs, pretrain_runs, skipped_datasets, used_pretrain_runs
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method
from ssl3d.validate import dataset_channels

CHECKOUT = Path(__file__).resolve().parents[2]
RESULTS = CHECKOUT / "benchmarks" / "results"  # device classes: the benchmark files (a checkout's, not the package's)
MB = 2**20
# job_resources: the margin on the estimate, the memory of a training process before its first step (Python, torch,
# MONAI, the methods: 0.6 GB measured on the CPU, with room for CUDA's libraries) and the smallest requests
MARGIN = 1.5
PROCESS_MB = 1500
MEM_FLOOR_MB = 4000
RUNTIME_FLOOR_MIN = 10
# a run with ``compile``: torch.compile's first step, up to 14 minutes on 2 CPU cores at the papers' sizes
# (benchmarks/official_compare.py --compile: SwinUNETR SSL at 96³, 835 s on AVX2 cores); its later steps are faster
# than the uncompiled ones the model times
COMPILE_MIN = 20


def output_channels(name: str, settings: dict) -> int:
    """Background and classes of a config's dataset as far as the plan can tell: a registry entry's labels, the
    phantoms' organs, a folder's ``labels_map``, else 2 (only the head's width depends on it)."""
    if settings.get("source") == "registry":
        return len(get_entry(settings.get("entry", name)).labels)
    if settings.get("source") == "phantom":
        return len(phantom.LABELS)
    return len(settings.get("labels_map") or ()) or 2


def method_arm(method: str, settings: dict, backbone: dict, in_channels: int = 1) -> dict:
    """What a pre-training step's cost depends on: method, its settings (defaults filled in later), backbone,
    channels."""
    return {"stage": "pretrain", "method": method, "settings": settings, "backbone": backbone,
            "in_channels": in_channels}


def run_arm(stage: str, spec: dict) -> dict:
    """The arm of a run's spec (``ssl3d.plan.pretrain_runs`` / ``finetune_runs``). A probe's pyramid is its
    ``features`` setting, else ``decoder`` (the costlier; the method's default is not in the spec)."""
    if stage == "pretrain":
        channels = max(dataset_channels(member["dataset"], member["data"]) for member in spec["pool"])
        return method_arm(spec["method"], spec["method_config"], spec["backbone"], channels)
    protocol = spec.get("protocol", "finetune")
    return {"stage": "finetune", "backbone": spec["backbone"], "patch_size": list(spec["patch_size"]),
            "batch_size": spec["batch_size"], "protocol": protocol,
            "features": spec.get("protocol_settings", {}).get("features", "decoder") if protocol == "probe" else None,
            "loss": spec.get("loss", "dice_ce"), "optimizer": spec["optimizer"],
            "in_channels": dataset_channels(spec["dataset"], spec["data"]),
            "out_channels": output_channels(spec["dataset"], spec["data"])}


@dataclass(frozen=True)
class StepCost:
    """One training step of an arm: FLOPs (forward + backward), memory held across it (weights, buffers,
    gradients, optimizer state) and activations saved for backward, in bytes; ``counted``: ``meta``, or how the CPU
    fallback counted it and why."""

    flops: float
    state_bytes: int
    activation_bytes: int
    counted: str = "meta"

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def arm_size(arm: dict) -> tuple[list[int], int]:
    """The arm's patch and batch (a method's defaults where its settings leave them)."""
    if arm["stage"] == "pretrain":
        config = make_config(get_method(arm["method"]).Config, arm["settings"])
        return list(config.patch_size), config.batch_size
    return list(arm["patch_size"]), arm["batch_size"]


def resized(arm: dict, patch: list[int], batch: int) -> dict:
    """The arm at another patch and batch."""
    if arm["stage"] == "pretrain":
        return {**arm, "settings": {**arm["settings"], "patch_size": patch, "batch_size": batch}}
    return {**arm, "patch_size": patch, "batch_size": batch}


def _built(make: Callable[[], torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """``make()`` on ``device``; on meta, a network that reads values while it is built (MONAI's SwinUNETR) is
    built on the CPU and moved."""
    if device.type != "meta":
        return make()
    try:
        with device:
            return make()
    except RuntimeError:
        return make().to(device)


def _batch(samples: Callable[[], dict[str, np.ndarray]], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``size`` samples collated as the loader does (float32); on meta one sample gives the shapes."""
    if device.type == "meta":
        return {key: torch.empty((size, *np.shape(value)), device=device) for key, value in samples().items()}
    drawn = [samples() for _ in range(size)]
    return {key: torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.float32) for s in drawn]))
            for key in drawn[0]}


def training_step(arm: dict, device: torch.device):
    """(module, batch, loss of a batch, optimizer settings) of one training step of the arm on ``device``."""
    rng = np.random.default_rng(0)
    if arm["stage"] == "pretrain":
        cls = get_method(arm["method"])
        config = make_config(cls.Config, arm["settings"])
        method = _built(lambda: cls(config, arm["backbone"], arm["in_channels"]), device)
        size = (arm["in_channels"], *method.region_size())
        region = method.prepare_volume(rng.random(size, dtype=np.float32))
        batch = _batch(lambda: method.make_views(region, rng), config.batch_size, device)
        return method, batch, lambda views: method.total_loss(method.loss_terms(views)), config.optimizer

    def network():
        model = build_network(arm["backbone"], arm["in_channels"], arm["out_channels"])
        return LinearProbe(model, arm["out_channels"], arm["features"]) if arm["protocol"] == "probe" else model

    model = _built(network, device)
    shape = (arm["batch_size"], 1, *arm["patch_size"])
    if device.type == "meta":
        batch = {"image": torch.empty((arm["batch_size"], arm["in_channels"], *arm["patch_size"]), device=device),
                 "label": torch.empty(shape, dtype=torch.long, device=device)}
    else:
        batch = {"image": torch.rand((arm["batch_size"], arm["in_channels"], *arm["patch_size"])),
                 "label": torch.randint(arm["out_channels"], shape)}
    loss_fn = segmentation_loss(arm["loss"])
    return model, batch, lambda data: loss_fn(model(data["image"]), data["label"])[0], arm["optimizer"]


def count_step(module: torch.nn.Module, batch, loss: Callable, optimizer_settings: dict) -> StepCost:
    """Run one training step (``loss(batch)``, backward, a step of the optimizer ``optimizer_settings``) counting
    its FLOPs and memory (module docstring)."""
    saved = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # one Python object per storage: its id names it while kept here
        saved[id(storage)] = storage
        return tensor

    with (fx_config.patch(meta_nonzero_assume_all_nonzero=True), FlopCounterMode(display=False) as counter,
          saved_tensors_hooks(keep, lambda tensor: tensor)):
        loss(batch).backward()
    optimizer = build_optimizer(module, optimizer_settings)
    optimizer.step()
    held = list(itertools.chain(module.parameters(), module.buffers()))
    weights = {id(tensor.untyped_storage()) for tensor in held}
    state = (sum(tensor.nbytes for tensor in held)
             + sum(param.grad.nbytes for param in module.parameters() if param.grad is not None)
             + sum(value.nbytes for values in optimizer.state.values() for value in values.values()
                   if torch.is_tensor(value)))
    activations = sum(storage.nbytes() for key, storage in saved.items() if key not in weights)
    return StepCost(float(counter.get_total_flops()), state, activations)


def measure(arm: dict, device: torch.device) -> StepCost:
    """One training step of the arm on ``device`` (meta, or the CPU), counted."""
    return count_step(*training_step(arm, device))


def _label(arm: dict) -> str:
    patch, batch = arm_size(arm)
    what = arm["method"] if arm["stage"] == "pretrain" else arm["protocol"]
    return f"{what} on {arm['backbone']['name']} {'x'.join(map(str, patch))} x{batch}"


def reduced(arm: dict, fractions, batch: int, multiple: int = 16) -> list[dict]:
    """The arm at ``batch`` and at each patch whose sides are its own times one of ``fractions``, rounded up to a
    multiple of ``multiple`` (at most the side), fewest voxels first."""
    patch, _ = arm_size(arm)
    sides = [sorted({min(side, multiple * math.ceil(side * fraction / multiple)) for fraction in fractions})
             for side in patch]
    return [resized(arm, list(small), batch) for small in sorted(itertools.product(*sides), key=math.prod)]


def count_on_cpu(arm: dict, why: str) -> StepCost:
    """The module docstring's CPU fallback: the first reduced size, fewest voxels first, that runs (a method may
    refuse some: SwinUNETR SSL needs two bottleneck tokens and a square rotation plane)."""
    patch, batch = arm_size(arm)
    candidates = sorted((small for size in sorted({1, min(batch, 2)}) for small in
                         reduced(arm, (0.25, 0.5, 1), size, multiple=32)),  # 32: SwinUNETR's token grid
                        key=lambda small: math.prod(arm_size(small)[0]) * arm_size(small)[1])
    failures = []
    for small in candidates:
        small_patch, small_batch = arm_size(small)
        size = f"{'x'.join(map(str, small_patch))} x{small_batch}"
        try:
            cost = measure(small, torch.device("cpu"))
        except (ValueError, RuntimeError) as err:  # a size the method refuses, or torch's shape errors
            failures.append(f"{size}: {err}")
            continue
        scale = batch * math.prod(patch) / (small_batch * math.prod(small_patch))
        return StepCost(cost.flops * scale, cost.state_bytes, round(cost.activation_bytes * scale),
                        f"counted on the CPU at {size}, scaled x{scale:.3g} (on meta: {why})")
    raise ValueError(f"cannot count a step of {_label(arm)}: on meta {why}; on the CPU {'; '.join(failures[:3])}")


@cache
def _cost(key: str) -> StepCost:
    arm = json.loads(key)
    try:
        return measure(arm, torch.device("meta"))
    # a meta tensor has no values: .item() or a Python bool of one raise RuntimeError; .tolist() (SwinUNETR SSL's),
    # data-dependent shapes (nonzero, unique) and ops without a meta kernel raise NotImplementedError
    except (RuntimeError, NotImplementedError) as err:
        return count_on_cpu(arm, str(err).splitlines()[0])


def step_cost(arm: dict) -> StepCost:
    """The arm's :class:`StepCost`, counted once per process (memoised on the arm's canonical JSON)."""
    return _cost(json.dumps(arm, sort_keys=True, separators=(",", ":")))


def device_classes() -> dict[str, Path]:
    """Device class -> its benchmark file (``benchmarks/results/*.json``)."""
    return {path.stem: path for path in sorted(RESULTS.glob("*.json"))}


@cache
def device_class(name: str) -> dict:
    """The benchmark file of a device class; an unknown class is an error naming the measured ones."""
    classes = device_classes()
    if name not in classes:
        raise ValueError(f"--device-class: no benchmark of {name!r}; measured classes: {', '.join(classes) or 'none'} "
                         f"(files in {RESULTS}; `python benchmarks/gpu_step.py` on a machine writes its class)")
    return json.loads(classes[name].read_text())


def _fixed_seconds(entry: dict) -> float | None:
    """Where the line through a method's two measured steps (its demo arm, ``small``, and its paper arm) meets
    zero FLOPs, at least 0; None for a method measured at one size."""
    small = entry.get("small")
    if not small or entry["flops_per_step"] <= small["flops_per_step"]:
        return None
    per_flop = ((entry["seconds_per_step"] - small["seconds_per_step"])
                / (entry["flops_per_step"] - small["flops_per_step"]))
    return max(small["seconds_per_step"] - small["flops_per_step"] * per_flop, 0.0)


def step_time_model(benchmark: dict, method: str | None) -> tuple[float, float]:
    """(fixed seconds per step, FLOP/s) of the method's steps on a device class: a step takes fixed + FLOPs / rate,
    the line through its two measured points (module docstring), so that a small network's step, where Python,
    kernel launches and small tensors weigh most, is not timed as a paper-size one's. A method measured at one size
    takes the median fixed part of those measured at two (0 where none is) and the rate through its one point;
    fine-tuning (method None), the medians of both over the methods."""
    timed = {name: entry for name, entry in benchmark["methods"].items() if entry.get("seconds_per_step")}
    if not timed:
        raise ValueError(f"device class {benchmark['device_class']}: its benchmark file has no timed method")
    measured = [fixed for entry in timed.values() if (fixed := _fixed_seconds(entry)) is not None]
    typical = statistics.median(measured) if measured else 0.0

    def line(entry: dict) -> tuple[float, float]:
        fixed = _fixed_seconds(entry)
        fixed = typical if fixed is None else fixed
        fixed = fixed if entry["seconds_per_step"] > fixed else 0.0
        return fixed, entry["flops_per_step"] / (entry["seconds_per_step"] - fixed)

    if method in timed:
        return line(timed[method])
    return typical, statistics.median(line(entry)[1] for entry in timed.values())


def seconds_per_step(arm: dict, device: str) -> float:
    fixed, rate = step_time_model(device_class(device), arm.get("method"))
    return fixed + step_cost(arm).flops / rate


@dataclass
class Row:
    """Runs of one stage under one label (a pre-training entry, a fine-tuning backbone and protocol)."""

    stage: str
    label: str
    runs: int = 0
    steps: int = 0  # summed over runs
    seconds: float = 0.0  # summed over runs
    peak_bytes: int = 0  # the largest arm's
    notes: tuple[str, ...] = ()

    @property
    def device_hours(self) -> float:
        return self.seconds / 3600


def estimate(config: dict, device: str) -> list[Row]:
    """One :class:`Row` per pre-training entry and per fine-tuning (backbone, protocol) of the config's plan."""
    device_class(device)  # an unknown class fails before any arm is counted
    rows: dict[tuple[str, str], Row] = {}
    finetune = finetune_runs(config)
    plans = (("pretrain", used_pretrain_runs(pretrain_runs(config), finetune), lambda spec: spec["variant"]),
             ("finetune", finetune, lambda spec: f"{spec['backbone']['name']} {spec.get('protocol', 'finetune')}"))
    for stage, runs, label in plans:
        for run in runs.values():
            spec = run["spec"]
            arm = run_arm(stage, spec)
            row = rows.setdefault((stage, label(spec)), Row(stage, label(spec)))
            row.runs += 1
            row.steps += spec["steps"]
            row.seconds += spec["steps"] * seconds_per_step(arm, device)
            cost = step_cost(arm)
            row.peak_bytes = max(row.peak_bytes, cost.peak_bytes)
            if cost.counted != "meta" and cost.counted not in row.notes:
                row.notes += (cost.counted,)
    return list(rows.values())


def estimate_table(config: dict, device: str) -> str:
    """``ssl3d estimate``'s table: a line per row, a total per stage and overall, the benchmark it used."""
    rows = estimate(config, device)
    benchmark = device_class(device)
    lines = [f"device class {device}: {benchmark['device']} (torch {benchmark['torch']}, {benchmark['date']}; "
             f"{device_classes()[device]})",
             f"{'':46}{'runs':>6}{'steps':>12}{'s/step':>10}{'device-h':>12}{'step MB':>10}"]

    def line(label: str, part: list[Row]) -> str:
        runs, steps = sum(r.runs for r in part), sum(r.steps for r in part)
        seconds = sum(r.seconds for r in part)
        hours = sum(r.device_hours for r in part)
        return (f"{label[:46]:46}{runs:>6}{steps:>12}{seconds / max(steps, 1):>10.3g}"
                f"{f'{hours:,.0f}' if hours >= 100 else f'{hours:.3g}':>12}"
                f"{max((r.peak_bytes for r in part), default=0) / MB:>10.0f}")

    for stage in ("pretrain", "finetune"):
        part = [row for row in rows if row.stage == stage]
        lines.append(f"{stage}:")
        lines += [line(f"  {row.label}", [row]) for row in part]
        lines.append(line(f"  {stage} total", part))
        lines += [f"    note ({row.label}): {note}" for row in part for note in row.notes]
    lines.append(line("total", rows))
    lines += [f"skipped dataset {name} (in none of the runs above): {why}"
              for name, why in skipped_datasets(config).items()]
    lines.append("step MB: a step's peak above the process's own (Python, torch, MONAI: about 0.6 GB on a CPU). Left "
                 "out: validation and test inference, data loading, checkpoints, start-up (ssl3d.estimate).")
    return "\n".join(lines)


def job_resources(stage: str, entry: dict, device: str) -> dict[str, int]:
    """Snakemake resources of one run (an entry of ``pretrain_runs`` / ``finetune_runs``) on a device class:
    ``runtime`` in minutes, MARGIN (1.5) times the estimate, plus COMPILE_MIN for a run with ``compile``, at least
    RUNTIME_FLOOR_MIN (covering start-up and the validations the estimate leaves out on small runs); ``mem_mb``, the
    host memory: MARGIN times (PROCESS_MB plus the step's peak on a CPU class, where the step runs in host memory,
    or its weights, gradients and optimizer state on a GPU class, the host's copies for checkpoints), at least
    MEM_FLOOR_MB. A pre-training pool is memory-mapped (``ssl3d.pretrain.loop.Pool``: page cache, not the job's own
    memory); the cases a fine-tuning run holds in memory are not in it: the plan cannot size them.
    Fast for every job of a config: arms are counted once per process (:func:`step_cost`)."""
    spec = entry["spec"]
    arm = run_arm(stage, spec)
    cost = step_cost(arm)
    compiled = (spec["method_config"] if stage == "pretrain" else spec).get("compile", False)
    minutes = MARGIN * spec["steps"] * seconds_per_step(arm, device) / 60 + COMPILE_MIN * compiled
    on_host = cost.peak_bytes if device_class(device)["device_type"] == "cpu" else cost.state_bytes
    return {"mem_mb": max(MEM_FLOOR_MB, math.ceil(MARGIN * (PROCESS_MB + on_host / MB))),
            "runtime": max(RUNTIME_FLOOR_MIN, math.ceil(minutes))}

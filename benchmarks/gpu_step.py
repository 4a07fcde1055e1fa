"""Achieved FLOP/s of one pre-training step of every registered method at its paper size on this machine: the
device class file that ``ssl3d estimate`` reads (``benchmarks/results/<device class>.json``).

Each method runs the arm of the first paper config naming it (``config/experiments/{hybridmim,pgl,hdssl}.yaml``:
its settings and backbone; patch and batch from those settings, else the method's paper defaults); a method in none
of them is skipped, and the file says so. A step is ``method_step.py``'s (views made outside the timed part, then
forward with every loss term, backward, optimizer step and the method's ``after_step``), under bf16 autocast on
CUDA and in float32 on the CPU, as the training engine runs it. Recorded per method: the median seconds of
``--steps`` steps after ``--warmup`` (``torch.cuda.synchronize`` around each), the peak of
``torch.cuda.max_memory_allocated`` (CUDA only: the CPU has no per-method peak), the FLOPs of the step as
``ssl3d.estimate`` counts them, the achieved TFLOP/s and, for a GPU of the table below, its share of the bf16 peak.

Each method is timed at its demo arm too (``config/config.yaml``: a small network and patch, where a step's fixed
costs, Python, kernel launches and small tensors, weigh most), as ``small``: with the paper arm, the two points of
the estimate's step-time model (``ssl3d.estimate.step_time_model``).

``--scale s`` (for a CPU, where paper sizes take minutes a step) multiplies the batch by s and the patch's sides
by s (rounded up to multiples of 16), or, for a method that refuses that patch (HybridMIM's reconstruction region,
SwinUNETR's 32-voxel tokens), by s x 1.5^k per side: the patch of fewest voxels it runs at. Each method's entry
holds the size it ran at.

    python benchmarks/gpu_step.py                           # CUDA, paper sizes: benchmarks/results/<gpu>.json
    python benchmarks/gpu_step.py --device cpu --threads 2 --scale 0.125 --steps 2 --warmup 1 \\
        --device-class cpu-2core
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from method_step import pretraining_step, timed_steps
from ssl3d.engine import bf16_autocast
from ssl3d.estimate import RESULTS, arm_size, method_arm, reduced, step_cost
from ssl3d.plan import pretrain_entries
from ssl3d.pretrain.registry import methods

CHECKOUT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("hybridmim", "pgl", "hdssl")
# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets; without sparsity), by the first name fragment found
# in torch.cuda.get_device_name (so PCIe and NVL before the SXM parts they would otherwise match)
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0))


def paper_arms() -> tuple[dict[str, tuple[dict, str]], list[str]]:
    """Method -> (its arm in the first paper config naming it, where from), and the methods of none."""
    arms = {}
    for paper in PAPER_CONFIGS:
        path = CHECKOUT / "config" / "experiments" / f"{paper}.yaml"
        for entry, settings in pretrain_entries(yaml.safe_load(path.read_text())).items():
            if settings["method"] not in arms:
                arms[settings["method"]] = (method_arm(settings["method"], settings["overrides"], settings["backbone"]),
                                            f"{path.relative_to(CHECKOUT)}: pretrain.methods.{entry}")
    return arms, [name for name in methods() if name not in arms]


def demo_arms() -> dict[str, dict]:
    """Method -> its arm in the demo (``config/config.yaml``): the small point of the estimate's step-time model."""
    config = yaml.safe_load((CHECKOUT / "config" / "config.yaml").read_text())
    return {settings["method"]: method_arm(settings["method"], settings["overrides"], settings["backbone"])
            for settings in pretrain_entries(config).values()}


def scaled(arm: dict, scale: float) -> dict:
    """The arm at ``scale`` (module docstring): the batch times ``scale`` and the patch of fewest voxels, its sides
    times ``scale`` or more, that the method runs at (counted by ``ssl3d.estimate``); at 1, the arm itself."""
    if scale == 1:
        return arm
    batch = max(1, round(arm_size(arm)[1] * scale))
    fractions = [scale * 1.5**k for k in range(math.ceil(math.log(1 / scale, 1.5)))] + [1]
    for small in reduced(arm, fractions, batch):
        try:
            step_cost(small)
            return small
        except (ValueError, RuntimeError):  # a size the method refuses
            continue
    raise ValueError(f"{arm['method']}: runs at none of the sizes of scale {scale} and more at batch {batch}")


def bf16_peak(name: str) -> float | None:
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in name), None)


def step_args(arm: dict) -> SimpleNamespace:
    """``method_step.py``'s arguments for the arm's pre-training step, its patch and batch spelt out."""
    patch, batch = arm_size(arm)
    settings = {**arm["settings"], "patch_size": patch, "batch_size": batch}
    return SimpleNamespace(method=arm["method"], settings=json.dumps(settings), backbone=json.dumps(arm["backbone"]))


def time_method(arm: dict, device: torch.device, warmup: int, steps: int, small: dict | None = None) -> dict:
    """One method's entry (module docstring), with ``small`` (its demo arm) timed too where given."""
    patch, batch = arm_size(arm)
    args = step_args(arm)
    cost = step_cost(arm)
    entry = {"backbone": arm["backbone"], "patch_size": patch, "batch_size": batch,
             "flops_per_step": cost.flops, "flops_counted": cost.counted}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    views, step = pretraining_step(args, device)
    _, compute = timed_steps(views, step, device, warmup, steps)
    seconds = statistics.median(compute)
    entry.update(seconds_per_step=seconds, steps_timed=steps, achieved_tflops=cost.flops / seconds / 1e12)
    if small:
        # a small step is cheap and noisier (a few milliseconds): timed over more steps
        entry["small"] = {key: value for key, value in time_method(small, device, warmup, max(20, 3 * steps)).items()
                          if key in ("backbone", "patch_size", "batch_size", "flops_per_step", "seconds_per_step")}
    if device.type == "cuda":
        entry["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        peak = bf16_peak(torch.cuda.get_device_name(device))
        if peak:
            entry["peak_share"] = entry["achieved_tflops"] / peak
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="patch sides and batch times this (<= 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (their median is recorded)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: every registered one)")
    parser.add_argument("--device-class", help="the file's name (default: the GPU's name, or cpu-<threads>core)")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale {args.scale}: use a value in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    device_class = args.device_class or (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
                                         if device.type == "cuda" else f"cpu-{torch.get_num_threads()}core")
    arms, skipped = paper_arms()
    small = demo_arms()
    result = {"device_class": device_class, "device": name, "device_type": device.type, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "dtype": "bf16 autocast" if bf16_autocast(device, "auto") else "float32", "scale": args.scale,
              "methods": {},
              "skipped": {method: "in no paper config" for method in skipped}}
    for method, (arm, source) in arms.items():
        if args.methods and method not in args.methods:
            continue
        try:
            result["methods"][method] = {"source": source,
                                         **time_method(scaled(arm, args.scale), device, args.warmup, args.steps,
                                                       small.get(method))}
        except torch.cuda.OutOfMemoryError as err:
            result["skipped"][method] = f"out of memory: {str(err).splitlines()[0]}"
        print(method, json.dumps(result["methods"].get(method) or result["skipped"][method]), file=sys.stderr)
    out = RESULTS / f"{device_class}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Run manifests: what produced a result, so every number can be traced to code, config and hardware."""

from __future__ import annotations

import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from ssl3d import __version__
from ssl3d.distributed import world_size
from ssl3d.plan import canonical_hash

PACKAGES = ("ssl3d", "torch", "monai", "numpy", "nibabel", "pandas", "scipy", "snakemake")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the suite's checkout, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    # the vector instructions PyTorch's CPU kernels use (AVX2, AVX512): they set a CPU step's speed
    return (f"cpu: {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def compute_spent(device: torch.device, wall_seconds: float | None) -> dict:
    """What the run cost in device time, for the report's compute accounting: the device type, how many devices
    trained together (one per process: torchrun's world size, 1 for a single process) and device-seconds, the
    training loop's wall time on every one of them, since N devices busy for an hour cost N device-hours. None where
    the run timed no training loop."""
    count = world_size()
    return {"device_type": device.type, "device_count": count,
            "device_seconds": None if wall_seconds is None else round(wall_seconds * count, 2)}


def run_manifest(spec: dict, run_id: str, device: torch.device, **measurements) -> dict:
    """The manifest of a run; ``measurements`` are the run's own fields, the engine's timing among them, whose
    ``wall_seconds`` (the training loop's) gives the device-seconds (:func:`compute_spent`)."""
    return {
        "run_id": run_id,
        "config_hash": canonical_hash(spec),
        "config": spec,
        "seed": spec.get("seed"),
        "code_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_description(device),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        **measurements,
        **compute_spent(device, measurements.get("wall_seconds")),
    }

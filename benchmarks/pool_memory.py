"""Memory and sample time of a pre-training pool read on demand (``ssl3d.pretrain.loop.Pool``) against the pool
loaded whole, as the loop did before: peak resident memory of a process that builds the pool and draws samples.

It writes ``--cases`` synthetic cached cases of ``--shape`` into a temporary folder, then, in a fresh process per
mode (so each peak is its own), builds the method's ``RegionViews`` over the pool and draws ``--samples`` samples:

* ``mapped``: the suite's pool, each volume memory-mapped when a sample draws it (and, for a method that prepares
  its volumes, prepared once into a store on disk);
* ``loaded``: every case read into memory and prepared up front.

    python benchmarks/pool_memory.py models_genesis --cases 16 --shape 256 256 128
    python benchmarks/pool_memory.py vox2vec --cases 16 --shape 256 256 128

Prints per mode the peak resident set (``ru_maxrss``: anonymous memory plus the file pages the process touched),
the seconds to build the pool and the median milliseconds per sample (crop, views), then the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {"patch_size": [64, 64, 32], "batch_size": 2}
BACKBONE = {"name": "unet", "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}


def write_cases(folder: Path, cases: int, shape: tuple[int, int, int]) -> list[Path]:
    from ssl3d.data.cache import write_case

    rng = np.random.default_rng(0)
    files = []
    for i in range(cases):
        files.append(folder / f"case_{i:03d}.npz")
        write_case(files[-1], {"image": rng.random(shape, dtype=np.float32)}, "benchmark", {})
    return files


def measure(method_name: str, mode: str, folder: Path, samples: int) -> dict:
    """Run in a fresh process: build the pool in ``mode``, draw ``samples`` samples, report time and peak memory."""
    import torch

    from ssl3d.data.cache import load_cached_case
    from ssl3d.pretrain.loop import Pool, RegionViews
    from ssl3d.pretrain.method import make_config
    from ssl3d.pretrain.registry import get_method

    cls = get_method(method_name)
    settings = {**SETTINGS, **({"max_voxels": 256} if method_name in ("vox2vec", "hdssl") else {})}
    method = cls(make_config(cls.Config, settings), BACKBONE)
    files = sorted(folder.glob("case_*.npz"))
    start = time.perf_counter()
    if mode == "mapped":
        volumes = Pool(files, method, folder / f"store-{method_name}")
    else:
        volumes = [method.prepare_volume(load_cached_case(file)["image"]) for file in files]
    built = time.perf_counter() - start
    views = RegionViews(volumes, method, seed=0, length=samples)
    seconds = []
    for i in range(samples):
        start = time.perf_counter()
        views[i]
        seconds.append(time.perf_counter() - start)
    torch.set_num_threads(1)
    return {"mode": mode, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "build_s": round(built, 2), "median_sample_ms": round(1000 * statistics.median(seconds), 2),
            "first_samples_ms": [round(1000 * s, 1) for s in seconds[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a registered method")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.method, args.measure[0], Path(args.measure[1]), args.samples)))
        return
    with tempfile.TemporaryDirectory(prefix="pool_memory.") as folder:
        files = write_cases(Path(folder), args.cases, tuple(args.shape))
        pool_mib = sum(file.stat().st_size for file in files) / 2**20
        results = []
        for mode in ("mapped", "loaded"):
            out = subprocess.run([sys.executable, __file__, args.method, "--samples", str(args.samples),
                                  "--measure", mode, folder], check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.method}: {args.cases} cases of {'x'.join(map(str, args.shape))} ({pool_mib:.0f} MiB cached), "
          f"{args.samples} samples")
    for result in results:
        print(f"  {result['mode']:7} peak resident {result['peak_rss_mib']:6} MiB, pool built in "
              f"{result['build_s']:.2f} s, {result['median_sample_ms']:.1f} ms per sample (first "
              f"{', '.join(map(str, result['first_samples_ms']))} ms)")
    print(json.dumps({"method": args.method, "cases": args.cases, "shape": args.shape, "pool_mib": round(pool_mib),
                      "samples": args.samples, "results": results}))


if __name__ == "__main__":
    main()

"""Time per HybridMIM pre-training step against the reconstruction region size (the paper's Figure 6b).

Partial region prediction decodes only the target region; this measures what that saves. For each region size
it times full training steps (views already on the device: forward with every loss term, backward, optimizer
step) and reports the median, then the ratio of full-volume to partial-region reconstruction.

    python benchmarks/hybridmim_region_size.py                       # CPU, demo-sized network, 96^3 crops
    python benchmarks/hybridmim_region_size.py --device cuda --features 64 64 128 256 512   # the paper's setting
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ssl3d.engine import forward_autocast
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method


def step_seconds(size: int | None, args, device: torch.device) -> list[float]:
    cls = get_method("hybridmim")
    config = make_config(cls.Config, {"patch_size": [args.crop] * 3, "batch_size": args.batch,
                                      "reconstruction_size": size})
    torch.manual_seed(0)
    method = cls(config, {"name": "hybridmim_unet", "features": args.features}).to(device)
    optimizer = build_optimizer(method, config.optimizer)
    rng = np.random.default_rng(0)
    samples = [method.make_views(rng.random((1, args.crop, args.crop, args.crop), dtype=np.float32), rng)
               for _ in range(args.batch)]
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])).to(device) for key in samples[0]}
    times = []
    for _ in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with forward_autocast(device):
            loss = method.total_loss(method.loss_terms(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, nargs=5, default=[8, 8, 16, 32, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 80],
                        help="region edges in voxels (multiples of 8); the full crop is always added")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for size in [*args.sizes, None]:
        seconds = step_seconds(size, args, device)
        label = f"{size}^3" if size else f"full {args.crop}^3"
        results[label] = statistics.median(seconds)
        print(f"region {label:>10}: median {results[label] * 1000:7.1f} ms/step over {len(seconds)} steps", flush=True)
    full = results[f"full {args.crop}^3"]
    for label, value in results.items():
        print(f"full / {label}: {full / value:.2f}x")
    print(json.dumps({"device": str(device), "threads": args.threads, "crop": args.crop, "batch": args.batch,
                      "features": args.features, "median_seconds": results}))


if __name__ == "__main__":
    main()

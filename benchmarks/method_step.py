"""Time and memory of one pre-training step of any registered method on any backbone, with its data-wait share.

A step is what the training engine runs per batch: the method's views of ``batch`` regions (``make_views`` in
the data loader; with no loader workers the training process waits for it), then forward with every loss term,
backward and the optimizer step. This reports the median of each over ``--steps`` timed steps after ``--warmup``,
the share of the step spent making views (the data wait without workers) and the peak memory: the process's peak
resident set on CPU (weights, activations and the allocator's cache), ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/method_step.py pgl --backbone '{"name": "unet", "channels": [8, 16, 32, 64],
        "strides": [2, 2, 2], "num_res_units": 1}' --settings '{"patch_size": [32, 32, 32], "batch_size": 4}'
    python benchmarks/method_step.py pgl --backbone '{"name": "pgl_segnet"}' --settings \\
        '{"patch_size": [96, 96, 16], "batch_size": 2}'
    python benchmarks/method_step.py --finetune --backbone '{"name": "pgl_segnet"}' --patch 128 128 32 --batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from ssl3d.engine import forward_autocast, to_device
from ssl3d.finetune.losses import segmentation_loss
from ssl3d.nets import build_network
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method


def _synchronised(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_steps(views, step, device: torch.device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds making the batch and running the step, for each of ``steps`` steps after ``warmup``."""
    data, compute = [], []
    for i in range(warmup + steps):
        start = _synchronised(device)
        batch = views()
        made = _synchronised(device)
        step(batch, i)
        done = _synchronised(device)
        if i >= warmup:
            data.append(made - start)
            compute.append(done - made)
    return data, compute


def pretraining_step(args, device: torch.device, precision: str = "auto"):
    """(make a batch of views, run one step) for the method; its forward at ``precision``, in the memory order of
    its ``channels_last`` setting and through ``torch.compile`` with its ``compile`` setting, as the training engine
    runs it (``auto``: bf16 autocast on CUDA, float32 on CPU)."""
    cls = get_method(args.method)
    config = make_config(cls.Config, json.loads(args.settings))
    torch.manual_seed(0)
    method = cls(config, json.loads(args.backbone)).to(device)
    if config.channels_last:
        method.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(method, config.optimizer)
    rng = np.random.default_rng(0)
    region = method.prepare_volume(rng.random((1, *method.region_size()), dtype=np.float32))

    def views():
        samples = [method.make_views(region, rng) for _ in range(config.batch_size)]
        return to_device({key: torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.float32) for s in samples]))
                          for key in samples[0]}, device, config.channels_last)

    def loss_of(batch):
        return method.total_loss(method.loss_terms(batch))

    compiled = torch.compile(loss_of) if config.compile else loss_of

    def step(batch, i):
        with forward_autocast(device, precision):
            loss = compiled(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(i, 1000)

    return views, step


def finetuning_step(args, device: torch.device):
    """(make a batch of patches, run one Dice + CE step) for a segmentation network (no augmentation)."""
    torch.manual_seed(0)
    network = build_network(json.loads(args.backbone), in_channels=1, out_channels=args.classes).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    loss_fn = segmentation_loss("dice_ce")
    rng = np.random.default_rng(0)

    def views():
        image = torch.from_numpy(rng.random((args.batch, 1, *args.patch), dtype=np.float32))
        label = torch.from_numpy(rng.integers(0, args.classes, (args.batch, 1, *args.patch)))
        return {"image": image.to(device), "label": label.to(device)}

    def step(batch, i):
        loss, _ = loss_fn(network(batch["image"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return views, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", nargs="?", help="a registered method (pre-training step)")
    parser.add_argument("--finetune", action="store_true", help="time a fine-tuning step of the backbone instead")
    parser.add_argument("--backbone", required=True, help="the backbone entry, JSON")
    parser.add_argument("--settings", default="{}", help="method settings, JSON (pre-training)")
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 128, 32), help="fine-tuning patch")
    parser.add_argument("--batch", type=int, default=2, help="fine-tuning batch")
    parser.add_argument("--classes", type=int, default=14, help="fine-tuning classes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not args.finetune and not args.method:
        parser.error("name a method, or pass --finetune")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    views, step = (finetuning_step if args.finetune else pretraining_step)(args, device)
    data, compute = timed_steps(views, step, device, args.warmup, args.steps)
    data_s, step_s = statistics.median(data), statistics.median(compute)
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"what": "finetune" if args.finetune else args.method, "backbone": json.loads(args.backbone),
                      "data_s": round(data_s, 4), "step_s": round(step_s, 4),
                      "data_share": round(data_s / (data_s + step_s), 3), "peak_memory_mb": round(peak_mb),
                      "device": str(device), "threads": args.threads}))


if __name__ == "__main__":
    main()

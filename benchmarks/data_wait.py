"""Data wait at each method's paper input size: the seconds its views of one step take in the data loader, against
the step's own seconds on a device class, and the loader workers that keep the wait within 5% of the step.

Per method, the arm of the first paper config naming it (as ``gpu_step.py``). Views: ``make_views`` of a random
region of the method's size, prepared once as the loader prepares each scan (``prepare_volume``), ``batch_size``
per step; the median over ``--steps`` steps, on one CPU thread (as a loader worker runs). Step: ``ssl3d estimate``'s
seconds per step on the device class (the step's counted FLOPs at the FLOP/s measured there by ``gpu_step.py``).

With no worker the training process draws each batch in a background thread while the step before it runs
(``ssl3d.engine.drawn_ahead``: on a GPU, or where torch leaves a core free), with W workers each worker draws whole
batches on its own core: P = max(W, 1) producers make a batch every views / P seconds, so in steady state a step
waits max(0, views / P - step) (a CPU run whose steps take every core draws in the training thread instead: its
wait is all of the views). The wait stays within 5% of the step (wait <= 0.05 x (step + wait)) from
P = ceil(views / (step x (1 + 0.05 / 0.95))) producers on: 0 workers where one suffices. The training rules give a
GPU job's process all its threads but one as workers (``workflow/rules/common.smk``, ``loader_workers``): the last
column plus one is the threads per GPU that a profile needs.

    python benchmarks/data_wait.py --device cpu-2core
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from gpu_step import paper_arms, step_args
from method_step import pretraining_step

from ssl3d.estimate import arm_size, device_class, device_classes, seconds_per_step

SHARE = 0.05


def views_seconds(arm: dict, steps: int) -> float:
    """Median seconds of one step's views of the arm (module docstring), made as ``method_step.py`` makes them."""
    views, _ = pretraining_step(step_args(arm), torch.device("cpu"))
    times = []
    for _ in range(steps + 1):  # the first is left out: it pays one-off costs (e.g. a cached Bezier basis)
        start = time.perf_counter()
        views()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def producers_needed(views: float, step: float) -> int:
    """The fewest producers of batches keeping the wait within ``SHARE`` of the step (module docstring)."""
    return max(math.ceil(views / (step * (1 + SHARE / (1 - SHARE)))), 1)


def wait_share(views: float, step: float, ahead: bool) -> float:
    """The share of a step spent waiting for its batch, drawn one step ahead or in the training thread."""
    wait = max(views - step, 0.0) if ahead else views
    return wait / (step + wait)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, choices=sorted(device_classes()),
                        help="the device class whose step times to compare with (benchmarks/results/)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of views per method")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: every one in a paper config)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ahead = device_class(args.device)["device_type"] != "cpu"  # a CPU class's steps were timed on every core
    arms, _ = paper_arms()
    print(f"| method | patch x batch | views s/step | step s ({args.device}) | data wait, no worker | "
          f"workers for <= {SHARE:.0%} |")
    print("|:--|:--|--:|--:|--:|--:|")
    for name, (arm, _) in arms.items():
        if args.methods and name not in args.methods:
            continue
        patch, batch = arm_size(arm)
        views, step = views_seconds(arm, args.steps), seconds_per_step(arm, args.device)
        producers = producers_needed(views, step)
        print(f"| {name} | {'x'.join(map(str, patch))} x {batch} | {views:.3f} | {step:.3f} | "
              f"{wait_share(views, step, ahead):.1%} | {producers if producers > 1 else 0} |", flush=True)


if __name__ == "__main__":
    main()

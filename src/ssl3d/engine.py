"""The one training engine of pre-training, fine-tuning and probing: the step loop and what surrounds it.

Why one: methods and downstream protocols are compared under the same loop and the same clock, so data loading,
AMP, gradient clipping, checkpoints, timing and progress are written once.
A caller brings the model with its optimizer and schedule, a ``SeededSamples`` dataset and a function from a batch
to its loss and named loss terms; two hooks do the rest: ``after_update`` right after the optimizer step, as part
of it (an EMA target update), and ``after_step`` once the step is logged (validation, a request to stop early).

Per step the engine records the time waiting for data, the forward pass (batch to loss terms) and the backward pass
with clipping, optimizer and schedule step and ``after_update``, synchronised on GPU so that asynchronous kernels
are counted where they run, and peak memory (``ssl3d.manifest.peak_memory_mb``). ``after_step`` runs after these
timings (a validation is not a training step), within the wall time.

``precision`` (a setting of the run) says what the forward pass runs in: ``auto``, bf16 autocast on CUDA and
float32 on CPU; ``bfloat16``, bf16 autocast on either (on a CPU with AMX or AVX512-BF16, oneDNN's bf16 convolutions
make a step 1.2-2.3x faster: the demo's UNet 46 -> 37 ms, a 96³ UNet 4.1 -> 1.9 s; a CPU without them emulates
bf16, slower, and the run's log says so); ``float32``, float32 on either (a GPU run that keeps CPU numerics). The
weights, optimizer and evaluation stay float32; the manifest records the precision a run used.

``channels_last`` keeps the network's convolution weights and the batch's volumes in channels_last_3d order:
oneDNN's CPU convolutions over few channels (the 7-channel output block of the demo's UNet: 37 -> 11 ms forward and
backward) are much faster in it; the sums run in another order, so the numbers differ by rounding, and it is a
setting of the run (fine-tuning's ``channels_last``), off by default.

``compile`` runs the caller's ``forward`` (batch to loss terms: the networks and the loss) through
``torch.compile`` (Inductor), which fuses the element-wise work between the convolutions and matrix products
(normalisations, activations, window shifts, masks): at the papers' sizes on 2 CPU cores a HybridMIM Swin step
takes 0.67x the official code's time instead of 0.95x, a vox2vec step 0.73x instead of 0.84x, a convolution-bound
Models Genesis step barely changes (``benchmarks/official_compare.py --compile``; the README lists all six). The
first step pays the compilation (up to 14 minutes on 2 cores; Inductor caches it on disk for the next run of the same
shapes), which the step log's medians leave out; fused kernels round differently, so it is a setting of the run, off
by default.

Determinism and resume: sample ``i`` depends only on (seed, i) (``ssl3d.data.sampling``) and the sampler starts at
the resumed step, so a run killed after its checkpoint at step k and re-run replays steps k+1... exactly as an
uninterrupted run would (on CPU, same thread count); ``tests/test_resume.py`` checks it for both stages. A loss
that is not finite stops the run before its backward pass, with an error naming the step and each loss term, and
before the caller writes anything final.

Several processes (``ssl3d.distributed``; only pre-training uses them): ``batch_size`` stays the batch of a step,
each process loads its share of it (``ssl3d.data.sampling.StepShards``), and the caller's ``forward`` runs the
DistributedDataParallel-wrapped model, which averages the gradients in the backward pass, so every process takes
the same optimizer step. The step log's losses are averaged over the processes (the loss of the whole batch for a
loss that averages over samples; the non-finite check reads them, so every process stops at the same step); its
timings and memory are rank 0's. Rank 0 alone writes the checkpoint; every process resumes from it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ssl3d.checkpoint import resume, save_checkpoint
from ssl3d.data.sampling import StepShards
from ssl3d.distributed import is_main, mean_over_ranks, rank, world_size
from ssl3d.manifest import peak_memory_mb

log = logging.getLogger(__name__)

# a batch (on the device) -> (loss, named loss terms); the loss is what is back-propagated
Forward = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (step, its log row) -> True to stop after this step; may add columns to the row
AfterStep = Callable[[int, dict], bool | None]
AfterUpdate = Callable[[int], None]
TIMED = ("data_s", "forward_s", "backward_s")
PRECISIONS = ("auto", "float32", "bfloat16")


def bf16_autocast(device: torch.device, precision: str) -> bool:
    """Whether the forward pass runs under bf16 autocast on ``device`` at ``precision`` (module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision == "bfloat16" or (precision == "auto" and device.type == "cuda")


def forward_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The context a forward pass runs in at ``precision`` (the engine's, and the benchmarks' that time its step)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(device, precision))


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); torch's own private probes, so an older or
    newer torch without them counts as native (no warning) rather than failing."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe) or not any(probes)


class NonFiniteLoss(ValueError):
    """A step's loss is NaN or infinite: the run stops before that step's update and writes nothing final."""


def to_device(batch, device: torch.device, channels_last: bool = False):
    """A collated batch (a tensor, or a dict, list or tuple of them) on ``device``; with ``channels_last`` its
    volumes (5-D tensors) in channels_last_3d order."""
    if isinstance(batch, dict):
        return {key: to_device(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [to_device(value, device, channels_last) for value in batch]
    if channels_last and batch.dim() == 5:
        return batch.to(device, non_blocking=True, memory_format=torch.channels_last_3d)
    return batch.to(device, non_blocking=True)


def drawn_ahead(batches: Iterator) -> Iterator:
    """The batches of ``batches``, each drawn in a background thread while the step before it runs.

    Without loader workers the training process makes its own batches; drawn one step ahead on a core the step
    leaves free (``core_left_for_batches``; numpy and torch release the GIL in their kernels) they overlap the step,
    so a step waits only for what the step before left undone. A thread, not a worker process: no copy of the batch
    between processes and no second interpreter. One thread draws the samples in order, so batch k is what the
    training thread would have drawn.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="batches") as pool:
        ahead = pool.submit(next, batches, None)
        while (batch := ahead.result()) is not None:
            ahead = pool.submit(next, batches, None)
            yield batch


def core_left_for_batches(device: torch.device) -> bool:
    """Whether a thread drawing batches (``drawn_ahead``) would have a core to itself: on a GPU, where the training
    thread mostly waits for the device, or where torch's threads leave one of the process's cores free. Measured
    on 2 cores, 80 demo-sized Models Genesis steps: torch on 1 thread 7.5 -> 5.6 s with the drawing thread, on both
    6.4 -> 6.7 s (the thread pre-empts torch's); two 1-thread jobs at once (the demo) neither gain nor lose."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return device.type != "cpu" or torch.get_num_threads() < cores


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Engine:
    """Trains ``model`` for ``steps`` optimizer steps, resuming from ``out_dir/checkpoints/last.pt`` if it exists.

    The checkpoint (every ``checkpoint_every`` steps) holds the model's weights under ``model_key``, the optimizer,
    the schedule and ``state``: ``step``, ``rows`` (the step log), ``seconds`` (wall time over all sessions) and the
    caller's own keys, given with their initial values in ``fresh`` (e.g. the best validation so far), which the
    caller's hook reads and updates in ``engine.state``.
    """

    run_id: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out_dir: Path
    steps: int
    checkpoint_every: int
    device: torch.device
    model_key: str = "model"
    grad_clip: float | None = None
    channels_last: bool = False
    compile: bool = False
    precision: str = "auto"
    workers: int = 0
    log_every: int = 10
    fresh: dict = field(default_factory=dict)

    def __post_init__(self):
        self.bf16 = bf16_autocast(self.device, self.precision)
        if self.bf16 and self.device.type == "cpu" and not native_cpu_bf16():
            log.warning("precision bfloat16: this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and the "
                        "steps are slower than in float32 (precision: auto)")
        if self.channels_last:  # in place: the optimizer keeps the same parameters
            self.model.to(memory_format=torch.channels_last_3d)
        self.last = Path(self.out_dir) / "checkpoints" / "last.pt"
        modules = {self.model_key: self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        self.state = resume(self.last, self.run_id, modules, self.device,
                            fresh={"step": 0, "rows": [], "seconds": 0.0, **self.fresh})
        self.resumed_from = self.state["step"]
        self.elapsed = 0.0  # this session's seconds

    def run(self, samples: Dataset, batch_size: int, forward: Forward, after_update: AfterUpdate | None = None,
            after_step: AfterStep | None = None) -> dict:
        """Train from the resumed step to ``steps``, or to the step after which ``after_step`` returns True
        (recorded as ``state["stopped_at"]``); returns ``state``. ``batch_size``: a step's, over all processes."""
        shards = StepShards(self.resumed_from, self.steps, batch_size, rank(), world_size())
        loader = DataLoader(samples, batch_size=shards.per_process, num_workers=self.workers, sampler=shards)
        ahead = not self.workers and core_left_for_batches(self.device)
        batches = drawn_ahead(iter(loader)) if ahead else iter(loader)
        if self.compile:
            forward = torch.compile(forward)
        start = time.perf_counter()
        for step in range(self.resumed_from + 1, self.steps + 1):
            row = self._step(step, batches, forward, after_update)
            stop = bool(after_step and after_step(step, row))
            self.state["rows"].append(row)
            self.state["step"] = step
            self.elapsed = time.perf_counter() - start
            if step % self.log_every == 0 or step == self.steps or stop:
                rate = (step - self.resumed_from) / self.elapsed
                log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f s", step, self.steps, row["loss"], rate,
                         (self.steps - step) / rate)
            if stop:
                log.info("stopping after step %d of %d", step, self.steps)
                self.state["stopped_at"] = step
                break
            if step % self.checkpoint_every == 0 and step < self.steps and is_main():
                save_checkpoint(self.last, {
                    "run_id": self.run_id, self.model_key: self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "state": {**self.state, "seconds": self.state["seconds"] + self.elapsed}})
        self.elapsed = time.perf_counter() - start
        self.state["seconds"] += self.elapsed
        return self.state

    def _step(self, step: int, batches, forward: Forward, after_update: AfterUpdate | None) -> dict:
        """One timed optimizer step; returns its row of the step log."""
        device = self.device
        self.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tick = time.perf_counter()
        batch = to_device(next(batches), device, self.channels_last)
        _synchronize(device)
        loaded = time.perf_counter()
        with forward_autocast(device, self.precision):
            loss, terms = forward(batch)
        _synchronize(device)
        forwarded = time.perf_counter()
        values = mean_over_ranks({"loss": loss, **{f"loss_{name}": term for name, term in terms.items()}})
        if not math.isfinite(values["loss"]):
            terms_text = ", ".join(f"{k} {v}" for k, v in values.items() if k != "loss")
            raise NonFiniteLoss(
                f"step {step}: the loss is {values['loss']} ({terms_text}); "
                "nothing final was written. Lower optimizer.lr, set grad_clip, or check the inputs; a re-run resumes "
                f"from the last checkpoint (delete {self.last} to start over)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if after_update:
            after_update(step)
        _synchronize(device)
        done = time.perf_counter()
        return {"step": step, **values, "lr": self.scheduler.get_last_lr()[0],
                "data_s": loaded - tick, "forward_s": forwarded - loaded, "backward_s": done - forwarded,
                "peak_memory_mb": peak_memory_mb(device)}

    def measurements(self) -> dict:
        """The manifest's timing fields: wall time over all sessions, the precision of the forward passes, this
        session's steps per second, and the median time of each part of a step (the first step left out: it pays
        one-off start-up costs)."""
        rows = pd.DataFrame(self.state["rows"], columns=["step", *TIMED])
        timing = rows.iloc[1:] if len(rows) > 1 else rows
        ran = self.state["step"] - self.resumed_from
        return {"wall_seconds": round(self.state["seconds"], 2), "steps": self.steps,
                "precision": "bfloat16 autocast" if self.bf16 else "float32",
                "resumed_from_step": self.resumed_from,
                "steps_per_second": round(ran / self.elapsed, 3) if ran > 0 else None,
                "median_step_seconds": {key: round(float(timing[key].median()), 5) for key in TIMED}}

    def finish(self) -> None:
        """Call once the outputs are written: the resumable checkpoint is no longer needed."""
        self.last.unlink(missing_ok=True)

"""Multi-process data-parallel training with ``torch.distributed``: the few pieces the engine and the pre-training
loop share.

Why: the official HybridMIM and SwinUNETR recipes train on several GPUs (a batch per GPU times the GPUs); one
process per GPU, launched by ``torchrun --standalone --nproc_per_node N -m ssl3d pretrain ...``, each running the
same loop on its share of every step's batch, with DistributedDataParallel averaging the gradients. A process
knows it is one of several from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
:func:`torchrun_process_group` joins the group, everything else asks :func:`world_size` and :func:`rank`, which
read torch's process group, so a single process (no group) runs exactly as before.

Rank 0 alone writes (checkpoints, step log, manifest, weights) and logs progress; the other ranks log warnings
and errors only. Every rank reads the checkpoint when a run resumes. No barrier is needed: every process has read
the checkpoint before it joins DistributedDataParallel's first broadcast, the gradient all-reduce of every step
keeps the processes in step, no process reads what rank 0 writes during the run, and torchrun's job ends with its
last process (or, when one fails, stops the others).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN)


@contextmanager
def torchrun_process_group(device: str) -> Iterator[str]:
    """Under torchrun: join the process group (nccl on CUDA, gloo on CPU) for the block and yield this process's
    device, ``cuda:<LOCAL_RANK>`` for ``cuda``; otherwise yield ``device`` and do nothing."""
    if not launched_by_torchrun():
        yield device
        return
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--device {device}: under torchrun each process takes the GPU cuda:<LOCAL_RANK>; "
                             "pass --device cuda (and choose the GPUs with CUDA_VISIBLE_DEVICES)")
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    if rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one progress log, rank 0's
    log.info("process group: %d processes (%s), rank 0 on %s", world_size(), dist.get_backend(), device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    """How many processes train together: 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files and logs its progress (rank 0, or the only process)."""
    return rank() == 0


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as floats, averaged over the processes (one all-reduce): the loss of the whole step's batch
    where each process holds the loss of its share. A single process gets each ``.item()`` unchanged."""
    if world_size() == 1:
        return {name: value.item() for name, value in values.items()}
    stacked = torch.stack([value.detach().float() for value in values.values()])
    dist.all_reduce(stacked)  # a sum: gloo has no average
    return dict(zip(values, (stacked / world_size()).tolist(), strict=True))


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` as DistributedDataParallel when this process is one of several, else ``module`` itself.

    Its batch norm becomes SyncBatchNorm (statistics over the whole step's batch, as on one GPU) on CUDA; torch's
    SyncBatchNorm has no CPU kernels, so on CPU (the tests' gloo runs) batch norm normalises each process's share.
    ``find_unused_parameters``: a method may hold parameters its loss does not reach (BYOL's decoder, a head whose
    loss weight is 0), which DDP would otherwise wait for. ``forward_sync_buffers=False``: buffers are constants or
    SyncBatchNorm statistics, the same on every process, so re-sending rank 0's at every step would only cost time
    (DDP still sends rank 0's parameters and buffers once, when it wraps the module).
    """
    if world_size() == 1:
        return module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    elif any(isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for layer in module.modules()):
        log.warning("batch norm on CPU normalises over each process's share of the batch (1/%d): torch's "
                    "SyncBatchNorm needs CUDA", world_size())
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=True)

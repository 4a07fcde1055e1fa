"""One pre-training loop for every method: the pool, the method's optimizer and schedule, on the shared engine.

A method only says how a region becomes views and which loss terms those views give (``ssl3d.pretrain.method``);
everything else is shared: the step loop with AMP, clipping, checkpoint/resume, per-step timing and memory is
``ssl3d.engine.Engine``, the one fine-tuning and probing use too, so methods are compared under the same loop and the
same clock. The timing charts read ``step_log.csv`` (data wait, forward, backward with the optimizer step and the
method's ``after_step``, e.g. its EMA update; peak memory). A killed run resumed from its checkpoint replays the same
batches (``ssl3d.data.sampling``).

On several GPUs (``torchrun --standalone --nproc_per_node N -m ssl3d pretrain ... --device cuda``, see
``ssl3d.distributed``) the method's ``batch_size`` stays the batch of a step, so it must be a multiple of N: each
process computes ``loss_terms`` on its ``batch_size / N`` samples of the step (together exactly the samples of a
one-GPU run), inside DistributedDataParallel, which averages the gradients, so every process takes the same
optimizer step. The whole method is wrapped, for one forward pass per step whatever modules ``loss_terms`` calls;
DDP reduces only the parameters that need a gradient, so an EMA target (frozen) is never part of it: each process
updates its own copy in ``after_step`` from the online weights, which are the same on every process after the
all-reduced step, so the targets stay the same too. Batch norm becomes SyncBatchNorm on CUDA, target's included
(statistics over the whole step's batch, as on one GPU; on CPU, where torch has no SyncBatchNorm, each process
normalises over its share). Where N processes depart from a one-GPU run:

- losses with in-batch negatives (NT-Xent, InfoNCE) contrast each sample with the other samples of its process
  only, ``batch_size / N`` of them: no gather across GPUs, as in the official SwinUNETR pre-training code, whose
  contrastive batch is the batch per GPU;
- a loss averaged over a count that varies between samples (masked voxels) is averaged per process, then over
  the processes;
- random draws inside ``loss_terms`` (dropout) come from each process's own generator, all seeded alike.

The step log's losses are the means over the processes; rank 0 alone writes the checkpoint, the step log, the
manifest (``device_count``: N) and ``pretrained.pt``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, RandSpatialCrop, SpatialPad
from monai.utils import set_determinism

from ssl3d.checkpoint import save_checkpoint
from ssl3d.data.cache import mapped_image, read_index
from ssl3d.data.sampling import SeededSamples
from ssl3d.data.splits import run_split
from ssl3d.distributed import data_parallel, is_main
from ssl3d.engine import Engine
from ssl3d.io import atomic_path, read_json, write_json
from ssl3d.manifest import run_manifest
from ssl3d.nets import build_network
from ssl3d.plan import read_run
from ssl3d.pretrain.method import Method, make_config
from ssl3d.pretrain.optim import build_optimizer, build_scheduler
from ssl3d.pretrain.registry import get_method
from ssl3d.pretrain.transfer import plan_transfer

log = logging.getLogger(__name__)


class RegionViews(SeededSamples):
    """A volume of the pool (as ``prepare_volume`` leaves it), a random region of the method's size, and the
    method's views of it."""

    def __init__(self, volumes: Sequence[np.ndarray], method: Method, seed: int, length: int):
        size = method.region_size()
        self.crop = Compose([SpatialPad(size), RandSpatialCrop(size, random_size=False)])
        self.method = method
        super().__init__(volumes, seed, length, transforms=[self.crop])

    def sample(self, volume, rng):
        region = np.asarray(self.crop(volume), dtype=np.float32)
        return {key: torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32))
                for key, view in self.method.make_views(region, rng).items()}


class Pool(Sequence):
    """The pool's volumes, each read when a sample draws it, as the method's ``prepare_volume`` leaves it.

    Why not in memory: a paper pool is thousands of scans (HDSSL's 2,500 CTs are hundreds of GB as float32), and
    every data-loader worker and every rank of a multi-GPU run would hold its own copy. A volume is memory-mapped
    from its cached case (``ssl3d.data.cache.mapped_image``), so the page cache holds what is read, once for all
    processes (copy-on-write: a method that changes its region in place changes a private copy of those pages).
    A method whose ``prepare_volume`` adds channels computed on the whole scan (vox2vec's body mask) prepares each
    volume the first time a sample draws it and keeps it in ``store`` as a ``.npy`` file, named by its case file's
    size and modification time so that a changed cache is never served; the run deletes the store when it
    finishes.
    """

    def __init__(self, files: list[Path], method: Method, store: Path):
        self.files, self.method, self.store = files, method, store
        self.prepares = type(method).prepare_volume is not Method.prepare_volume

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        file = self.files[i]
        if not self.prepares:
            return mapped_image(file)
        stat = file.stat()
        prepared = self.store / f"{i}-{file.stem}-{stat.st_size}-{stat.st_mtime_ns}.npy"
        if not prepared.is_file():  # processes that race here write the same array, each renamed in whole
            with atomic_path(prepared) as tmp:
                np.save(tmp, self.method.prepare_volume(np.asarray(mapped_image(file))))
        return np.load(prepared, mmap_mode="c")


def pretraining_pool(caches: list[str], cases: list[str | list[str]]) -> tuple[list[Path], int]:
    """The cached case files of every dataset of the pool, in the order given, and their channel count C: each
    dataset's unlabelled cases, or all of them where its ``pretrain_cases`` is ``all`` (PGL pre-trains on every
    image of the MSD tasks, labelled ones too), or the listed case ids (a downstream pool: the training cases of
    its split). One pool has one channel count (BraTS's four modalities pre-train HybridMIM's task-specific
    rows)."""
    files, channels = [], {}
    for path, which in zip(caches, cases, strict=True):
        index = read_index(path)
        channels[path] = index.get("channels", 1)
        if isinstance(which, list):
            if not set(which) <= set(index["cases"]):
                raise ValueError(f"{path}: the split's cases {sorted(set(which) - set(index['cases']))[:5]} are not "
                                 "in the preprocessed dataset; its split file was made from another copy")
            kept = set(which)
        else:
            kept = {case_id for case_id, case in index["cases"].items() if which == "all" or not case["labelled"]}
        files += [index["dir"] / case["file"] for case_id, case in index["cases"].items() if case_id in kept]
    if len(set(channels.values())) > 1:
        raise ValueError(f"one pre-training pool mixes channel counts: {channels}; pre-train on datasets with the "
                         "same channels")
    if not files:
        raise ValueError(f"{', '.join(caches)}: no cases to pre-train on (only labelled ones, and "
                         "pretrain_cases is not 'all')")
    return files, next(iter(channels.values()))


def pool_cases(spec: dict, inputs: dict) -> list[str | list[str]]:
    """What :func:`pretraining_pool` takes of each dataset of a run's pool: its ``pretrain_cases``, or for a
    downstream pool (``pool_split``) the case ids of its split (the run's fold) that are not test cases."""
    if "pool_split" not in spec:
        return [member["data"].get("pretrain_cases", "unlabelled") for member in spec["pool"]]
    split = run_split(read_json(inputs["splits"]), spec["pool_split"].get("fold"), inputs["splits"])
    return [sorted(split["train"] + split["validation"])]


class MethodLoss(torch.nn.Module):
    """The method's total loss and loss terms as one module call, so that DistributedDataParallel sees one forward
    pass per step, whichever of the method's modules ``loss_terms`` calls and how often."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        terms = self.method.loss_terms(batch)
        return self.method.total_loss(terms), terms


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


def pretrain(run_config: str | Path | dict, out_dir: str | Path, device: str = "cpu", workers: int = 0,
             log_every: int = 10) -> Path:
    """Pre-train the run described by ``run_config`` into ``out_dir``; returns ``pretrained.pt``."""
    config = read_run(run_config)
    run_id, spec, inputs = config["run_id"], config["spec"], config["inputs"]
    out_dir = Path(out_dir)
    device = torch.device(device)
    set_determinism(seed=spec["seed"])

    files, channels = pretraining_pool(inputs["caches"], pool_cases(spec, inputs))
    method = build_method(spec, channels).to(device)
    transfer_report = check_transfer(method)

    settings = method.config
    steps = spec["steps"]
    optimizer = build_optimizer(method, settings.optimizer)
    engine = Engine(run_id, method, optimizer, build_scheduler(optimizer, settings.scheduler, steps), out_dir, steps,
                    spec["checkpoint_every"], device, model_key="method", grad_clip=settings.grad_clip,
                    precision=settings.precision, channels_last=settings.channels_last, compile=settings.compile,
                    workers=workers, log_every=log_every)

    pool = Pool(files, method, out_dir / "prepared_volumes")
    samples = RegionViews(pool, method, spec["seed"], steps * settings.batch_size)
    state = engine.run(samples, settings.batch_size, data_parallel(MethodLoss(method), device),
                       after_update=lambda step: method.after_step(step, steps))

    pretrained = out_dir / "pretrained.pt"
    if not is_main():
        return pretrained  # rank 0 writes the run's files
    save_checkpoint(pretrained, {
        "run_id": run_id, "method": method.name, "method_version": method.version, "backbone": method.backbone_spec,
        "config": dataclasses.asdict(settings), "transfer": dataclasses.asdict(method.transfer),
        "state_dict": method.state_dict(),
    })
    with atomic_path(out_dir / "step_log.csv") as tmp:
        pd.DataFrame(state["rows"]).to_csv(tmp, index=False)
    write_json(out_dir / "manifest.json", run_manifest(
        spec, run_id, device,
        method_version=method.version,
        method_config=dataclasses.asdict(settings),
        **engine.measurements(),
        transfer=transfer_report,
        pool_cases=len(pool),
    ))
    engine.finish()
    shutil.rmtree(pool.store, ignore_errors=True)
    return pretrained

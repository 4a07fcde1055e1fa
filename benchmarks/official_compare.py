"""Our pre-training step against the official one, timed alternately in one process: the ratio ours / official.

Given a local checkout of an official repository (never copied into this project; ``reference/methods.md`` §0 pins
the commits), this builds the official model, loss and optimizer from the checkout (``sys.path``), builds ours from
the registry with the settings of ``config/experiments/hybridmim.yaml``, and times one step of each in turn
(official, ours, official, ours, ...) on inputs made before timing. A step is forward + loss + backward + optimizer
step, as each training loop runs it:

* ``hybridmim_unet``: ``ge-xing/HybridMIM`` @ 8af10c451b8f, ``Pretrain/main.py::train`` with ``DeepUNet``; 96³ x 2.
* ``hybridmim_swin``: the same checkout and loop with its ``SwinUNETR`` (``--model_name`` other than
  deepunet_v2); 96³ x 2.
* ``models_genesis``: ``MrGiovanni/ModelsGenesis`` @ 12f7feb67e50, ``pytorch/Genesis_Chest_CT.py`` with
  ``unet3d.UNet3D``; 64 x 64 x 32 x 6.
* ``swinunetr_ssl``: ``Project-MONAI/research-contributions`` @ 21ed8e57c725, ``SwinUNETR/Pretrain/main.py`` with
  ``models/ssl_head.py::SSLHead``; 96³ x 2 (the README's batch 1 x 2 crops).
* ``vox2vec``: ``mishgon/vox2vec`` @ 734e757b9129, ``vox2vec/pretrain/model.py::Vox2Vec.training_step`` on
  ``FPN3d(1, 16, 6)`` (``pretrain.py``); 128 x 128 x 32 x 10 pairs of one scan, 1024 matched voxels each (ours:
  one region, ``pairs_per_region`` 10, as ``config/experiments/hdssl.yaml``).
* ``hdssl``: ``multimodallearning/hierarchical-dense-ssl`` @ 30f7f69d1e96, ``hb_ssl/pretrain/model.py::
  Vox2Vec.training_step`` on ``FPN3d(1, 32, 5)`` (``run_pretraining.py``): the same batch, the augmented views
  through the network, InfoNCE + 10 x restoration MSE to the un-augmented views.

Usage (``--official`` is the repository root; a checkout at another commit is warned about, not refused)::

    git clone https://github.com/ge-xing/HybridMIM /tmp/HybridMIM && git -C /tmp/HybridMIM checkout 8af10c451b8f
    python benchmarks/official_compare.py hybridmim_unet --official /tmp/HybridMIM --scale 0.67 --repeats 3
    python benchmarks/official_compare.py models_genesis --official /tmp/ModelsGenesis --repeats 5 --warmup 1
    python benchmarks/official_compare.py models_genesis --official /tmp/ModelsGenesis --precision bfloat16
    python benchmarks/official_compare.py models_genesis --official /tmp/ModelsGenesis --channels-last
    python benchmarks/official_compare.py vox2vec --official /tmp/vox2vec --scale 0.5  # needs pytorch_lightning
    python benchmarks/official_compare.py hdssl --official /tmp/hierarchical-dense-ssl --scale 0.5

``--precision bfloat16`` runs our forward pass under bf16 autocast (the training engine's ``precision:
bfloat16``) against the official float32 step: faster on a CPU with AMX or AVX512-BF16, at bf16's numerics.
``--channels-last`` runs ours in channels_last_3d memory order (the method setting ``channels_last``): float32,
the same sums in another order. ``--compile`` runs our loss terms through ``torch.compile`` (the method setting
``compile``): float32, fused kernels that round differently; the first round compiles (minutes on 2 cores), so it
must be a warm-up round; the FLOPs are counted on the same step uncompiled (the same operations).

It prints the median seconds per step of each side with their interquartile range and the median seconds of its
optimizer step alone, the median of the paired ratios ours / official (round i's ours over round i's official)
with their interquartile range, and each side's peak memory during its steps (resident set sampled every few
milliseconds, above the resident set before the step; on CPU this counts the allocator's cache too) and each
side's FLOPs per step with the rate it achieved (FLOPs / median seconds: ``torch.utils.flop_counter`` counts the
convolutions, matrix products and attention of forward and backward on one untimed step before the warm-up, so two
sides with equal FLOPs at the machine's highest rate can only differ by numerics), then the same
as JSON (``--json FILE`` also writes it; experiment reports show the files in ``benchmarks/results/official/``
of the methods they pre-train). The machine's other load moves single steps by a factor of two on a shared CPU:
the paired ratio cancels slow drifts, not bursts, so read its interquartile range.

What each official step contains that ours does not, and why the comparison is still like for like:

* HybridMIM draws its mask inside ``model.forward`` (``torch.rand``, a Python loop per label); ours draws it in the
  data loader, so the official step carries that (milliseconds). The official ``main.py`` also turns on
  ``torch.autograd.set_detect_anomaly(True)``, which slows every step several-fold: off here unless ``--anomaly``
  (then only around the official step).
* SwinUNETR SSL's rotation and noise boxes (``rot_rand``/``aug_rand``, hard-wired to CUDA) are made before timing,
  as ours are made in the data loader; our step still pastes the cut-mix boxes (``paste_from_partners``). The
  official loss (``losses/loss.py::Loss``) puts its constants on ``cuda:{local_rank}`` in ``__init__``: here the
  same attributes are set on CPU and the official ``__call__``/``forward`` run unchanged.
* ``--scale S`` shrinks the crop for quick runs: HybridMIM and SwinUNETR SSL to the multiple of 32 nearest 96·S
  (at least 64: the 32-voxel sub-volumes and the Swin's two bottleneck tokens), Models Genesis to multiples of 8,
  vox2vec and hdssl to multiples of 32 (vox2vec's coarsest level is 1/32).
  The official HybridMIM forward hard-codes the 6³ patch grid and 27 regions of a 96³ crop: below 96 the script
  passes the crop's own grid and region count to the official ``mask_func``/``get_mask_labels*`` (wrapped, not
  rewritten), and both sides reconstruct the same box (the last 64 voxels per axis, the whole crop at 64³).

Dependencies: the official model files need torch, MONAI and (HybridMIM) ``einops``, all project dependencies, and
(vox2vec and hdssl, whose models are LightningModules) ``pytorch_lightning``, ``huggingface_hub``,
``more_itertools``, ``scikit-learn`` (vox2vec) and ``matplotlib`` (hdssl), not all of them project dependencies;
a missing one is named with its install command. Their step is the ``training_step`` called directly, without
Lightning's trainer around it (its ``self.log`` then only warns). hdssl's ``__init__`` puts its level projections
on CUDA (``.cuda()``): on a machine without one they are built with ``Module.cuda`` as the identity. The training
scripts' other imports (tensorboard, nibabel, clearml, ...) are not needed: only the model and loss files are
imported.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Official:
    repo: str  # owner/name on GitHub
    commit: str  # pinned commit (prefix), reference/methods.md §0
    source: str  # folder of the checkout put on sys.path
    marker: str  # a file that must exist under source


HYBRIDMIM = Official("ge-xing/HybridMIM", "8af10c451b8f", "Pretrain", "pretrain_models/deep_unet_v2.py")
OFFICIAL = {
    "hybridmim_unet": HYBRIDMIM,
    "hybridmim_swin": HYBRIDMIM,
    "models_genesis": Official("MrGiovanni/ModelsGenesis", "12f7feb67e50", "pytorch", "unet3d.py"),
    "swinunetr_ssl": Official("Project-MONAI/research-contributions", "21ed8e57c725", "SwinUNETR/Pretrain",
                              "models/ssl_head.py"),
    "vox2vec": Official("mishgon/vox2vec", "734e757b9129", ".", "vox2vec/pretrain/model.py"),
    "hdssl": Official("multimodallearning/hierarchical-dense-ssl", "30f7f69d1e96", ".", "hb_ssl/pretrain/model.py"),
}
# packages the official files import that the project does not need itself: import name -> install command
INSTALL = {"einops": ".venv/bin/pip install einops",
           "pytorch_lightning": ".venv/bin/pip install -c requirements.lock pytorch_lightning"}

# ours: the experiment config's entry (config/experiments/hybridmim.yaml)
OURS = {
    "hybridmim_unet": ("hybridmim", {"name": "hybridmim_unet", "features": [64, 64, 128, 256, 512], "dropout": 0.1},
                       {"region_position": "corner", "grouping": "code_raster"}),
    "hybridmim_swin": ("hybridmim", {"name": "swinunetr", "feature_size": 48, "drop_rate": 0.1},
                       {"region_position": "corner", "grouping": "code_raster",
                        "optimizer": {"name": "adamw", "lr": 6e-6, "weight_decay": 0.1}}),
    "models_genesis": ("models_genesis", {"name": "genesis_unet3d"}, {}),
    "swinunetr_ssl": ("swinunetr_ssl", {"name": "swinunetr", "feature_size": 48}, {}),
    # config/experiments/hdssl.yaml; the official batch of pairs of one scan is one region's pairs here
    "vox2vec": ("vox2vec", {"name": "fpn3d", "base_channels": 16, "num_scales": 6}, {"pairs_per_region": 10}),
    "hdssl": ("hdssl", {"name": "fpn3d", "base_channels": 32, "num_scales": 5}, {"pairs_per_region": 10}),
}
MATCHED_VOXELS = 1024  # per pair: vox2vec's and hdssl's MAX_NUM_VOXELS_PER_PATCH (ours: max_voxels)


def shape_and_batch(method: str, scale: float) -> tuple[tuple[int, int, int], int]:
    """The crop and batch of ``method`` at ``scale`` (1: the official shapes)."""
    if method == "models_genesis":
        return tuple(max(8, 8 * round(n * scale / 8)) for n in (64, 64, 32)), 6
    if method in ("vox2vec", "hdssl"):
        return tuple(max(32, 32 * round(n * scale / 32)) for n in (128, 128, 32)), 10
    return (max(64, 32 * round(96 * scale / 32)),) * 3, 2


# ------------------------------------------------------------------------------------------- the official checkout

def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def check_checkout(method: str, root: Path) -> Path:
    """The checkout's source folder; exits with a message if it is missing, warns if it is at another commit."""
    spec = OFFICIAL[method]
    how = (f"clone it and check out the pinned commit: git clone https://github.com/{spec.repo} DIR && "
           f"git -C DIR checkout {spec.commit}")
    if not root.is_dir():
        sys.exit(f"official_compare: --official {root} is not a directory; {how}")
    source = root / spec.source
    if not (source / spec.marker).is_file():
        sys.exit(f"official_compare: {root} is not a checkout of {spec.repo}: {spec.source}/{spec.marker} is missing "
                 f"(pass the repository root); {how}")
    commit = git_commit(root)
    if commit is None:
        warnings.warn(f"{root} is not a git checkout: cannot tell whether it is {spec.repo} at the pinned "
                      f"{spec.commit}", stacklevel=2)
    elif not commit.startswith(spec.commit):
        warnings.warn(f"{root} is at commit {commit[:12]}, not the pinned {spec.commit} of {spec.repo} "
                      f"(reference/methods.md): timings may not compare", stacklevel=2)
    return source


def import_official(source: Path, module: str) -> types.ModuleType:
    """``module`` from the checkout's ``source`` folder (put first on sys.path); a missing package is named."""
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == module.split(".")[0]:
            raise
        install = INSTALL.get(error.name, f".venv/bin/pip install {error.name}")
        sys.exit(f"official_compare: the official {module} needs the package {error.name!r}, which is not "
                 f"installed here; install it with `{install}`")
    where = Path(imported.__file__).resolve()
    if source.resolve() not in where.parents:
        sys.exit(f"official_compare: `import {module}` found {where}, not the checkout's {source}: another module of "
                 "that name shadows it; run from a clean environment")
    return imported


# --------------------------------------------------------------------------------------------------- the steps

Step = Callable[[], float]  # runs one step, returns its loss; ``step.optimizer`` is its optimizer


def training_step(loss: Callable[[], torch.Tensor], optimizer, after: Callable[[], None] = lambda: None) -> Step:
    """A step of a training loop around ``loss()``: zero_grad, backward, the optimizer's step, ``after`` (our
    methods' ``after_step``). Where the official loops zero the gradients (before backward or after the step)
    makes no difference from one step to the next."""

    def step() -> float:
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        after()
        return value.item()

    step.optimizer = optimizer
    return step


def official_hybridmim(source: Path, backbone: str, size: int, batch: int) -> Step:
    """``Pretrain/main.py::train`` of HybridMIM: model(image) masks, encodes twice, decodes the box; the five losses
    as the loop weights them; backward; AdamW step; zero_grad."""
    name = "pretrain_models.deep_unet_v2" if backbone == "unet" else "pretrain_models.swinunetr"
    network = import_official(source, name)
    losses = import_official(source, "losses.loss")
    if size != 96:  # the forward hard-codes a 96³ crop's 6³ patch grid and 27 regions: pass this crop's
        grid, regions = size // 16, (size // 32) ** 3
        mask_func, labels, position_labels = network.mask_func, network.get_mask_labels, network.get_mask_labelsv2
        network.mask_func = lambda x, c, ratio, patch, _grid, mask_value=0.0: mask_func(
            x, c, ratio, patch, (grid,) * 3, mask_value=mask_value)
        network.get_mask_labels = lambda b, _regions, mask, k, device: labels(b, regions, mask, k, device)
        network.get_mask_labelsv2 = lambda b, _regions, mask, k, device: position_labels(b, regions, mask, k,
                                                                                          device=device)
    torch.manual_seed(0)
    if backbone == "unet":  # main.py L281-287; the box: the last 8 of the 12³ bottleneck cells per axis ([4:12])
        cells = size // 8
        model = network.DeepUNet(1, 1, features=[64, 64, 128, 256, 512],
                                 pool_size=((2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)),
                                 select_reconstruct_region=[[cells - 8] * 3, [cells] * 3], dropout=0.1, pretrain=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    else:  # main.py L290-297 (feature_size 48); the box: the last 2 of the 3³ bottleneck tokens per axis ((1, 3))
        cells = size // 32
        model = network.SwinUNETR((size,) * 3, in_channels=1, out_channels=1, drop_rate=0.1, feature_size=48,
                                  pretrain=True, select_reconstruct_region=(cells - 2, cells))
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-6, weight_decay=0.1)
    model.train()
    image = torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1)) * 0.999 + 0.001

    def loss() -> torch.Tensor:  # main.py L44-80 (no grad clip, no scheduler: both off by default)
        out = model(image)
        x_rec = torch.sigmoid(out["logits"])
        loss_rec = losses.forward_loss_reconstruct_mask(x_rec, out["images"], out["x_mask"], mask_value=0.0)
        loss_mask_region = losses.forward_loss_mask(out["pred_mask_region"], out["mask_labels"])
        position_num = (torch.sigmoid(out["pred_mask_region_position"]) > 0.5).float().sum(dim=-1)
        loss_consistency = (losses.forward_loss_mask(out["pred_mask_region"], position_num.detach())
                            + torch.nn.MSELoss()(position_num,
                                                 out["pred_mask_region"].argmax(dim=-1).float().detach())) / 2
        loss_contrast = losses.forward_constrast_loss(out["contrast_pred_1"], out["contrast_pred_2"])
        loss_position = losses.forward_loss_mask_position(out["pred_mask_region_position"],
                                                          out["mask_position_lables"])
        return (loss_rec + 0.1 * loss_mask_region + 0.1 * loss_position + 0.01 * loss_consistency
                + 0.1 * loss_contrast)

    return training_step(loss, optimizer)


def official_models_genesis(source: Path, shape, batch: int) -> Step:
    """``pytorch/Genesis_Chest_CT.py`` L95-99: UNet3D (sigmoid inside), MSELoss, SGD lr 1 momentum 0.9."""
    unet3d = import_official(source, "unet3d")
    torch.manual_seed(0)
    model = unet3d.UNet3D()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), 1.0, momentum=0.9, weight_decay=0.0, nesterov=False)
    criterion = torch.nn.MSELoss()
    generator = torch.Generator().manual_seed(1)
    image, gt = (torch.rand(batch, 1, *shape, generator=generator) for _ in range(2))

    return training_step(lambda: criterion(model(image), gt), optimizer)


def official_swinunetr_ssl(source: Path, size: int, batch: int) -> Step:
    """``SwinUNETR/Pretrain/main.py`` L41-71: two forwards of SSLHead (one per view), ``Loss`` (rotation CE +
    NT-Xent + L1), backward, AdamW (lr 4e-4, wd 0.1) step; AMP is CUDA-only, off on CPU."""
    ssl_head = import_official(source, "models.ssl_head")
    loss_module = import_official(source, "losses.loss")
    torch.manual_seed(0)
    args = types.SimpleNamespace(spatial_dims=3, in_channels=1, feature_size=48, dropout_path_rate=0.0,
                                 use_checkpoint=False, local_rank=0)
    model = ssl_head.SSLHead(args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    # Loss.__init__ / Contrast.__init__ put their constants on cuda:{local_rank}: the same attributes on CPU
    contrast = loss_module.Contrast.__new__(loss_module.Contrast)
    torch.nn.Module.__init__(contrast)
    contrast.batch_size = batch
    contrast.register_buffer("temp", torch.tensor(0.5))
    contrast.register_buffer("neg_mask", (~torch.eye(batch * 2, batch * 2, dtype=bool)).float())
    loss_function = loss_module.Loss.__new__(loss_module.Loss)
    torch.nn.Module.__init__(loss_function)
    loss_function.rot_loss, loss_function.recon_loss = torch.nn.CrossEntropyLoss(), torch.nn.L1Loss()
    loss_function.contrast_loss = contrast
    loss_function.alpha1 = loss_function.alpha2 = loss_function.alpha3 = 1.0
    generator = torch.Generator().manual_seed(1)
    x1, x2, x1_augment, x2_augment = (torch.rand(batch, 1, size, size, size, generator=generator) for _ in range(4))
    rot1, rot2 = (torch.randint(0, 4, (batch,), generator=generator) for _ in range(2))

    def loss() -> torch.Tensor:
        rot1_p, contrastive1_p, rec_x1 = model(x1_augment)
        rot2_p, contrastive2_p, rec_x2 = model(x2_augment)
        return loss_function(torch.cat([rot1_p, rot2_p]), torch.cat([rot1, rot2]), contrastive1_p,
                             contrastive2_p, torch.cat([rec_x1, rec_x2]), torch.cat([x1, x2]))[0]

    return training_step(loss, optimizer)


def official_voxel_contrast(method: str, source: Path, shape, batch: int) -> Step:
    """``Vox2Vec.training_step`` of vox2vec (``vox2vec/pretrain/model.py``, on ``FPN3d(1, 16, 6)``) or of hdssl
    (``hb_ssl/pretrain/model.py``, ``FPN3d(1, 32, 5)``, with un-augmented views for its restoration loss): both
    views' pyramids, the matched voxels' features through the projection head, InfoNCE at τ 0.1 (hdssl: + 10 x
    MSE); backward; its ``configure_optimizers`` (Adam 3e-4). ``batch`` pairs, each with 1024 voxels at random
    positions of the patch."""
    package, base, scales = ("vox2vec", 16, 6) if method == "vox2vec" else ("hb_ssl", 32, 5)
    nets = import_official(source, f"{package}.nn")
    official = import_official(source, f"{package}.pretrain.model")
    torch.manual_seed(0)
    with mock.patch.object(torch.nn.Module, "cuda", lambda module, *args, **kwargs: module):  # hdssl's __init__
        model = official.Vox2Vec(nets.FPN3d(1, base, scales), base_channels=base, num_scales=scales)
    model.train()
    optimizer = model.configure_optimizers()
    generator = torch.Generator().manual_seed(1)
    patches = [torch.rand(batch, 1, *shape, generator=generator) for _ in range(2 if method == "vox2vec" else 4)]
    voxels = [[torch.stack([torch.randint(0, n, (MATCHED_VOXELS,), generator=generator) for n in shape], dim=1)
               for _ in range(batch)] for _ in range(2)]
    return training_step(lambda: model.training_step({"pretrain": (*patches, *voxels)}, 0), optimizer)


def our_step(method: str, shape, batch: int, precision: str = "auto", channels_last: bool = False,
             compile: bool = False) -> Step:
    """Our method as the training engine runs a step (``ssl3d.engine``): loss terms (under bf16 autocast at
    ``precision: bfloat16``; networks and views in channels_last_3d order with ``channels_last``; through
    ``torch.compile`` with ``compile``) -> weighted total, zero_grad, backward, the optimizer of the method's config;
    views made before timing by the method's ``make_views``."""
    from ssl3d.engine import forward_autocast, to_device
    from ssl3d.pretrain.method import make_config
    from ssl3d.pretrain.optim import build_optimizer
    from ssl3d.pretrain.registry import get_method

    name, backbone, settings = OURS[method]
    cls = get_method(name)
    samples = batch // settings.get("pairs_per_region", 1)  # vox2vec, hdssl: the batch is one region's pairs
    config = make_config(cls.Config, {**settings, "patch_size": list(shape), "batch_size": samples,
                                      "channels_last": channels_last, "compile": compile})
    torch.manual_seed(0)
    model = cls(config, backbone)
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model, config.optimizer)
    rng = np.random.default_rng(1)
    region = model.prepare_volume(rng.random((1, *model.region_size()), dtype=np.float32))
    views = [model.make_views(region, rng) for _ in range(samples)]
    views = to_device({key: torch.from_numpy(np.stack([np.asarray(v[key], dtype=np.float32) for v in views]))
                       for key in views[0]}, torch.device("cpu"), channels_last)
    steps = itertools.count()
    def loss():
        with forward_autocast(torch.device("cpu"), precision):
            return model.total_loss(model.loss_terms(views))

    after = lambda: model.after_step(next(steps), 1000)  # noqa: E731
    step = training_step(torch.compile(loss) if compile else loss, optimizer, after)
    # FLOPs are counted on the same step uncompiled: under FlopCounterMode a compiled function runs eagerly and is
    # then left uncompiled
    step.eager = training_step(loss, optimizer, after)
    return step


def official_step(method: str, source: Path, shape, batch: int) -> Step:
    if method in ("hybridmim_unet", "hybridmim_swin"):
        return official_hybridmim(source, method.split("_")[1], shape[0], batch)
    if method == "models_genesis":
        return official_models_genesis(source, shape, batch)
    if method in ("vox2vec", "hdssl"):
        return official_voxel_contrast(method, source, shape, batch)
    return official_swinunetr_ssl(source, shape[0], batch)


# ------------------------------------------------------------------------------------------------ timing, memory

def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far (ru_maxrss is KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def peak_resident(interval: float = 0.005):
    """Yields a dict whose ``bytes`` is, on exit, the peak resident set while inside, above the one on entry."""
    result = {"bytes": 0}
    start, peak, stop = resident_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], resident_bytes())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["bytes"] = max(peak[0], resident_bytes()) - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(median), float(q3)


def timed_optimizer(optimizer: torch.optim.Optimizer) -> list[float]:
    """Records the seconds of each ``optimizer.step()`` call in the returned list."""
    calls, step = [], optimizer.step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    optimizer.step = timed
    return calls


def alternate(official: Step, ours: Step, warmup: int, repeats: int, anomaly: bool = False) -> dict:
    """Official then ours, ``warmup + repeats`` rounds; seconds (of the step and of its optimizer step), peak
    memory and last loss of each."""
    seconds = {"official": [], "ours": []}
    optimizer_seconds = {"official": [], "ours": []}
    memory = {"official": 0, "ours": 0}
    loss = {}
    steps = {"official": official, "ours": ours}
    optimizer_calls = {side: timed_optimizer(step.optimizer) for side, step in steps.items()}
    for round_ in range(warmup + repeats):
        for side in ("official", "ours"):
            detect = torch.autograd.detect_anomaly() if anomaly and side == "official" else _nothing()
            optimizer_calls[side].clear()
            with detect, peak_resident() as peak:
                start = time.perf_counter()
                loss[side] = steps[side]()
                elapsed = time.perf_counter() - start
            memory[side] = max(memory[side], peak["bytes"])
            if round_ >= warmup:
                seconds[side].append(elapsed)
                optimizer_seconds[side].append(sum(optimizer_calls[side]))
            print(f"  round {round_ + 1}/{warmup + repeats}{' (warm-up)' if round_ < warmup else ''} {side}: "
                  f"{elapsed:.3f} s (optimizer {sum(optimizer_calls[side]):.3f} s), loss {loss[side]:.4f}",
                  file=sys.stderr, flush=True)
    return {"seconds": seconds, "optimizer_seconds": optimizer_seconds,
            "peak_mib": {k: v / 2 ** 20 for k, v in memory.items()}, "last_loss": loss}


def counted_flops(step: Step) -> int:
    """FLOPs of one (untimed) step as ``torch.utils.flop_counter`` counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@contextmanager
def _nothing():
    yield


def summarise(method: str, shape, batch: int, args, measured: dict) -> dict:
    from ssl3d.manifest import device_description

    seconds = measured["seconds"]
    ratios = [o / f for o, f in zip(seconds["ours"], seconds["official"])]
    sides = {side: dict(zip(("q1_s", "median_s", "q3_s"), quartiles(seconds[side])),
                        optimizer_median_s=statistics.median(measured["optimizer_seconds"][side]),
                        peak_step_memory_mib=round(measured["peak_mib"][side]), last_loss=measured["last_loss"][side],
                        gflop_per_step=measured["flops"][side] / 1e9,
                        achieved_gflops=measured["flops"][side] / 1e9 / statistics.median(seconds[side]))
             for side in ("official", "ours")}
    q1, median, q3 = quartiles(ratios)
    return {"method": method, "ours_method": OURS[method][0], "shape": list(shape), "batch": batch,
            "scale": args.scale, "threads": args.threads,
            "precision_ours": args.precision, "channels_last_ours": args.channels_last, "compile_ours": args.compile,
            "repeats": args.repeats, "warmup": args.warmup, "anomaly_official": args.anomaly,
            "official_commit": git_commit(args.official), "torch": torch.__version__,
            "device": device_description(torch.device("cpu")),
            "official": sides["official"], "ours": sides["ours"],
            "ratio_ours_over_official": {"median": median, "q1": q1, "q3": q3, "paired": ratios},
            "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def report(result: dict) -> str:
    shape = "x".join(map(str, result["shape"]))
    lines = [f"{result['method']}: {shape} x {result['batch']}, {result['device']}, {result['repeats']} "
             f"paired repeats after {result['warmup']} warm-up, torch {result['torch']}, ours at precision "
             f"{result['precision_ours']}{' in channels_last_3d order' if result['channels_last_ours'] else ''}"
             f"{' through torch.compile' if result.get('compile_ours') else ''} (official float32)",
             f"  {'':9} {'median s/step':>14} {'IQR':>20} {'of which optimizer':>19} {'peak step memory':>17} "
             f"{'GFLOP/step':>11} {'GFLOP/s':>8}"]
    for side in ("official", "ours"):
        s = result[side]
        spread = f"[{s['q1_s']:.3f}, {s['q3_s']:.3f}]"
        lines.append(f"  {side:9} {s['median_s']:14.3f} {spread:>20} {s['optimizer_median_s']:17.3f} s "
                     f"{s['peak_step_memory_mib']:>13} MiB {s['gflop_per_step']:11.1f} {s['achieved_gflops']:8.1f}")
    r = result["ratio_ours_over_official"]
    lines.append(f"  ours / official: {r['median']:.3f} (IQR {r['q1']:.3f} - {r['q3']:.3f} over "
                 f"{len(r['paired'])} paired rounds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(OFFICIAL))
    parser.add_argument("--official", type=Path, required=True, help="root of the official repository's checkout")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one official + one ours step each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--scale", type=float, default=1.0, help="crop size factor (1: the official shapes)")
    parser.add_argument("--anomaly", action="store_true",
                        help="run the official step under autograd anomaly detection, as its main.py does")
    parser.add_argument("--precision", choices=["auto", "bfloat16"], default="auto",
                        help="ours: float32 (auto, on CPU: the equal-numerics comparison) or bf16 autocast")
    parser.add_argument("--channels-last", action="store_true",
                        help="ours: networks and views in channels_last_3d order (the method setting channels_last)")
    parser.add_argument("--compile", action="store_true",
                        help="ours: the loss terms through torch.compile (the method setting compile); the first "
                             "warm-up round compiles, so keep --warmup >= 1")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.scale <= 0:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0, --scale > 0")
    source = check_checkout(args.method, args.official)
    torch.set_num_threads(args.threads)
    shape, batch = shape_and_batch(args.method, args.scale)
    with redirect_stdout(sys.stderr):  # the official constructors print their settings
        official = official_step(args.method, source, shape, batch)
    ours = our_step(args.method, shape, batch, args.precision, args.channels_last, args.compile)
    flops = {"official": counted_flops(official), "ours": counted_flops(ours.eager)}
    measured = alternate(official, ours, args.warmup, args.repeats, args.anomaly)
    result = summarise(args.method, shape, batch, args, {**measured, "flops": flops})
    print(report(result))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

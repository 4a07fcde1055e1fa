"""Everything an experiment config says, checked when the workflow is planned, one line per problem.

The JSON schema (``workflow/schemas/config.schema.yaml``, checked first by the workflow itself, one line per
problem) checks the config's shape; what only the code knows is checked here, before any job runs: each method's
settings (names, loss terms, optimizer and schedule fields, then everything its constructor checks, built on
PyTorch's ``meta`` device so no weight is allocated: values, which backbone it runs on, the pool's channels),
backbone names and fields, inits, per-arm overrides, protocol settings, each fine-tuning arm's optimizer and
schedule, recipe names, and the user's copy of each manual registry dataset. A misspelt
setting thus fails ``snakemake -n`` with ``pretrain.methods.byol.noise_sd: unknown setting; known: ...`` instead of
an hour later in the pre-training job. The Snakefile prints the lines and keeps the full detail in a log file.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from functools import cache
from pathlib import Path

import torch

from ssl3d.data.dataset import open_nifti
from ssl3d.data.files import data_root, folder_cases, manual_copy
from ssl3d.data.recipes import builtin_recipes
from ssl3d.data.registry import get_entry, source_dir
from ssl3d.finetune.augment import ROTATING
from ssl3d.finetune.protocols import DEFAULT_SCHEDULER
from ssl3d.nets import BACKBONES
from ssl3d.nets.backbone import Backbone
from ssl3d.plan import (arm_training, dataset_recipe, in_grid, init_backbones, pretrain_entries, protocols,
                        skipped_datasets)
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.optim import optimization_problems
from ssl3d.pretrain.released import released_checkpoints
from ssl3d.pretrain.registry import get_method


@cache
def folder_channels(images: str, labels: str | None) -> int:
    """Image channels of your own folder: its first image's (a 4D NIfTI holds its channels last; its header alone
    is read), once per process, not once per run of the plan that asks (``ssl3d.estimate`` asks for each)."""
    (_, image, _), *_ = folder_cases(images, labels)
    shape = open_nifti(image).shape
    return shape[3] if len(shape) == 4 else 1


def dataset_channels(name: str, settings: dict) -> int:
    """Image channels of a config's dataset: a registry entry's channel list (BraTS), your own folder's
    (:func:`folder_channels`), else 1 (phantoms are CT)."""
    if settings.get("source") == "folder":
        return folder_channels(str(settings["images"]), settings.get("labels") and str(settings["labels"]))
    if settings.get("source") != "registry":
        return 1
    modality = get_entry(settings.get("entry", name)).modality
    return 1 if isinstance(modality, str) else len(modality)


def backbone_problems(spec: dict, where: str) -> list[str]:
    if spec.get("name") not in BACKBONES:
        return [f"{where}.name: unknown backbone {spec.get('name')!r}; known: {', '.join(sorted(BACKBONES))}"]
    cls = BACKBONES[spec["name"]]
    constructor = cls.__init__ if cls.build.__func__ is Backbone.build.__func__ else cls.build  # the default build
    known = [name for name in inspect.signature(constructor).parameters
             if name not in ("self", "in_channels", "out_channels", "unknown")]
    return [f"{where}.{field}: {spec['name']} takes no field {field!r}; known: {', '.join(known)}"
            for field in spec if field != "name" and field not in known]


def method_problems(entry: str, settings: dict, pool_channels: int, steps: int) -> list[str]:
    where = f"pretrain.methods.{entry}"
    try:
        cls = get_method(settings["method"])
    except ValueError as err:
        return [f"{where}.method: {err}"]
    known = {f.name for f in dataclasses.fields(cls.Config)}
    problems = [f"{where}.{key}: unknown setting of {cls.name}; known: {', '.join(sorted(known))}"
                for key in settings["overrides"] if key not in known]
    problems += backbone_problems(settings["backbone"], f"{where}.backbone")
    if problems:
        return problems
    try:
        config = make_config(cls.Config, settings["overrides"], where)
    except ValueError as err:
        return [str(err)]
    problems = [f"{where}.{problem}" for problem in optimization_problems(config.optimizer, config.scheduler, steps)]
    if problems:
        return problems
    try:
        with torch.device("meta"):  # the constructor's own checks, without allocating any weight
            cls(config, settings["backbone"], pool_channels)
    except RuntimeError:  # a network that reads values while it is built (MONAI's Swin): checked when it runs
        pass
    except (ValueError, TypeError) as err:
        return [f"{where}: {err}"]
    except Exception as err:  # a setting the method does not check itself still gets its line, not a traceback
        return [f"{where}: its settings fail to build it: {type(err).__name__}: {err}"]
    return []


def dataset_problems(config: dict, root: Path | None = None) -> list[str]:
    """Unknown recipes and registry entries, and a manual dataset without its copy (unless ``missing: skip``):
    otherwise found only when the dataset's fetch or preprocess job runs, after other jobs have run. A copy is
    looked for where ``ssl3d fetch`` looks (``ssl3d.data.files.manual_copy``, under ``root``: the data root); a
    source verified before is not looked for again, as its fetch job does not run again."""
    recipes = builtin_recipes()
    used = dict.fromkeys((f"datasets.{name}.recipe" if "recipe" in settings else "preprocess.recipe",
                          dataset_recipe(config, name)) for name, settings in config["datasets"].items())
    problems = [f"{where}: unknown recipe {recipe!r}; known: {', '.join(sorted(recipes))}"
                for where, recipe in used if recipe not in recipes]
    skipped = skipped_datasets(config)
    for name, settings in config["datasets"].items():
        if settings.get("source") != "registry" or name in skipped:
            continue
        try:
            entry = get_entry(settings.get("entry", name))
        except ValueError as err:
            problems.append(f"datasets.{name}: {err}")
            continue
        root = root or data_root()
        sources = source_dir(name, root)
        copy = manual_copy(name, settings, root)
        if entry.access == "unavailable":
            problems.append(f"datasets.{name}: {entry.name} cannot be obtained by the suite; use the registry entry "
                            f"{entry.substitute.entry} instead (ssl3d datasets --show {entry.name})")
        elif entry.access == "manual" and not copy.exists() and not (sources / "verified.json").is_file():
            problems.append(f"datasets.{name}: no copy at {copy}; register for {entry.name}, download it by hand and "
                            f"put it (or a symlink to it) there (ssl3d datasets --show {entry.name}), or set "
                            "missing: skip")
    return problems


def finetuning_problems(config: dict) -> list[str]:
    """The optimizer, schedule, augmentation and frozen steps of each fine-tuning arm (``finetune`` with its
    per-dataset, per-backbone, per-init and protocol overrides: an arm's own ``steps`` can leave its backbone frozen
    throughout), each problem once, naming the arms it is in."""
    arms = list(itertools.product(config["finetune"]["datasets"], init_backbones(config), protocols(config)))
    found: dict[str, list[str]] = {}
    for dataset, (init, backbone), protocol in arms:
        training, own = arm_training(config, dataset, init, backbone, protocol)
        problems = optimization_problems(training["optimizer"], training.get("scheduler", DEFAULT_SCHEDULER),
                                         training["steps"])
        if training.get("augmentation") in ROTATING and training["patch_size"][0] != training["patch_size"][1]:
            problems.append(f"augmentation: {training['augmentation']} rotates in the first two axes, which "
                            f"patch_size {training['patch_size']} does not have equal; make them equal")
        if protocol == "frozen_then_finetune" and own["frozen_steps"] >= training["steps"]:
            problems.append(f"protocols.frozen_then_finetune.frozen_steps: {own['frozen_steps']} leaves none of the "
                            f"{training['steps']} steps to fine-tune the backbone")
        for problem in problems:
            on = f" for {dataset}" if len(config["finetune"]["datasets"]) > 1 else ""
            found.setdefault(problem, []).append(f"{init} on {backbone['name']}{on} ({protocol})")
    return [f"finetune.{problem}" + ("" if len(where) == len(arms) else f" (arms: {', '.join(where)})")
            for problem, where in found.items()]


def grid_filter_problems(config: dict) -> list[str]:
    """``label_fractions`` of a dataset, an init or a protocol, and a protocol's ``inits``, that name what the grid
    has not (``ssl3d.plan.in_grid``): they would select nothing."""
    finetune, fractions = config["finetune"], config["splits"]["label_fractions"]
    filters = [*((f"datasets.{name}", entry) for name, entry in config["datasets"].items()),
               *((f"finetune.per_init.{init}", entry or {}) for init, entry in finetune.get("per_init", {}).items()),
               *((f"finetune.protocols.{name}", entry or {}) for name, entry in protocols(config).items())]
    return ([f"{where}.label_fractions: {sorted(extra)} not in splits.label_fractions {fractions}"
             for where, entry in filters if (extra := set(entry.get("label_fractions", ())) - set(fractions))]
            + [f"{where}.inits: {sorted(extra)} not in finetune.inits ({', '.join(finetune['inits'])})"
               for where, entry in filters if (extra := set(entry.get("inits", ())) - set(finetune["inits"]))])


def pool_channels(config: dict, entry: str, settings: dict) -> tuple[list[str], set[int]]:
    """The problems of a pre-training entry's pools (``ssl3d.plan.pretraining_pools``), else the channel counts of
    its pools: its method must build for each."""
    datasets, finetune = config["datasets"], config["finetune"]
    if settings["pool"] == "shared":
        own = "datasets" in (config["pretrain"]["methods"][entry] or {})
        where = f"pretrain.methods.{entry}.datasets" if own else "pretrain.datasets"
        if not settings["datasets"]:
            return [f"{where}: missing, and the entry {entry} pre-trains on its pool (pool: shared, the default); "
                    "list the pool's datasets, or give the entry pool: downstream"], set()
        counts = {dataset_channels(name, datasets[name]) for name in settings["datasets"]}
        if len(counts) > 1:
            return [f"{where}: one pool cannot mix channel counts ({sorted(counts)})"], set()
        return [], counts
    pool = finetune["datasets"] if settings["pool"] == "downstream" else settings["pool"]
    if unknown := [name for name in pool if name not in finetune["datasets"]]:
        return [f"pretrain.methods.{entry}.pool: {unknown} not in finetune.datasets "
                f"({', '.join(finetune['datasets'])})"], set()
    return [], {dataset_channels(name, datasets[name]) for name in pool}


def init_channel_problems(config: dict, entries: dict) -> list[str]:
    """An init pre-trained on a shared pool of C channels, or released for C channels, in the grid of a dataset of
    another channel count (a CT model on BraTS's four modalities): its first layer cannot load, which the transfer
    would find only when the fine-tuning job starts, after the data stages and the pre-training."""
    datasets, finetune = config["datasets"], config["finetune"]
    problems = []
    for dataset, init in itertools.product(finetune["datasets"], finetune["inits"]):
        if init in entries and entries[init]["pool"] == "shared":
            pool = {dataset_channels(name, datasets[name]) for name in entries[init]["datasets"]}
        elif init in released_checkpoints():
            pool = {released_checkpoints()[init].in_channels}
        else:  # scratch, or pre-trained on the dataset itself
            continue
        if not any(in_grid(config, dataset, init, protocol, fraction)
                   for protocol in protocols(config) for fraction in config["splits"]["label_fractions"]):
            continue
        channels = dataset_channels(dataset, datasets[dataset])
        if pool and channels not in pool:
            problems.append(f"finetune.inits: {init} pre-trains on {max(pool)}-channel volumes and cannot initialise "
                            f"the {channels}-channel networks of {dataset}; leave it out there with "
                            f"datasets.{dataset}.inits")
    return problems


def config_problems(config: dict) -> list[str]:
    """What the schema cannot know; assumes the config passed the schema."""
    problems = []
    datasets = config["datasets"]
    pretrain = config.get("pretrain") or {}
    problems += [f"{where}: unknown dataset {name!r}; the config's datasets are {', '.join(datasets)}"
                 for where, names in (("pretrain.datasets", pretrain.get("datasets", [])),
                                      *((f"pretrain.methods.{entry}.datasets", (settings or {}).get("datasets", []))
                                        for entry, settings in pretrain.get("methods", {}).items()),
                                      ("finetune.datasets", config["finetune"]["datasets"]))
                 for name in names if name not in datasets]
    problems += dataset_problems(config)  # before dataset_channels, which reads each registry entry
    if problems:
        return problems
    try:
        entries = pretrain_entries(config)
    except ValueError as err:
        return [str(err)]
    finetune = config["finetune"]
    for entry, settings in entries.items():
        found, counts = pool_channels(config, entry, settings)
        for problem in found + [problem for channels in sorted(counts)
                                for problem in method_problems(entry, settings, channels, pretrain["steps"])]:
            if problem not in problems:  # an entry per channel count, a shared pool per entry: each problem once
                problems.append(problem)
    if not problems:
        problems += init_channel_problems(config, entries)
    for i, backbone in enumerate(finetune["backbones"]):
        problems += backbone_problems(backbone, f"finetune.backbones[{i}]")
    for init in finetune["inits"]:
        if init != "scratch" and init not in entries and init not in released_checkpoints():
            problems.append(f"finetune.inits: {init!r} is not 'scratch', an entry of pretrain.methods "
                            f"({', '.join(entries) or 'none'}) or a released checkpoint "
                            f"({', '.join(released_checkpoints())})")
        if init in entries and init in released_checkpoints():
            problems.append(f"pretrain.methods.{init}: the name of a released checkpoint; rename the entry so "
                            "finetune.inits says which one it means")
        elif init in released_checkpoints():
            released = released_checkpoints()[init]
            copy = released.copy(data_root())
            if released.access == "manual" and not copy.is_file():
                problems.append(f"finetune.inits: {init}: no copy at {copy}; {released.instructions.strip()}")
    problems += [f"finetune.per_dataset.{name}: not one of finetune.datasets ({', '.join(finetune['datasets'])})"
                 for name in finetune.get("per_dataset", {}) if name not in finetune["datasets"]]
    problems += [f"finetune.per_backbone.{name}: unknown backbone; known: {', '.join(sorted(BACKBONES))}"
                 for name in finetune.get("per_backbone", {}) if name not in BACKBONES]
    problems += [f"finetune.per_init.{init}: not one of finetune.inits ({', '.join(finetune['inits'])})"
                 for init in finetune.get("per_init", {}) if init not in finetune["inits"]]
    problems += grid_filter_problems(config)
    return problems or finetuning_problems(config)  # arms exist once inits and backbones are known

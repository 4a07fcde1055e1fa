"""What an experiment config expands to: the runs of the grid and their identities.

The Snakefile imports this module to name its jobs, so it uses the standard library and what Snakemake itself
depends on (PyYAML, jsonschema) only: the Snakemake process may live outside the suite's environment when rules
run under ``--use-conda``.

A run's identity is the hash of everything that determines its trained weights (data, recipe, splits, init,
backbone, training and inference settings, seed, code version). Output paths contain it: an override makes a new
run beside the old one instead of overwriting it, and re-running the same identity resumes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from ssl3d import __version__
from ssl3d.data.files import folder_fingerprint, manual_copy
from ssl3d.io import read_json
from ssl3d.pretrain.released import released_checkpoints

# the experiment config's JSON schema, in the checkout beside the package (the workflow validates against it)
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def schema_problems(config: dict) -> list[str]:
    """One line per schema violation, with its config path (``finetune.steps: -1 is less than the minimum of 1``):
    jsonschema's best match inside each failing branch rather than its full dump."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    best = [jsonschema.exceptions.best_match(e.context) if e.context else e for e in errors]
    paths = ["".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".") for e in best]
    return [f"{path or '(top level)'}: {e.message}" for path, e in zip(paths, best)]


def load_config(path: str | Path) -> dict:
    """An experiment config as the workflow sees it, for commands run by hand: checked against the schema and
    with the schema's defaults filled in (Snakemake's own ``validate``)."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load(Path(path).read_text())
    problems = schema_problems(config)
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    validate(config, str(SCHEMA))
    return config


def canonical_hash(obj, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def fraction_key(fraction: float) -> str:
    """The spelling of a label fraction in split files, run names and tables (0.25 -> '0.25', 1.0 -> '1')."""
    return f"{float(fraction):g}"


def dataset_recipe(config: dict, dataset: str) -> str:
    """The dataset's own ``recipe`` (a paper pre-processes its pre-training and downstream data differently), else
    ``preprocess.recipe``."""
    return config["datasets"][dataset].get("recipe", config["preprocess"]["recipe"])


def skipped_datasets(config: dict) -> dict[str, str]:
    """Dataset -> why its arm is skipped: a user's copy (``path``, else ``<data root>/manual/<name>``) that is absent
    where the config allows it (``missing: skip``); otherwise an absent copy stops the workflow with the dataset's
    instructions."""
    return {name: f"no copy at {manual_copy(name, settings)} (missing: skip)"
            for name, settings in config["datasets"].items()
            if settings.get("missing") == "skip" and not manual_copy(name, settings).exists()}


def dataset_folds(config: dict, dataset: str) -> list[int | None]:
    """The folds a dataset is fine-tuned on: ``[None]`` for a single split (generated or committed), else the
    dataset's ``folds`` of its committed k-fold ``split`` (default: every fold). Reads the committed file with the
    standard library (this module's rule)."""
    settings = config["datasets"][dataset]
    n_folds = 0
    if "split" in settings:
        committed = Path(__file__).parent / "data" / "splits" / f"{settings['split']}.json"
        if not committed.is_file():
            raise ValueError(f"datasets.{dataset}.split: no committed split {settings['split']!r} "
                             f"(they are in {committed.parent})")
        n_folds = len(json.loads(committed.read_text()).get("folds", []))
    if not n_folds:
        if "folds" in settings:
            raise ValueError(f"datasets.{dataset}.folds: its split is a single split, not k-fold; remove folds")
        return [None]
    folds = settings.get("folds", list(range(n_folds)))
    wrong = [fold for fold in folds if not 0 <= fold < n_folds]
    if wrong:
        raise ValueError(f"datasets.{dataset}.folds: {wrong} not folds of {settings['split']} (0..{n_folds - 1})")
    return folds


# The keys of a dataset's entry each data stage reads: a stage's params are these alone, canonically serialised
# (stage_settings), so reordering the config or editing another key re-runs nothing.
STAGE_KEYS = {
    "fetch": ("source", "entry", "path"),
    "prepare": ("source", "labelled", "unlabelled", "seed", "shape", "spacing", "entry", "options", "images",
                "labels", "labels_map", "modality"),
    "preprocess": ("nonfinite", "undeclared_labels"),
}
# Keys that say where a copy lives or which runs to plan, not what the data are: left out of run identities
PLANNING_KEYS = ("path", "missing", "folds", "label_fractions", "inits")


def stage_keys(config: dict, dataset: str, stage: str) -> dict:
    """The keys of ``STAGE_KEYS[stage]`` that the dataset's entry sets."""
    settings = config["datasets"][dataset]
    return {key: settings[key] for key in STAGE_KEYS[stage] if key in settings}


def stage_settings(config: dict, dataset: str, stage: str) -> str:
    """:func:`stage_keys` as canonical JSON: a rule's parameter."""
    return json.dumps(stage_keys(config, dataset, stage), sort_keys=True)


def _data_spec(config: dict, dataset: str) -> dict:
    """What a run's identity holds of a dataset: its config entry (less ``PLANNING_KEYS``) and recipe, and for your
    own folder the fingerprint of its files (``ssl3d.data.files``), so that an added, removed or rewritten file
    makes new runs."""
    settings = config["datasets"][dataset]
    data = {key: value for key, value in settings.items() if key not in PLANNING_KEYS}
    spec = {"dataset": dataset, "data": data, "recipe": dataset_recipe(config, dataset)}
    if settings["source"] == "folder":
        try:
            spec["files"] = folder_fingerprint(settings["images"], settings.get("labels"))
        except (ValueError, OSError) as err:
            raise ValueError(f"datasets.{dataset}: {err}") from None
    return spec


def pretrain_entries(config: dict) -> dict[str, dict]:
    """Entry name -> {method, backbone, overrides} for each entry of ``pretrain.methods``.

    An entry is named after its method, or names it with ``method:`` so that one method can appear with several
    settings (an ablation: ``hybridmim_rec_only: {method: hybridmim, loss_weights: {...}}``). ``backbone:`` in an
    entry replaces ``pretrain.backbone`` for it, and ``datasets:`` ``pretrain.datasets``; ``pool:`` says what it
    pre-trains on (:func:`pretraining_pools`); every other key overrides the method's config defaults.
    """
    pretrain = config.get("pretrain") or {}
    entries = {}
    for entry, settings in pretrain.get("methods", {}).items():
        overrides = dict(settings or {})
        method = overrides.pop("method", entry)
        backbone = overrides.pop("backbone", pretrain.get("backbone"))
        pool = overrides.pop("pool", "shared")
        datasets = overrides.pop("datasets", pretrain.get("datasets", []))
        if backbone is None:
            raise ValueError(f"pretrain.methods.{entry}: no backbone; set pretrain.backbone or a backbone in the entry")
        entries[entry] = {"method": method, "backbone": backbone, "pool": pool, "datasets": datasets,
                          "overrides": overrides}
    return entries


def pretraining_pools(config: dict, entry: str, settings: dict, data_spec: Callable[[str], dict],
                      skipped: dict) -> list[tuple[tuple[str, int | None] | None, dict]]:
    """(downstream arm, what a run's identity holds of its pool) for each pool an entry of ``pretrain.methods``
    (``settings``: its :func:`pretrain_entries` record) pre-trains on, by its ``pool``:

    * ``shared`` (default): one pool, the unlabelled cases of every dataset of the entry's ``datasets`` (default
      ``pretrain.datasets``) less the ``skipped`` ones (none when all are skipped), for every downstream arm.
    * ``downstream`` (the task-specific pre-training of HybridMIM's starred rows), or a list of some of
      ``finetune.datasets``: one pool per such dataset and fold, the images of the cases of its split that are not
      test cases (training and validation: the paper's 80 % training set), for that dataset's and fold's arms
      only; not for a skipped dataset, nor one whose ``inits`` leave the entry out.

    ``data_spec``: dataset -> what an identity holds of it (:func:`_data_spec`, computed once per plan).
    """
    pool = settings["pool"]
    if pool == "shared":
        members = [data_spec(dataset) for dataset in settings["datasets"] if dataset not in skipped]
        return [(None, {"pool": members})] if members else []
    datasets = config["finetune"]["datasets"] if pool == "downstream" else pool
    return [((dataset, fold), {"pool": [data_spec(dataset)],
                               "pool_split": {"splits": config["splits"], **({} if fold is None else {"fold": fold})}})
            for dataset in datasets if dataset not in skipped and entry in config["datasets"][dataset].get(
                "inits", [entry])
            for fold in dataset_folds(config, dataset)]


def downstream_arm(spec: dict) -> tuple[str, int | None] | None:
    """The (dataset, fold) a pre-training run's pool was drawn from (``pool: downstream``), else None."""
    if "pool_split" not in spec:
        return None
    return spec["pool"][0]["dataset"], spec["pool_split"].get("fold")


def arm_name(dataset: str, fold: int | None) -> str:
    """A dataset and fold in run names: ``btcv``, ``brats2020_fold2``."""
    return dataset if fold is None else f"{dataset}_fold{fold}"


def pretrain_runs(config: dict) -> dict[str, dict]:
    """Run name -> resolved spec, for every (entry of pretrain.methods, pool, seed) of the pre-training grid.

    An entry pre-trains on one shared pool (HybridMIM pre-trains on four public CT collections) or once per
    downstream dataset and fold on its training cases (:func:`pretraining_pools`); a skipped dataset leaves the
    pools, and a run's identity records what its pool holds. A downstream pool's dataset and fold follow the
    entry in the run's name: ``hybridmim_unet_task_hybridmim_unet_btcv_seed0_<id>``.
    """
    pretrain = config.get("pretrain")
    if not pretrain:
        return {}
    runs = {}
    entries, skipped = pretrain_entries(config), skipped_datasets(config)
    data_spec = functools.cache(lambda dataset: _data_spec(config, dataset))  # a folder's files are listed once
    pools = {entry: pretraining_pools(config, entry, settings, data_spec, skipped)
             for entry, settings in entries.items()}
    for (entry, settings), seed in itertools.product(entries.items(), pretrain["seeds"]):
        for arm, pool in pools[entry]:
            spec = {
                **pool,
                "variant": entry,
                "method": settings["method"],
                "method_config": settings["overrides"],
                "backbone": settings["backbone"],
                "seed": seed,
                "steps": pretrain["steps"],
                "checkpoint_every": pretrain["checkpoint_every"],
                "code_version": __version__,
            }
            run_id = canonical_hash(spec)
            where = "" if arm is None else f"_{arm_name(*arm)}"
            runs[f"{entry}_{settings['backbone']['name']}{where}_seed{seed}_{run_id}"] = {"run_id": run_id,
                                                                                          "spec": spec}
    return runs


def used_pretrain_runs(pretrain: dict[str, dict], finetune: dict[str, dict]) -> dict[str, dict]:
    """The runs of ``pretrain`` (:func:`pretrain_runs`) that a run of ``finetune`` (:func:`finetune_runs`) starts
    from: an entry whose every downstream arm is skipped (HDSSL's CT model without BTCV) pre-trains for nothing,
    and the workflow does not run it."""
    used = {run["pretrain_run"] for run in finetune.values() if "pretrain_run" in run}
    return {name: run for name, run in pretrain.items() if name in used}


def init_backbones(config: dict) -> list[tuple[str, dict]]:
    """(init, backbone) pairs: ``scratch`` on each of ``finetune.backbones`` (the supervised rows), each
    pre-trained init on the backbone it was pre-trained on and each released checkpoint on the backbone of its
    registry entry (the only ones their weights fit)."""
    finetune = config["finetune"]
    entries = pretrain_entries(config)
    pairs = []
    for init in finetune["inits"]:
        if init == "scratch":
            pairs += [(init, backbone) for backbone in finetune["backbones"]]
        elif init in entries:
            pairs.append((init, entries[init]["backbone"]))
        elif init in released_checkpoints():
            pairs.append((init, released_checkpoints()[init].backbone))
        else:
            raise ValueError(f"finetune.inits: {init!r} is not 'scratch', an entry of pretrain.methods or a "
                             f"released checkpoint ({', '.join(released_checkpoints())})")
    return pairs


# keys of `finetune` that span the grid or override settings per arm; every other key is a training setting
GRID_KEYS = ("datasets", "inits", "seeds", "backbones", "protocols", "per_dataset", "per_backbone", "per_init")
# each protocol's own settings (the rest of a protocol's entry overrides training settings for it)
PROTOCOL_SETTINGS = {"finetune": (), "probe": ("features",),
                     "frozen_then_finetune": ("frozen_steps", "ramp_steps", "start_fraction")}
# keys of a protocol's or a per_init entry that narrow the grid (which inits and label fractions run under it);
# neither settings nor part of a run's identity
GRID_FILTERS = ("inits", "label_fractions")


def merged(settings: dict, overrides: dict) -> dict:
    """``settings`` with ``overrides``; a dict-valued setting (``optimizer``) is updated key by key, so an override
    can change one field of it."""
    out = dict(settings)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def arm_training(config: dict, dataset: str, init: str, backbone: dict, protocol: str) -> tuple[dict, dict]:
    """The training settings of one arm and its protocol settings: ``finetune``'s settings, then the arm's
    dataset's (``per_dataset``), backbone's (``per_backbone``), init's (``per_init``) and protocol's overrides, in
    that order."""
    finetune = config["finetune"]
    training = {key: value for key, value in finetune.items() if key not in GRID_KEYS}
    entry = dict(protocols(config)[protocol] or {})
    own = {key: entry.pop(key) for key in PROTOCOL_SETTINGS[protocol] if key in entry}
    for overrides in (finetune.get("per_dataset", {}).get(dataset, {}),
                      finetune.get("per_backbone", {}).get(backbone["name"], {}),
                      finetune.get("per_init", {}).get(init, {}), entry):
        training = merged(training, {key: value for key, value in overrides.items() if key not in GRID_FILTERS})
    return training, own


def in_grid(config: dict, dataset: str, init: str, protocol: str, fraction: float) -> bool:
    """Whether a cell of the fine-tuning grid runs: each of the dataset's, the init's (``per_init``) and the
    protocol's ``label_fractions``, and the dataset's and the protocol's ``inits``, keeps only those (absent: all).
    A paper's tables read few of the grid's cells (HDSSL: probes of the pre-trained inits at full labels, scratch
    only as a baseline of whole-network fine-tuning; HybridMIM: BraTS from scratch and task-specific inits)."""
    narrowing = (config["datasets"][dataset], config["finetune"].get("per_init", {}).get(init) or {},
                 protocols(config)[protocol] or {})
    return all(fraction in entry.get("label_fractions", [fraction]) and init in entry.get("inits", [init])
               for entry in narrowing)


def protocols(config: dict) -> dict[str, dict]:
    """``finetune.protocols``: protocol -> its entry; ``{finetune: {}}`` (the whole network) when absent."""
    return config["finetune"].get("protocols") or {"finetune": {}}


def finetune_runs(config: dict) -> dict[str, dict]:
    """Run name -> resolved spec, for every (dataset of ``finetune.datasets`` and fold, init and backbone,
    protocol, label fraction, subset, seed) of the fine-tuning grid; skipped datasets (``skipped_datasets``) have no
    runs. A fold (:func:`dataset_folds`) is named only for a k-fold split: ``btcv_fold2_scratch_...``; a protocol
    other than ``finetune`` follows the init: ``phantom_byol_probe_unet_...``.

    The protocol is part of the identity (``protocol``, and ``protocol_settings`` for probe and
    frozen_then_finetune), and so are the arm's training settings (:func:`arm_training`): a per-dataset,
    per-backbone, per-init or per-protocol override makes new runs for that arm only.

    An init other than ``scratch`` names an entry of ``pretrain.methods``, whose run's identity the spec then holds
    (fine-tuning seed i uses pre-training seed i mod the number of pre-training seeds; an entry with a downstream
    pool, its run of the same dataset and fold), so a new checkpoint makes new fine-tuning runs; or a released
    checkpoint (``ssl3d.pretrain.released``), whose identity it holds.
    Fraction 1 has a single subset (every draw of all training cases is the same set), so it is trained once per
    seed rather than once per draw. A dataset's, an init's or a protocol's ``label_fractions`` and a protocol's
    ``inits`` narrow the grid (:func:`in_grid`).
    """
    finetune = config["finetune"]
    pretrained = {(run["spec"]["variant"], run["spec"]["seed"], downstream_arm(run["spec"])): (name, run["run_id"])
                  for name, run in pretrain_runs(config).items()}
    pretrain_seeds = config.get("pretrain", {}).get("seeds", [])
    entries = pretrain_entries(config)
    runs = {}
    datasets = [dataset for dataset in finetune["datasets"] if dataset not in skipped_datasets(config)]
    grid = [(dataset, fold) for dataset in datasets for fold in dataset_folds(config, dataset)]
    data_specs = {dataset: _data_spec(config, dataset) for dataset in datasets}
    for (dataset, fold), (init, backbone), protocol, fraction, subset, (i, seed) in itertools.product(
            grid, init_backbones(config), protocols(config), config["splits"]["label_fractions"],
            range(config["splits"]["subsets"]), enumerate(finetune["seeds"])):
        # a pre-trained init's run: of its seed and, for a downstream pool, of this dataset and fold
        pretrain_run = (init, pretrain_seeds[i % len(pretrain_seeds)],
                        None if entries[init]["pool"] == "shared" else (dataset, fold)) if init in entries else None
        if fraction == 1 and subset > 0 or pretrain_run and pretrain_run not in pretrained:  # no pool: skipped
            continue
        if not in_grid(config, dataset, init, protocol, fraction):
            continue
        training, protocol_settings = arm_training(config, dataset, init, backbone, protocol)
        spec = {
            **data_specs[dataset],
            "splits": config["splits"],
            "protocol": protocol,
            "init": init,
            "backbone": backbone,
            "label_fraction": float(fraction),
            "subset": subset,
            "seed": seed,
            **training,
            "inference": config["inference"],
            "code_version": __version__,
        }
        if fold is not None:  # absent for a single split, so those identities stay what they were
            spec["fold"] = fold
        if protocol != "finetune":  # likewise absent for whole-network fine-tuning
            spec["protocol_settings"] = protocol_settings
        entry = {}
        if init in released_checkpoints():
            spec["released"], entry["released"] = released_checkpoints()[init].identity(), init
        elif init != "scratch":
            entry["pretrain_run"], spec["pretrained"] = pretrained[pretrain_run]
        run_id = canonical_hash(spec)
        where = arm_name(dataset, fold)
        arm = init if protocol == "finetune" else f"{init}_{protocol}"
        name = f"{where}_{arm}_{backbone['name']}_frac{fraction_key(fraction)}_sub{subset}_seed{seed}_{run_id}"
        runs[name] = {"run_id": run_id, "spec": spec, **entry}
    return runs


def cache_folder(data: str | Path, spec: dict) -> str:
    """The preprocessed dataset (a folder: ``index.json`` and its cases) that a dataset spec (a run's or a pool
    member's) reads."""
    return f"{data}/preprocessed/{spec['recipe']}/{spec['dataset']}"


def run_files(entry: dict, stage: str, results: str | Path, data: str | Path) -> dict:
    """The files a run of ``stage`` reads, by role (the ``inputs`` of its config.json): the preprocessed datasets
    of its pool, or its dataset's and its splits and, for an init, the pre-trained checkpoint or the folder of the
    verified released weights."""
    spec = entry["spec"]
    if stage == "pretrain":
        files = {"caches": [cache_folder(data, member) for member in spec["pool"]]}
        if "pool_split" in spec:  # a downstream pool: its dataset's training cases
            files["splits"] = f"{results}/splits/{spec['pool'][0]['dataset']}.json"
        return files
    files = {"cache": cache_folder(data, spec), "splits": f"{results}/splits/{spec['dataset']}.json"}
    if "pretrain_run" in entry:
        files["pretrained"] = f"{results}/pretrain/{entry['pretrain_run']}/pretrained.pt"
    if "released" in entry:
        files["pretrained"] = str(released_checkpoints()[entry["released"]].verified(data))
    return files


def run_config(entry: dict, stage: str, results: str | Path, data: str | Path) -> dict:
    """A run's config.json: its identity and the files it reads; what ``ssl3d pretrain|finetune|evaluate`` run."""
    return {**entry, "inputs": run_files(entry, stage, results, data)}


def read_run(run_config: str | Path | dict) -> dict:
    """A run's config.json, or the record itself: ``ssl3d pretrain|finetune`` pass it read, with its ``inputs``
    replaced by the paths the workflow gives the job (on a cluster without a shared file system, local copies)."""
    return dict(run_config) if isinstance(run_config, dict) else read_json(run_config)


def find_run(config: dict, stage: str, name: str) -> tuple[str, dict]:
    """The run of ``stage`` called ``name``, or the only one whose name starts with it (a name without its identity
    hash), with its entry; an error lists the candidates."""
    runs = pretrain_runs(config) if stage == "pretrain" else finetune_runs(config)
    matches = [run for run in runs if run == name] or [run for run in runs if run.startswith(name)]
    if len(matches) == 1:
        return matches[0], runs[matches[0]]
    listed = matches or list(runs)
    shown = "\n  ".join(listed[:20]) + (f"\n  ... ({len(listed)} in all)" if len(listed) > 20 else "")
    problem = f"{len(matches)} {stage} runs start with" if matches else f"no {stage} run is called"
    raise ValueError(f"{problem} {name!r}; {'they are' if matches else 'the config has'}:\n  {shown or '(none)'}")

"""What an experiment config expands to: the runs of the grid and their identities.

The Snakefile imports this module to name its jobs, so it uses the standard library only (the Snakemake
process may live outside the suite's environment when rules run under ``--use-conda``).

A run's identity is the hash of everything that determines its trained weights (data, recipe, splits, init,
backbone, training and inference settings, seed, code version). Output paths contain it: an override makes a new
run beside the old one instead of overwriting it, and re-running the same identity resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json

from ssl3d import __version__


def canonical_hash(obj, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def fraction_key(fraction: float) -> str:
    """The spelling of a label fraction in split files, run names and tables (0.25 -> '0.25', 1.0 -> '1')."""
    return f"{float(fraction):g}"


def _data_spec(config: dict, dataset: str) -> dict:
    return {"dataset": dataset, "data": config["datasets"][dataset], "recipe": config["preprocess"]["recipe"]}


def pretrain_runs(config: dict) -> dict[str, dict]:
    """Run name -> resolved spec, for every (method, seed) of the pre-training grid on its backbone."""
    pretrain = config.get("pretrain")
    if not pretrain:
        return {}
    runs = {}
    for method, seed in itertools.product(pretrain["methods"], pretrain["seeds"]):
        spec = {
            **_data_spec(config, pretrain["dataset"]),
            "method": method,
            "method_config": pretrain["methods"][method] or {},
            "backbone": pretrain["backbone"],
            "seed": seed,
            "steps": pretrain["steps"],
            "checkpoint_every": pretrain["checkpoint_every"],
            "code_version": __version__,
        }
        run_id = canonical_hash(spec)
        runs[f"{method}_{pretrain['backbone']['name']}_seed{seed}_{run_id}"] = {"run_id": run_id, "spec": spec}
    return runs


def finetune_runs(config: dict) -> dict[str, dict]:
    """Run name -> resolved spec, for every (init, label fraction, subset, seed) of the fine-tuning grid.

    An init other than ``scratch`` names a pre-training method; the run's spec then holds the identity of the
    pre-training run it starts from (fine-tuning seed i uses pre-training seed i mod the number of pre-training
    seeds), so a new checkpoint makes new fine-tuning runs. Fraction 1 has a single subset (every draw of all
    training cases is the same set), so it is trained once per seed rather than once per draw.
    """
    finetune = config["finetune"]
    training = {key: value for key, value in finetune.items() if key not in ("dataset", "inits", "seeds")}
    pretrained = {(run["spec"]["method"], run["spec"]["seed"]): (name, run["run_id"])
                  for name, run in pretrain_runs(config).items()}
    pretrain_seeds = config.get("pretrain", {}).get("seeds", [])
    runs = {}
    for init, fraction, subset, (i, seed) in itertools.product(
            finetune["inits"], config["splits"]["label_fractions"], range(config["splits"]["subsets"]),
            enumerate(finetune["seeds"])):
        if fraction == 1 and subset > 0:
            continue
        spec = {
            **_data_spec(config, finetune["dataset"]),
            "splits": config["splits"],
            "protocol": "finetune",
            "init": init,
            "label_fraction": float(fraction),
            "subset": subset,
            "seed": seed,
            **training,
            "inference": config["inference"],
            "code_version": __version__,
        }
        entry = {}
        if init != "scratch":
            key = (init, pretrain_seeds[i % len(pretrain_seeds)]) if pretrain_seeds else None
            if key not in pretrained:
                raise ValueError(f"finetune.inits: {init!r} is not a method of pretrain.methods")
            entry["pretrain_run"], spec["pretrained"] = pretrained[key]
        run_id = canonical_hash(spec)
        name = f"{init}_{finetune['backbone']['name']}_frac{fraction_key(fraction)}_sub{subset}_seed{seed}_{run_id}"
        runs[name] = {"run_id": run_id, "spec": spec, **entry}
    return runs

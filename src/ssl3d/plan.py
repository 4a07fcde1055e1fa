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


def finetune_runs(config: dict) -> dict[str, dict]:
    """Run name -> resolved spec, for every (init, label fraction, subset, seed) of the fine-tuning grid.

    Fraction 1 has a single subset (every draw of all training cases is the same set), so it is trained once per
    seed rather than once per draw.
    """
    finetune = config["finetune"]
    dataset = finetune["dataset"]
    training = {key: value for key, value in finetune.items() if key not in ("dataset", "inits", "seeds")}
    runs = {}
    for init, fraction, subset, seed in itertools.product(finetune["inits"], config["splits"]["label_fractions"],
                                                          range(config["splits"]["subsets"]), finetune["seeds"]):
        if fraction == 1 and subset > 0:
            continue
        spec = {
            "dataset": dataset,
            "data": config["datasets"][dataset],
            "recipe": config["preprocess"]["recipe"],
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
        run_id = canonical_hash(spec)
        name = (f"{init}_{finetune['backbone']['name']}_frac{fraction_key(fraction)}_sub{subset}_seed{seed}_{run_id}")
        runs[name] = {"run_id": run_id, "spec": spec}
    return runs

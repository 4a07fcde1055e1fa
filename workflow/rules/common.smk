import json
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "../schemas/config.schema.yaml")

# The plan (run names and identities) comes from the package, read from this checkout.
SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))
from ssl3d.plan import finetune_runs

# Jobs run `python -m ssl3d` from this checkout: with the Python that runs Snakemake (an unactivated virtual
# environment works), or inside a --use-conda environment (activated in front of PATH) that holds its dependencies.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]))


envvars:
    "PYTHONPATH",

RESULTS = f"results/{config['experiment']}"
RUNS = finetune_runs(config)


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    recipe="[A-Za-z0-9_-]+",
    run="[A-Za-z0-9_.-]+",


def dataset_settings(wildcards):
    return config["datasets"][wildcards.dataset]


def run_entry(wildcards):
    return RUNS[wildcards.run]


def run_data(wildcards):
    spec = RUNS[wildcards.run]["spec"]
    return {
        "index": f"data/preprocessed/{spec['recipe']}/{spec['dataset']}/index.json",
        "splits": f"{RESULTS}/splits/{spec['dataset']}.json",
    }


def input_dir(wildcards, input):
    return str(Path(input[0]).parent)


def output_dir(wildcards, output):
    return str(Path(output[0]).parent)


def write_run_config(path, run, data):
    """The run's identity and the inputs it reads: what `ssl3d finetune` and `ssl3d evaluate` are given."""
    inputs = {"cache_index": data["index"], "splits": data["splits"]}
    Path(path).write_text(json.dumps({**run, "inputs": inputs}, indent=2))


def device(wildcards, resources):
    return "cuda" if resources.gpu > 0 else "cpu"

import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


# The demo config is the default; an experiment config given with --configfile replaces it whole (Snakemake would
# otherwise merge the two, leaking the demo's methods and inits into the experiment).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



# The plan (run names and identities) comes from the package, read from this checkout.
SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))
from ssl3d.plan import dataset_recipe, finetune_runs, pretrain_runs, skipped_datasets

CONFIG_LOG = Path("logs/config_problems.log")


def config_problems(config):
    """One line per problem with its config path: the schema's, then what only the code knows (ssl3d.validate:
    method settings, backbones, capabilities, protocols). Under --use-conda the Snakemake process may lack the
    suite's dependencies; the jobs then check their own settings when they start."""
    import jsonschema
    import yaml

    schema = yaml.safe_load((Path(workflow.basedir) / "workflow/schemas/config.schema.yaml").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    best = [jsonschema.exceptions.best_match(e.context) if e.context else e for e in errors]
    paths = ["".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".") for e in best]
    problems = [f"{path or '(top level)'}: {e.message}" for path, e in zip(paths, best)]
    if problems:
        return problems
    try:
        from ssl3d.validate import config_problems as code_problems
    except ImportError as err:
        print(f"note: method settings are checked when the jobs start ({err})", file=sys.stderr)
        return []
    return code_problems(config)


PROBLEMS = config_problems(config)
if PROBLEMS:
    CONFIG_LOG.parent.mkdir(exist_ok=True)
    lines = "\n  ".join(PROBLEMS)
    CONFIG_LOG.write_text(f"  {lines}\n\nconfig:\n{json.dumps(config, indent=2)}\n")
    raise WorkflowError(f"the config has {len(PROBLEMS)} problem(s) (also in {CONFIG_LOG}):\n  {lines}")
validate(config, "../schemas/config.schema.yaml")  # fills the schema's defaults

# Jobs run `python -m ssl3d` from this checkout: with the Python that runs Snakemake (an unactivated virtual
# environment works), or inside a --use-conda environment (activated in front of PATH) that holds its dependencies.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]))


envvars:
    "PYTHONPATH",

RESULTS = f"results/{config['experiment']}"
RUNS = finetune_runs(config)
PRETRAIN_RUNS = pretrain_runs(config)
SKIPPED = skipped_datasets(config)
for name, reason in SKIPPED.items():
    print(f"skipping dataset {name}: {reason}", file=sys.stderr)


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    recipe="[A-Za-z0-9_-]+",
    run="[A-Za-z0-9_.-]+",
    stage="finetune|pretrain",


def verified_source(wildcards):
    """A registry dataset is converted from its verified source; phantoms and your own folders need none."""
    if config["datasets"][wildcards.dataset]["source"] == "registry":
        return f"data/sources/{wildcards.dataset}/verified.json"
    return []


def run_entry(wildcards):
    return (RUNS if wildcards.stage == "finetune" else PRETRAIN_RUNS)[wildcards.run]


def cache_index(spec):
    return f"data/preprocessed/{spec['recipe']}/{spec['dataset']}/index.json"


def run_inputs(wildcards):
    """The files a run reads, by role; they become the `inputs` of its config.json."""
    entry = run_entry(wildcards)
    spec = entry["spec"]
    if wildcards.stage == "pretrain":
        return {"cache_indexes": [cache_index(member) for member in spec["pool"]]}
    inputs = {"cache_index": cache_index(spec), "splits": f"{RESULTS}/splits/{spec['dataset']}.json"}
    if "pretrain_run" in entry:
        inputs["pretrained"] = f"{RESULTS}/pretrain/{entry['pretrain_run']}/pretrained.pt"
    if "released" in entry:
        inputs["pretrained"] = f"data/weights/{entry['released']}/verified.json"
    return inputs


def input_dir(wildcards, input):
    return str(Path(input[0]).parent)


def output_dir(wildcards, output):
    return str(Path(output[0]).parent)


def write_record(path, log, record, message):
    """A small JSON record written by a local rule (a run's config, the skipped arms), and its log line."""
    Path(path).write_text(json.dumps(record, indent=2))
    Path(log).write_text(message + "\n")


def device(wildcards, resources):
    return "cuda" if resources.gpu > 0 else "cpu"

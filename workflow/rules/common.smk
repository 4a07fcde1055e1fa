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
from ssl3d import jobserver
from ssl3d.data.files import data_root, folder_cases, folder_fingerprint
from ssl3d.plan import (dataset_recipe, finetune_runs, pretrain_runs, run_config, run_files, schema_problems,
                        skipped_datasets, stage_keys, stage_settings, used_pretrain_runs)
from ssl3d.pretrain.released import released_checkpoints

CONFIG_LOG = Path("logs/config_problems.log")


def config_problems(config):
    """One line per problem with its config path: the schema's, then what only the code knows (ssl3d.validate:
    method settings, backbones, capabilities, protocols). Under --use-conda the Snakemake process may lack the
    suite's dependencies; the jobs then check their own settings when they start."""
    problems = schema_problems(config)
    if problems:
        return problems
    try:
        from ssl3d.validate import config_problems as code_problems
    except ImportError as err:
        print(f"note: method settings are checked when the jobs start ({err})", file=sys.stderr)
        return []
    return code_problems(config)


# checked once, by the Snakemake process that plans; a job's own Snakemake process (on a cluster node) skips it
PROBLEMS = config_problems(config) if workflow.is_main_process else []
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


# Local jobs start as forks of one process that has already imported torch and MONAI (ssl3d.jobserver): about 6 s
# less per job. Not where jobs run on other machines or in another environment (--use-conda, containers).
onstart:
    if workflow.local_exec and not workflow.deployment_settings.deployment_method:
        jobserver.start(Path("logs/job_server.log"))


onsuccess:
    jobserver.stop()


onerror:
    jobserver.stop()


RESULTS = f"results/{config['experiment']}"
DATA = data_root()  # $SSL3D_DATA, else data/: sources, converted and preprocessed datasets, released weights
RUNS = finetune_runs(config)
PRETRAIN_RUNS = pretrain_runs(config)
SKIPPED = skipped_datasets(config)
# A summary of the plan, first in the console (a paper config's job list is thousands of lines)
print(f"experiment {config['experiment']}: {len(used_pretrain_runs(PRETRAIN_RUNS, RUNS))} pre-training and {len(RUNS)} "
      f"fine-tuning runs; follow one with `tail -f {RESULTS}/<stage>/<run>/<stage>.log`, all with `ssl3d status "
      f"{RESULTS}`; a dry run with `--quiet rules` prints only this and the job counts", file=sys.stderr)
for name, reason in SKIPPED.items():
    print(f"skipping dataset {name}: {reason}", file=sys.stderr)
if not RUNS:  # e.g. every downstream dataset skipped: nothing to fine-tune, evaluate or report
    raise WorkflowError(f"experiment {config['experiment']}: no fine-tuning runs to make"
                        + "".join(f"; dataset {name} is skipped: {SKIPPED[name]}, `ssl3d datasets --show "
                                  f"{config['datasets'][name].get('entry', name)}` says how to get it"
                                  for name in config["finetune"]["datasets"] if name in SKIPPED))


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    recipe="[A-Za-z0-9_-]+",
    run="[A-Za-z0-9_.-]+",
    stage="finetune|pretrain",


def prepare_inputs(wildcards):
    """A registry dataset is converted from its verified source; your own folder from its files, so that a file
    added, removed (the input set changes) or rewritten (its mtime) re-runs prepare; phantoms need none."""
    settings = config["datasets"][wildcards.dataset]
    if settings["source"] == "registry":
        return f"{DATA}/sources/{wildcards.dataset}"
    if settings["source"] == "folder":
        cases = folder_cases(settings["images"], settings.get("labels"))
        return [str(path) for _, image, label in cases for path in (image, label) if path is not None]
    return []


def folder_files(wildcards):
    """Your own folder's fingerprint (the size and modification time of each file), a parameter of prepare: a file
    replaced by an older one (mv, cp -p, rsync -a) is not newer than the outputs, which the mtime trigger misses."""
    settings = config["datasets"][wildcards.dataset]
    return folder_fingerprint(settings["images"], settings.get("labels")) if settings["source"] == "folder" else ""


def released_copy(wildcards):
    """The user's copy of a manual released checkpoint (checked when the plan is made, ssl3d.validate), so that it
    reaches a job that runs on another machine; an automatic one is downloaded by the job."""
    entry = released_checkpoints()[wildcards.checkpoint]
    return str(entry.copy(DATA)) if entry.access == "manual" else []


def preprocess_options(wildcards):
    """The dataset's data options (nonfinite, undeclared_labels) as command-line flags."""
    options = stage_keys(config, wildcards.dataset, "preprocess")
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in sorted(options.items()))


def run_entry(wildcards):
    return (RUNS if wildcards.stage == "finetune" else PRETRAIN_RUNS)[wildcards.run]


def run_inputs(wildcards):
    """The files a run reads, by role; they become the `inputs` of its config.json."""
    return run_files(run_entry(wildcards), wildcards.stage, RESULTS, DATA)


def local_inputs(wildcards, input):
    """The run's inputs where this job has them, as JSON {role: path} (``ssl3d pretrain|finetune --inputs``): the
    plan's paths, or on a cluster without a shared file system the local copies of the storage files."""
    return json.dumps({role: [str(path) for path in input[role]] if isinstance(files, list) else str(input[role])
                       for role, files in run_inputs(wildcards).items()}, sort_keys=True)


def run_record(wildcards):
    """A run's config.json as canonical JSON (key order in the config is cosmetic)."""
    return json.dumps(run_config(run_entry(wildcards), wildcards.stage, RESULTS, DATA), sort_keys=True)


# What the report reads of each run (declared, so that a cluster without a shared file system brings them to it).
# Not the Snakemake benchmark files (a job's whole wall time): declared, they would re-run a run made by hand
# (`ssl3d finetune --configfile`), which has none; where they are not at hand the report leaves that column empty.
REPORTED = {"pretrain": ("manifest.json", "step_log.csv"),
            "finetune": ("manifest.json", "train_log.csv", "config.json", "model.pt")}


# the preprocessed datasets whose test cases the report's qualitative figures show
REPORT_CACHES = sorted({run_files(entry, "finetune", RESULTS, DATA)["cache"] for entry in RUNS.values()})
# the checkout's step-time comparisons with the official code (benchmarks/official_compare.py): files of the
# repository, not of the experiment, so local(): read from the checkout, never through a storage provider
OFFICIAL_SPEED = sorted(os.path.relpath(path) for path in
                        (Path(workflow.basedir) / "benchmarks" / "results" / "official").glob("*.json"))


def report_inputs(wildcards):
    """The report's inputs by role: the tables, every run's files it reads, and its preprocessed datasets."""
    pretrain_runs = sorted(used_pretrain_runs(PRETRAIN_RUNS, RUNS))
    return {
        "per_case": f"{RESULTS}/per_case.csv",
        "skipped": f"{RESULTS}/skipped.json",
        "runs": [f"{RESULTS}/{stage}/{run}/{name}" for stage, runs in (("pretrain", pretrain_runs), ("finetune", RUNS))
                 for run in runs for name in REPORTED[stage]],
        "caches": REPORT_CACHES,
        "comparisons": [local(path) for path in OFFICIAL_SPEED],
    }


def local_caches(wildcards, input):
    """The report's preprocessed datasets where this job has them, as JSON {path the run configs name: path}."""
    return json.dumps(dict(zip(REPORT_CACHES, map(str, input.caches))), sort_keys=True)


def input_dir(wildcards, input):
    return str(Path(input[0]).parent)


def data_root_of(levels):
    """The data root of a data stage's output folder, ``levels`` folders above it (``<root>/raw/<name>``: 2), for
    the stage's command."""
    return lambda wildcards, output: str(Path(output[0]).parents[levels - 1])


def output_dir(wildcards, output):
    return str(Path(output[0]).parent)


# The shell command of a local rule that writes ``params.record`` (a JSON string) as a file, indented. A shell job,
# not `run:`: Snakemake starts a whole new Snakemake process for each `run:` job (seconds each; the demo has ~40).
WRITE_RECORD = "printf '%s' {params.record:q} | python -m json.tool > {output} 2> {log}"


def gpus(resources):
    """The GPUs a job was given: ``gpu``, or a cluster's ``gres`` (``gpu:N`` or ``gpu:<type>:N``)."""
    given = [entry.split(":") for entry in str(resources.get("gres", "") or "").split(",")]
    from_gres = sum(int(parts[-1]) if parts[-1].isdigit() else 1 for parts in given if parts[0].strip() == "gpu")
    return max(resources.gpu, from_gres)


def device(wildcards, resources):
    return "cuda" if gpus(resources) > 0 else "cpu"


def threads_per_process(wildcards, threads, resources):
    """A multi-GPU job runs one process per GPU (``launcher``): they share the job's threads."""
    return max(threads // max(gpus(resources), 1), 1)


def loader_workers(wildcards, threads, resources):
    """Data-loader processes of each training process: on a GPU, all its threads but one (the main process feeds
    the device); on a CPU the threads compute the steps, so the batches are drawn by the training process, one step
    ahead in a thread where torch leaves a core free (``ssl3d.engine.drawn_ahead``). Measured on the demo's 2 cores,
    its pre-training jobs two at a time: a loader process per job made them 7% slower (96.7 and 97.0 s of six jobs,
    103.5 and 104.9 s with it; interleaved runs), and the drawing thread neither gains nor loses there (seven jobs
    107.8 and 101.6 s without it, 100.6 and 107.2 s with it): the cores are busy either way."""
    return max(threads_per_process(wildcards, threads, resources) - 1, 0) if gpus(resources) > 0 else 0


def estimated_resources(stage):
    """With ``$SSL3D_DEVICE_CLASS`` set (a class measured in benchmarks/results, e.g. cpu-2core): a training job's
    ``mem_mb`` and ``runtime`` (minutes) from the plan (``ssl3d.estimate.job_resources``: the step's FLOPs and
    memory at that class's measured rates), so a cluster scheduler can place it; a profile's set-resources still
    overrides them. Unset otherwise: a local run needs none and skips the seconds of counting, and a job's own
    Snakemake process on a cluster node never counts."""
    device_class = os.environ.get("SSL3D_DEVICE_CLASS")
    if not device_class or not workflow.is_main_process:
        return {}
    from ssl3d.estimate import job_resources

    runs = PRETRAIN_RUNS if stage == "pretrain" else RUNS
    return {key: (lambda wildcards, key=key: job_resources(stage, runs[wildcards.run], device_class)[key])
            for key in ("mem_mb", "runtime")}


def launcher(wildcards, resources):
    """How a pre-training job starts: one process, or with more than one GPU (:func:`gpus`) one process per GPU under
    torchrun (data-parallel, ssl3d.distributed), after claiming that many GPUs no other job holds (ssl3d.gpus)."""
    count = gpus(resources)
    if count <= 1:
        return "python"
    from ssl3d.pretrain.method import make_config
    from ssl3d.pretrain.registry import get_method

    spec = PRETRAIN_RUNS[wildcards.run]["spec"]
    batch = make_config(get_method(spec["method"]).Config, spec["method_config"]).batch_size
    if batch % count:  # the processes share each step's batch equally (ssl3d.data.sampling.StepShards)
        raise WorkflowError(f"pretrain {wildcards.run}: its batch_size {batch} does not divide among its {count} "
                            f"GPUs; set pretrain.methods.{spec['variant']}.batch_size to a multiple of {count}")
    return f"python -m ssl3d.gpus {count} python -m torch.distributed.run --standalone --nproc_per_node {count}"

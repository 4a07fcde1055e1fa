"""The ``ssl3d`` command. Every Snakemake rule calls one of its subcommands; each is a thin wrapper over one
library function, so what the workflow does can also be done by hand, one step at a time."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
from pathlib import Path

from ssl3d import __version__
from ssl3d.data.files import data_root


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({err})") from err


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:<index>")
    return text


def cmd_status(args):
    from ssl3d.status import status_text

    print(status_text(args.results))


def cmd_fetch(args):
    from ssl3d.data.acquire import fetch_dataset

    fetch_dataset(args.dataset, args.settings, args.data_root)


def cmd_fetch_weights(args):
    from ssl3d.pretrain.released import get_released
    from ssl3d.pretrain.transfer import fetch_released

    fetch_released(get_released(args.name), args.data_root)


def cmd_prepare(args):
    from ssl3d.data.acquire import prepare_dataset

    prepare_dataset(args.dataset, args.settings, args.data_root)


def cmd_preprocess(args):
    from ssl3d.data.cache import preprocess_dataset
    from ssl3d.data.recipes import get_recipe

    label_map = {int(k): int(v) for k, v in args.label_map.items()} if args.label_map else None
    classes = {int(k): v for k, v in args.classes.items()} if args.classes else None
    preprocess_dataset(args.dataset, get_recipe(args.recipe), args.out, label_map=label_map, classes=classes,
                       nonfinite=args.nonfinite, undeclared_labels=args.undeclared_labels)


def cmd_splits(args):
    from ssl3d.data.cache import read_index
    from ssl3d.data.splits import make_splits
    from ssl3d.io import write_json

    index = read_index(args.index)
    labelled = [case_id for case_id, case in index["cases"].items() if case["labelled"]]
    if args.paper_split:
        from ssl3d.data.paper_splits import load_paper_split
        from ssl3d.data.splits import from_paper_split

        split = from_paper_split(args.paper_split, load_paper_split(args.paper_split), labelled, args.seed,
                                 args.fractions, args.subsets)
    else:
        split = make_splits(labelled, seed=args.seed, n_validation=args.validation, n_test=args.test,
                            label_fractions=args.fractions, n_subsets=args.subsets)
    write_json(args.out, split)


def load_run(args) -> tuple[dict, str]:
    """The run config and output folder of a training command: ``--run-config`` and ``--out`` as the workflow
    passes them (with ``--inputs``, the files the job reads where the workflow put them), or a run of an
    experiment config by name (``--configfile``, ``--run``), whose config.json is written where the workflow
    writes it, ``results/<experiment>/<stage>/<run>``, unless ``--out`` says where."""
    from ssl3d.plan import read_run

    config, out = run_config_path(args)
    record = read_run(config)
    if args.inputs:
        if set(args.inputs) != set(record["inputs"]):
            raise ValueError(f"--inputs gives {sorted(args.inputs)}; {config} reads {sorted(record['inputs'])}")
        record["inputs"] = args.inputs
    return record, out


def run_config_path(args) -> tuple[str, str]:
    """``load_run``'s config.json path and output folder."""
    if args.run_config:
        if args.configfile or args.run:
            raise ValueError("give either --run-config or --configfile with --run, not both")
        if not args.out:
            raise ValueError("--run-config needs --out (the run's folder)")
        return args.run_config, args.out
    if not (args.configfile and args.run):
        raise ValueError("name the run: --configfile <experiment.yaml> --run <name or its start>, or --run-config")
    from ssl3d.io import write_json
    from ssl3d.plan import find_run, load_config, run_config

    config = load_config(args.configfile)
    results = Path("results") / config["experiment"]
    name, entry = find_run(config, args.command, args.run)
    record = run_config(entry, args.command, results, data_root())
    missing = [path for value in record["inputs"].values() for path in ([value] if isinstance(value, str) else value)
               if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"run {name} reads files not made yet: {', '.join(missing)}; make them first, e.g. "
                                f"`snakemake --cores all --configfile {args.configfile} {missing[0]}`")
    out = Path(args.out or results / args.command / name)
    write_json(out / "config.json", record)
    print(f"{args.command} run {name} into {out}", file=sys.stderr)
    return str(out / "config.json"), str(out)


def cmd_finetune(args):
    from ssl3d.finetune.train import finetune

    run_config, out = load_run(args)
    model = finetune(run_config, out, device=args.device, workers=args.workers, log_every=args.log_every)
    if args.evaluate:  # in this process: a second job would pay the imports again (4-5 s a run)
        evaluate(args, run_config, model, args.evaluate)


def cmd_pretrain(args):
    from ssl3d.distributed import torchrun_process_group
    from ssl3d.pretrain.loop import pretrain

    run_config, out = load_run(args)
    with torchrun_process_group(args.device) as device:
        pretrain(run_config, out, device=device, workers=args.workers, log_every=args.log_every)


def cmd_methods(args):
    import dataclasses
    import inspect

    from ssl3d.nets import BACKBONES
    from ssl3d.pretrain.registry import methods
    from ssl3d.pretrain.released import released_checkpoints

    for name, cls in methods().items():
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(cls.Config)}
        requires = ", ".join(" or ".join(n) if isinstance(n, tuple) else n for n in cls.requires) or "nothing"
        print(f"{name} (version {cls.version}, {inspect.getsourcefile(cls)})\n  paper: {cls.paper}\n"
              f"  requires: {requires}; runs on: "
              f"{', '.join(cls.supported_backbones())}; channels: {'any' if cls.multichannel else 'one'}")
        print("  defaults: " + json.dumps(defaults, default=str))
    print("released checkpoints (finetune.inits; `ssl3d fetch-weights --name <name>`):")
    for name, entry in released_checkpoints().items():
        print(f"  {name}: {entry.title}; method {entry.method} on {json.dumps(entry.backbone)}; {entry.access}; "
              f"licence: {entry.licence}")
    print("backbones (capabilities):")
    for name, backbone in BACKBONES.items():
        print(f"  {name}: {', '.join(sorted(backbone.capabilities)) or '-'}")


def cmd_datasets(args):
    from ssl3d.data.registry import describe_entry, get_entry, registry_table

    print(describe_entry(get_entry(args.show), args.data_root) if args.show else registry_table(args.data_root))


def evaluate(args, run_config, model, out):
    from ssl3d.evaluate.metrics import EmptyPolicy
    from ssl3d.evaluate.run import evaluate_run

    if args.nsd_tolerance is None:
        raise ValueError("evaluation needs --nsd-tolerance (mm: a number or JSON {target: mm})")
    evaluate_run(run_config, model, out, nsd_tolerance_mm=args.nsd_tolerance, policy=EmptyPolicy(**args.empty_policy),
                 device=args.device)


def cmd_evaluate(args):
    evaluate(args, args.run_config, args.model, args.out)


def cmd_collect(args):
    from ssl3d.analysis.aggregate import collect

    collect(args.inputs, args.out)


def cmd_summarise(args):
    from ssl3d.analysis.aggregate import write_summary

    write_summary(args.per_case, args.out_csv, args.out_md)


def cmd_report(args):
    from ssl3d.report.build import ReportOptions, build_report

    build_report(args.results, args.out, ReportOptions.from_config(args.options, n_resamples=args.resamples),
                 args.caches, args.comparisons)


def cmd_estimate(args):
    from ssl3d.estimate import estimate_table
    from ssl3d.plan import load_config

    print(estimate_table(load_config(args.configfile), args.device_class))


def evaluation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nsd-tolerance", type=_json, help="mm: a number or JSON {target: mm}")
    p.add_argument("--empty-policy", type=_json, default={}, help='JSON, e.g. {"both_empty": "nan"}')


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="ssl3d", description=__doc__)
    main.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    main.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = main.add_subparsers(dest="command", required=True)

    for name, func, text in (
            ("fetch", cmd_fetch, "download and verify a registry dataset (automatic sources), or verify your copy "
                                 "of a manual one; writes <data-root>/sources/<dataset>/verified.json"),
            ("prepare", cmd_prepare, "write <data-root>/raw/<dataset> in the MSD layout: generate phantoms, convert "
                                     "a verified registry source or your own folder")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dataset", required=True, help="the dataset's name in the config")
        p.add_argument("--settings", type=_json, required=True, help="JSON: the dataset's entry in the config")
        p.add_argument("--data-root", type=Path, default=data_root(), help="default: $SSL3D_DATA, else data")
        p.set_defaults(func=func)

    p = sub.add_parser("fetch-weights", help="download (or find your copy of) a released checkpoint and check it "
                                             "against its backbone; writes <data-root>/weights/<name>/verified/")
    p.add_argument("--name", required=True, help="the checkpoint's name (`ssl3d methods` lists them)")
    p.add_argument("--data-root", type=Path, default=data_root(), help="default: $SSL3D_DATA, else data")
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("preprocess", help="run a named recipe on every case of a dataset into the per-case cache")
    p.add_argument("--dataset", required=True, help="folder holding dataset.json")
    p.add_argument("--recipe", required=True, help="recipe name (see recipes.yaml)")
    p.add_argument("--out", required=True)
    p.add_argument("--label-map", type=_json, default=None, help='JSON {"source": target}')
    p.add_argument("--classes", type=_json, default=None, help='JSON {"index": "name"} after the label map')
    p.add_argument("--nonfinite", type=lambda text: text if text == "error" else float(text), default="error",
                   help="NaN / inf voxels: error (default) or a number to replace them with")
    p.add_argument("--undeclared-labels", choices=("error", "background"), default="error",
                   help="label values dataset.json does not declare: an error (default) or background")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("splits", help="write train/validation/test and nested label-fraction subsets")
    p.add_argument("--index", required=True, help="the preprocessed dataset: its folder (or index.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--validation", type=int, required=True)
    p.add_argument("--test", type=int, required=True)
    p.add_argument("--paper-split", default=None, help="a committed paper split (ssl3d.data.paper_splits) whose "
                   "train / validation / test replace --validation / --test")
    p.add_argument("--fractions", type=float, nargs="+", required=True)
    p.add_argument("--subsets", type=int, required=True)
    p.set_defaults(func=cmd_splits)

    for name, func, text in (
            ("finetune", cmd_finetune, "train one fine-tuning run (resumes from its last checkpoint)"),
            ("pretrain", cmd_pretrain, "pre-train one method (resumes from its last checkpoint)")):
        p = sub.add_parser(name, help=text, description=f"{text}. By hand: --configfile <experiment.yaml> --run "
                           f"<run name, or its start without the hash>; the workflow passes --run-config and --out.")
        p.add_argument("--configfile", type=Path, help="an experiment config, e.g. config/experiments/micro.yaml")
        p.add_argument("--run", help=f"a {name} run of that config (a unique start of its name is enough)")
        p.add_argument("--run-config", help="the run's config.json, as the workflow writes it")
        p.add_argument("--out", help="the run's folder (default with --configfile: results/<experiment>/"
                                     f"{name}/<run>)")
        p.add_argument("--inputs", type=_json, help="JSON {role: path}: where the files of the run config's "
                       "inputs are (the workflow's local copies on a cluster without a shared file system)")
        p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:<index>")
        p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
        p.add_argument("--log-every", type=int, default=10)
        p.set_defaults(func=func)
        if name == "finetune":
            p.add_argument("--evaluate", metavar="PER_CASE_CSV", help="then evaluate the model on the run's test "
                           "cases into this file, as `ssl3d evaluate` does (needs --nsd-tolerance)")
            evaluation_arguments(p)

    p = sub.add_parser("status", help="each run of an experiment: done, training (step, steps/s, ETA, its log) "
                                      "or pending; safe while snakemake runs")
    p.add_argument("results", type=Path, help="the experiment's results folder, e.g. results/demo")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("methods", help="list the registered pre-training methods with their papers and defaults")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("datasets", help="list the registry's datasets: access, licence, size and status here")
    p.add_argument("--data-root", type=Path, default=data_root(), help="default: $SSL3D_DATA, else data")
    p.add_argument("--show", metavar="NAME", help="print one entry in full, with the steps to get a manual one")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("evaluate", help="per-case metrics of a fine-tuned run on its test cases")
    p.add_argument("--run-config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:<index>")
    evaluation_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("collect", help="concatenate per-case tables")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("summarise", help="mean ± sd across seeds per init, label fraction and target")
    p.add_argument("--per-case", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.set_defaults(func=cmd_summarise)

    p = sub.add_parser("report", help="the HTML report of an experiment, rebuilt from its results (trains nothing)")
    p.add_argument("--results", required=True, help="the experiment's results folder, e.g. results/demo")
    p.add_argument("--out", required=True, help="the report folder to (re)write, e.g. reports/demo")
    p.add_argument("--options", type=_json, default={}, help="JSON: the config's report block, e.g. "
                   '\'{"tier": "paper", "aliases": {"hybridmim_unet": "hybridmim"}}\'')
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples per interval")
    p.add_argument("--caches", type=_json, default={}, help="JSON {path a run config names: path}: where the "
                   "preprocessed datasets are, where not at the paths the runs name (the workflow's local copies)")
    p.add_argument("--comparisons", nargs="*", default=[], metavar="JSON",
                   help="results of benchmarks/official_compare.py (benchmarks/results/official/*.json): the report "
                        "shows those of the methods the experiment pre-trains")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("estimate", help="what a config will cost before anything runs: per stage, its runs, steps, "
                                        "seconds per step, device-hours and peak memory on a measured device class")
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="an experiment config (default: the demo's, config/config.yaml)")
    p.add_argument("--device-class", default="cpu-2core",
                   help="a device class measured by benchmarks/gpu_step.py (benchmarks/results/<class>.json)")
    p.set_defaults(func=cmd_estimate)
    return main


def run() -> None:
    """The process's entry (``ssl3d``, ``python -m ssl3d``): ``main`` with fewer garbage collections. Importing
    torch and MONAI makes millions of long-lived objects, which Python's default (a collection every 700 new
    objects) walks again and again, and once more at exit: here a collection waits for 50,000, and the exit skips
    the last one (the memory goes back to the system either way). Each job starts about 0.5 s sooner (3.9 -> 3.3 s
    to import fine-tuning) and ends about 1 s sooner. Tests call ``main``, keeping Python's defaults. Under a local
    Snakemake run the command runs in a worker forked by the run's job server, which has imported all that already
    (ssl3d.jobserver)."""
    from ssl3d.jobserver import GC_THRESHOLD, run_in_server

    gc.set_threshold(GC_THRESHOLD)
    code = run_in_server(sys.argv[1:])
    if code is None:
        code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        import torch  # here, not at the top: the data and table commands do not need it (1.5 s of start-up)

        torch.set_num_threads(args.threads)
    if getattr(args, "device", None) == "cuda":
        from ssl3d.distributed import launched_by_torchrun
        from ssl3d.gpus import claim_gpus

        if not launched_by_torchrun():  # a torchrun job's GPUs were claimed before it started (ssl3d.gpus)
            claim_gpus(1)  # a GPU no other job of this machine holds
    from ssl3d.data.fetch import FetchError  # a failed download, verification, unsafe archive or missing copy
    from ssl3d.io import WriteError, describe_os_error

    log = logging.getLogger("ssl3d")
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FetchError, WriteError) as err:
        log.error("%s", err)
        return 1
    except BrokenPipeError:  # the reader of the output went away (`ssl3d methods | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except OSError as err:  # outside ssl3d.io (a read-only results folder, a full disk): the file and the fix
        log.error("%s", describe_os_error(err))
        return 1
    return 0

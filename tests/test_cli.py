"""The `ssl3d` command: every subcommand answers --help, and a bad input ends with a one-line error."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ssl3d import __version__
from ssl3d.cli import main, parser

from conftest import REPO, run_config

SUBCOMMANDS = ["datasets", "fetch", "fetch-weights", "prepare", "preprocess", "splits", "pretrain", "methods",
               "finetune", "evaluate", "collect", "summarise", "report", "status", "estimate"]


def test_console_script_is_installed():
    ssl3d = shutil.which("ssl3d", path=str(Path(sys.executable).parent))
    assert ssl3d, "the ssl3d console script is not installed beside this Python"
    result = subprocess.run([ssl3d, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "finetune" in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0 and command in capsys.readouterr().out


def test_bad_input_is_a_clear_error_not_a_traceback(phantom_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl3d", "preprocess", "--dataset", str(phantom_root),
                             "--recipe", "nope", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "unknown recipe 'nope'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_methods_lists_every_method_with_paper_requirements_backbones_and_defaults():
    result = subprocess.run([sys.executable, "-m", "ssl3d", "methods"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"models_genesis (version 1, {REPO / 'baselines' / 'models_genesis.py'})" in result.stdout
    assert f"hybridmim (version 1, {REPO / 'methods' / 'hybridmim.py'})" in result.stdout
    assert "Zhou et al." in result.stdout and "requires: nothing; runs on: unet, basicunet" in result.stdout
    assert "requires: region_decoding or hidden_states; runs on: unet, swinunetr, hybridmim_unet" in result.stdout
    assert "hybridmim_unet: region_decoding" in result.stdout  # the backbones with their capabilities
    assert '"name": "lars", "lr": 0.2' in result.stdout


def test_version_device_choices_and_a_closed_pipe(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"ssl3d {__version__}"
    with pytest.raises(SystemExit):
        parser().parse_args(["finetune", "--run-config", "c.json", "--out", "o", "--device", "gpu"])
    assert "'gpu' is not cpu, cuda or cuda:<index>" in capsys.readouterr().err
    assert parser().parse_args(["finetune", "--run-config", "c", "--out", "o", "--device", "cuda:1"]).device == "cuda:1"
    piped = subprocess.run(f"{sys.executable} -m ssl3d methods | head -1", shell=True, capture_output=True, text=True)
    assert piped.stdout.startswith("byol (") and not piped.stderr  # no "Broken pipe" error when head stops reading


def test_pretrain_and_finetune_by_hand_from_a_config_and_a_run_name(tiny_index, tiny_splits, tmp_path, monkeypatch,
                                                                     caplog):
    """A user runs one run of an experiment config by name (its start is enough): the config.json the workflow
    would write, in the folder the workflow would use, so that Snakemake later finds the run done."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSL3D_DATA", str(tmp_path / "data"))
    micro = str(REPO / "config" / "experiments" / "micro.yaml")
    assert main(["pretrain", "--configfile", micro, "--run", "models_genesis"]) == 1  # its data are not made yet
    assert "data/preprocessed/demo_ct/phantom" in caplog.text and f"--configfile {micro}" in caplog.text
    assert main(["finetune", "--configfile", micro, "--run", "phantom_byol"]) == 1  # 2 fractions × 2 seeds: ambiguous
    assert "4 finetune runs start with 'phantom_byol'; they are:" in caplog.text

    (tmp_path / "data" / "preprocessed" / "demo_ct").mkdir(parents=True)
    (tmp_path / "data" / "preprocessed" / "demo_ct" / "phantom").symlink_to(tiny_index.parent)
    (tmp_path / "results" / "micro" / "splits").mkdir(parents=True)
    shutil.copy(tiny_splits, tmp_path / "results" / "micro" / "splits" / "phantom.json")
    assert main(["pretrain", "--configfile", micro, "--run", "models_genesis"]) == 0
    assert main(["finetune", "--configfile", micro, "--run", "phantom_models_genesis_unet_frac1_sub0_seed0",
                 "--evaluate", "scores.csv", "--nsd-tolerance", "2"]) == 0
    [run] = (tmp_path / "results" / "micro" / "finetune").iterdir()
    assert set(pd.read_csv("scores.csv")["case_id"]) == set(json.loads(tiny_splits.read_text())["test"])
    assert (run / "model.pt").is_file() and json.loads((run / "config.json").read_text())["inputs"]["pretrained"] \
        == str(next((tmp_path / "results" / "micro" / "pretrain").glob("models_genesis_*/pretrained.pt")).relative_to(
            tmp_path))
    assert main(["finetune", "--run-config", str(run / "config.json")]) == 1 and "needs --out" in caplog.text


def test_a_job_reads_its_inputs_where_the_workflow_put_them(tiny_index, tiny_splits, tmp_path, caplog):
    """On a cluster without a shared file system a job's inputs are local copies at other paths than the run config
    names: ``--inputs`` says where (the workflow passes it to every training job)."""
    config = str(run_config(tmp_path / "config.json", tmp_path / "elsewhere" / "cache", tmp_path / "elsewhere.json"))
    run = ["finetune", "--run-config", config, "--out", str(tmp_path / "run")]
    assert main([*run, "--inputs", json.dumps({"cache": str(tiny_index.parent), "splits": str(tiny_splits)})]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    assert main([*run, "--inputs", json.dumps({"cache_index": str(tiny_index)})]) == 1
    assert "--inputs gives ['cache_index']; " in caplog.text and "reads ['cache', 'splits']" in caplog.text

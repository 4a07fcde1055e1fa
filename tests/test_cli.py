"""The `ssl3d` command: every subcommand answers --help, and a bad input ends with a one-line error."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssl3d.cli import parser

SUBCOMMANDS = ["datasets", "fetch", "prepare", "preprocess", "splits", "pretrain", "methods", "finetune", "evaluate",
               "collect", "summarise"]


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
    assert "models_genesis (version 1)" in result.stdout and "byol (version 1)" in result.stdout
    assert "Zhou et al." in result.stdout and "requires: nothing; runs on: unet, basicunet" in result.stdout
    assert "requires: region_decoding or hidden_states; runs on: swinunetr, hybridmim_unet" in result.stdout
    assert "hybridmim_unet: region_decoding" in result.stdout  # the backbones with their capabilities
    assert '"name": "lars", "lr": 0.2' in result.stdout

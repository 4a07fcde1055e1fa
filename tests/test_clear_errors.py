"""Faults that used to escape as a traceback or a cryptic message, or to surface only late: each is now one line
naming the file or config setting and the fix, from `ssl3d <command>` (exit code 1) or when the workflow is planned.
Disk-full and read-only folders are simulated by failing writers, so the tests also hold when run as root."""

import copy
import errno
import gzip
import json
import logging
import shutil
import tempfile

import numpy as np
import pytest
import torch

from ssl3d import cli
from ssl3d.checkpoint import save_checkpoint
from ssl3d.validate import config_problems

from conftest import DEMO

TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 123 vs 456")


@pytest.fixture
def dataset_copy(phantom_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    return root


def preprocess(dataset, out, caplog) -> tuple[int, list[str]]:
    """Run `ssl3d preprocess` in-process: its exit code and the error lines it logged."""
    code = cli.main(["preprocess", "--dataset", str(dataset), "--recipe", "demo_ct", "--out", str(out)])
    return code, [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def demo(edit) -> dict:
    config = copy.deepcopy(DEMO)
    edit(config)
    return config


def truncated_voxels(data: bytes) -> bytes:
    """A valid gzip stream holding a NIfTI whose voxel data stops halfway (nibabel's message spans two lines)."""
    raw = gzip.decompress(data)
    return gzip.compress(raw[: len(raw) // 2])


@pytest.mark.parametrize("corrupt", [lambda data: bytes(range(256)) * 16, truncated_voxels],
                         ids=["garbage", "truncated_voxels"])
def test_a_corrupt_labelled_nifti_is_one_line_naming_the_file(dataset_copy, tmp_path, caplog, corrupt):
    label = dataset_copy / "labelsTr" / "phantom_000.nii.gz"
    label.write_bytes(corrupt(label.read_bytes()))
    code, errors = preprocess(dataset_copy, tmp_path / "out", caplog)
    assert code == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    assert f"{label}: cannot be read as NIfTI" in errors[0] and "re-copy, re-download" in errors[0]


def test_a_corrupt_label_in_your_own_folder_is_one_line_when_it_is_prepared(dataset_copy, tmp_path, caplog):
    label = dataset_copy / "labelsTr" / "phantom_000.nii.gz"
    label.write_bytes(bytes(range(256)) * 16)
    settings = {"source": "folder", "images": str(dataset_copy / "imagesTr"), "labels": str(dataset_copy / "labelsTr")}
    code = cli.main(["prepare", "--dataset", "mine", "--settings", json.dumps(settings), "--data-root",
                     str(tmp_path / "data")])
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert code == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    assert f"{label}: cannot be read as NIfTI (ImageFileError" in errors[0]


@pytest.mark.parametrize("error", [TORCH_FULL_DISK, OSError(errno.ENOSPC, "No space left on device")],
                         ids=["torch", "oserror"])
def test_a_full_disk_leaves_the_last_checkpoint_and_no_partial_file(tmp_path, monkeypatch, error):
    last = tmp_path / "last.pt"
    save_checkpoint(last, {"step": 4})

    def full_disk(obj, path):
        path.write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as raised:
        save_checkpoint(last, {"step": 8})
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{last}: ")
    assert "no space left on device?" in message and "a re-run resumes from the last checkpoint" in message
    assert [path.name for path in tmp_path.iterdir()] == ["last.pt"]  # the temporary file is gone
    monkeypatch.undo()
    assert torch.load(last) == {"step": 4}


def test_a_full_disk_in_a_command_is_one_line(phantom_root, tmp_path, monkeypatch, caplog):
    def full_disk(path, **arrays):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    out = tmp_path / "out"
    code, errors = preprocess(phantom_root, out, caplog)
    assert code == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    store = tmp_path / ".out.cases"  # where the cases are made (ssl3d.data.cache)
    assert errors[0].startswith(f"{store / 'phantom_000.npz'}: ") and "no space left on device?" in errors[0]
    assert not out.exists() and not list(store.iterdir())


def test_a_read_only_folder_is_one_line_naming_it_and_the_fix(phantom_root, tmp_path, monkeypatch, caplog):
    def read_only(dir, prefix, suffix):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # every write of the suite starts here (ssl3d.io)
    out = tmp_path / "out"
    code, errors = preprocess(phantom_root, out, caplog)
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path / '.out.cases' / 'phantom_000.npz'}: Permission denied; make its folder "
                                "writable")

    def refused(args):  # a write outside ssl3d.io, e.g. a folder a library creates
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "results"))

    caplog.clear()
    monkeypatch.setattr(cli, "cmd_datasets", refused)
    assert cli.main(["datasets"]) == 1
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'results'}: Permission denied; make its folder writable (or choose another output folder) "
        "and re-run"]


@pytest.mark.parametrize("field, value, rule", [
    ("patch_size", [-32, 32, 32], "is not three positive integers"),
    ("batch_size", 0, "is not a positive integer"),
    ("grad_clip", -1.0, "is neither null (no clipping) nor a number > 0"),
])
def test_a_method_setting_out_of_range_is_a_plan_time_problem(field, value, rule):
    problems = config_problems(demo(lambda config: config["pretrain"]["methods"]["byol"].update({field: value})))
    assert len(problems) == 1 and problems[0].startswith(f"pretrain.methods.byol.{field}: {value!r} {rule}")


@pytest.mark.parametrize("settings, problem", [
    ({"optimizer": {"name": "adamw", "lrr": 0.1}}, "optimizer.lrr: unknown field for optimizer 'adamw'"),
    ({"optimizer": {"name": "adam", "lr": 0.1}}, "optimizer.name: unknown optimizer 'adam'"),
    ({"scheduler": {"name": "cosine", "warmup_fractoin": 0.1}},
     "scheduler.warmup_fractoin: unknown field for scheduler 'cosine'"),
    ({"scheduler": {"name": "step", "step_fraction": 0.5}}, "scheduler.gamma: missing"),
    ({"loss_weights": {"regresion": 1.0}}, "loss_weights.regresion: not a loss term of this method; its terms: "
                                           "regression"),
])
def test_a_nested_method_setting_is_checked_at_plan_time(settings, problem):
    problems = config_problems(demo(lambda config: config["pretrain"]["methods"]["byol"].update(settings)))
    assert len(problems) == 1 and problems[0].startswith(f"pretrain.methods.byol.{problem}")


def test_a_fine_tuning_schedule_is_checked_per_arm_at_plan_time():
    def edit(config):
        config["finetune"]["per_init"] = {"byol": {"scheduler": {"name": "step"}}}

    assert config_problems(demo(edit)) == [
        "finetune.scheduler.gamma: missing (required by the step schedule) (arms: byol on unet (finetune))"]
    typo = demo(lambda config: config["finetune"]["optimizer"].update(lrr=0.1))
    assert [problem.split(" (allowed")[0] for problem in config_problems(typo)] == [
        "finetune.optimizer.lrr: unknown field for optimizer 'adamw'"]  # every arm has it: no list of arms


def test_a_missing_manual_dataset_is_a_plan_time_problem_unless_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/sources/btcv/verified.json from an earlier run
    absent = tmp_path / "absent"

    def add_btcv(**settings):
        def edit(config):
            config["datasets"]["btcv"] = {"source": "registry", "path": str(absent), **settings}
            config["datasets"]["msd_spleen"] = {"source": "registry"}  # automatic: downloaded, never missing
            config["finetune"]["datasets"] += ["btcv", "msd_spleen"]
        return demo(edit)

    assert config_problems(add_btcv()) == [
        f"datasets.btcv: no copy at {absent}; register for btcv, download it by hand and put it (or a symlink to "
        "it) there (ssl3d datasets --show btcv), or set missing: skip"]
    assert config_problems(add_btcv(missing="skip")) == []
    absent.mkdir()
    assert config_problems(add_btcv()) == []


@pytest.mark.parametrize("where", ["preprocess.recipe", "datasets.phantom.recipe"])
def test_a_misspelt_recipe_is_a_plan_time_problem(where):
    def edit(config):
        settings = config["preprocess"] if where == "preprocess.recipe" else config["datasets"]["phantom"]
        settings["recipe"] = "demo_cx"

    problems = config_problems(demo(edit))
    assert len(problems) == 1 and problems[0].startswith(f"{where}: unknown recipe 'demo_cx'; known: ")
    assert "demo_ct" in problems[0] and "hdssl_ct" in problems[0]


def test_your_own_multi_channel_folder_is_refused_by_a_one_channel_method_when_planned(tmp_path):
    """Its first image's header says how many channels (4D, channels last), so Models Genesis refuses them before
    the data stages run rather than in its pre-training job."""
    import nibabel as nib

    (tmp_path / "imagesTr").mkdir()
    for case in ("a", "b"):
        image = nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
        nib.save(image, tmp_path / "imagesTr" / f"{case}.nii.gz")

    def edit(config):
        config["datasets"]["phantom"] = {"source": "folder", "images": str(tmp_path / "imagesTr")}
        config["pretrain"]["methods"] = {"models_genesis": config["pretrain"]["methods"]["models_genesis"]}
        config["finetune"]["inits"] = ["scratch", "models_genesis"]

    assert config_problems(demo(edit)) == ["pretrain.methods.models_genesis: models_genesis pre-trains on one-channel "
                                           "volumes only; the data has 2 channels"]

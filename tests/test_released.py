"""Released checkpoints as inits: every registry entry round-trips its key layout, is fetched from a loopback server
(or found as a manual copy) as a synthetic file with the official layout, and loads bit-exactly through the
verified transfer; a file whose keys or shapes do not fit is refused, naming them."""

import copy
import dataclasses
import re
import subprocess
import sys

import pytest
import torch
import yaml

from ssl3d.data.fetch import ManualDataMissing
from ssl3d.nets import build_network
from ssl3d.plan import finetune_runs
from ssl3d.pretrain.released import get_released, released_checkpoints
from ssl3d.pretrain.transfer import TransferError, fetch_released, load_released
from ssl3d.validate import config_problems

from conftest import REPO

ENTRIES = sorted(released_checkpoints())


def official_file(entry, seed: int = 0) -> dict:
    """What the release holds: the backbone's tensors under the suite prefixes, in the official layout, with
    values of a network of its own (so loading them is visible)."""
    torch.manual_seed(seed)
    state = build_network(entry.backbone, in_channels=1, out_channels=2).state_dict()
    suite_prefixes = tuple(entry.keys["prefixes"].values())
    return entry.to_official({key: value for key, value in state.items() if key.startswith(suite_prefixes)})


def place(entry, official: dict, root, server):
    """Serve an automatic entry's file on the loopback server, or put a manual one where the user would."""
    payload = {entry.state_key: official} if entry.state_key else official
    if entry.access == "manual":
        path = entry.folder(root) / entry.file
        path.parent.mkdir(parents=True)
        torch.save(payload, path)
        return entry
    torch.save(payload, root.parent / entry.file)
    server.files[entry.file] = (root.parent / entry.file).read_bytes()
    return dataclasses.replace(entry, urls=(server.url(entry.file),))


@pytest.mark.parametrize("name", ENTRIES)
def test_each_release_round_trips_its_keys_and_loads_bit_exactly(name, server, tmp_path):
    entry = get_released(name)
    official = official_file(entry)
    suite = entry.to_suite(official)
    assert entry.to_official(suite).keys() == official.keys()  # official -> suite -> official is the identity
    assert entry.to_suite(entry.to_official(suite)).keys() == suite.keys()

    root = tmp_path / "data"
    verified = fetch_released(place(entry, official, root, server), root)
    assert verified == root / "weights" / name / "verified"
    network = build_network(entry.backbone, in_channels=1, out_channels=4)
    report = load_released(network, verified)
    state = network.state_dict()
    loaded = [key for key in suite if not key.startswith(("out.", "out_tr."))]  # the head never transfers
    assert loaded and all(torch.equal(state[key], suite[key]) for key in loaded)
    assert all(report.fractions[part] >= need for part, need in entry.coverage.items())
    assert report.method == entry.method and report.method_version == f"released: {name}"


def test_the_swin_release_loads_its_mlps_which_the_official_loader_skips(server, tmp_path):
    entry = get_released("swinunetr_ssl_swin")
    official = official_file(entry)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in official  # the release's name; MONAI's is linear1
    root = tmp_path / "data"
    network = build_network(entry.backbone, in_channels=1, out_channels=2)
    load_released(network, fetch_released(place(entry, official, root, server), root))
    assert torch.equal(network.state_dict()["swinViT.layers1.0.blocks.0.mlp.linear1.weight"],
                       official["module.layers1.0.blocks.0.mlp.fc1.weight"])


@pytest.fixture
def vox2vec_file():
    entry = get_released("vox2vec_official")
    return entry, official_file(entry)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.update({"projector.0.weight": torch.zeros(3)}), r"no place in backbone 'fpn3d'.*projector"),
    (lambda state: state.update({"first_conv.weight": torch.zeros(16, 1, 3, 3, 1)}),
     r"shapes differ: fpn.first_conv.weight: \(16, 1, 3, 3, 1\)"),
], ids=["an extra key", "a wrong shape"])
def test_a_file_whose_keys_or_shapes_do_not_fit_is_refused_naming_them(vox2vec_file, change, message, server,
                                                                       tmp_path):
    entry, official = vox2vec_file
    change(official)
    root = tmp_path / "data"
    with pytest.raises(TransferError, match=message):
        fetch_released(place(entry, official, root, server), root)
    assert not (entry.folder(root) / "verified").exists()


def test_keys_outside_the_official_layout_and_pickled_code_are_refused(server, tmp_path):
    entry = get_released("swinunetr_ssl_swin")
    with pytest.raises(ValueError, match=r"outside the official layout.*'rotation_head.weight'"):
        entry.to_suite({"module.patch_embed.proj.weight": torch.zeros(1), "rotation_head.weight": torch.zeros(1)})
    vox2vec = get_released("vox2vec_official")
    root = tmp_path / "data"
    server.files[vox2vec.file] = b"not a checkpoint"
    with pytest.raises(TransferError, match="not a checkpoint torch can read as tensors"):
        fetch_released(dataclasses.replace(vox2vec, urls=(server.url(vox2vec.file),)), root)


def test_a_manual_release_missing_says_how_to_get_it(tmp_path):
    entry = get_released("models_genesis_chest_ct")
    with pytest.raises(ManualDataMissing, match="Genesis_Chest_CT.pt") as err:
        fetch_released(entry, tmp_path / "data")
    assert "github.com/MrGiovanni/ModelsGenesis" in str(err.value)


def test_a_file_changed_after_verification_is_not_loaded(vox2vec_file, server, tmp_path):
    entry, official = vox2vec_file
    root = tmp_path / "data"
    verified = fetch_released(place(entry, official, root, server), root)
    torch.save({key: value + 1 for key, value in official.items()}, entry.folder(root) / entry.file)
    with pytest.raises(TransferError, match="changed since it was verified"):
        load_released(build_network(entry.backbone, in_channels=1, out_channels=2), verified)


def test_a_released_init_runs_on_its_entrys_backbone_with_its_identity():
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["finetune"]["inits"] = ["scratch", "vox2vec_official"]
    runs = {name: run for name, run in finetune_runs(config).items() if run["spec"]["init"] == "vox2vec_official"}
    assert runs and all(run["released"] == "vox2vec_official" for run in runs.values())
    assert all(run["spec"]["backbone"] == get_released("vox2vec_official").backbone for run in runs.values())
    assert all(run["spec"]["released"]["name"] == "vox2vec_official" and "pretrained" not in run["spec"]
               for run in runs.values())
    assert not config_problems(config)
    config["finetune"]["inits"] = ["scratch", "vox2vec_oficial"]
    assert any("'vox2vec_oficial' is not 'scratch'" in problem and "vox2vec_official" in problem
               for problem in config_problems(config))


def test_a_manual_released_init_without_its_file_stops_the_plan_saying_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL3D_DATA", str(tmp_path / "data"))
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["finetune"]["inits"] = ["scratch", "models_genesis_chest_ct"]
    entry = get_released("models_genesis_chest_ct")
    copy_path = entry.folder(tmp_path / "data") / entry.file
    assert f"finetune.inits: models_genesis_chest_ct: no copy at {copy_path}; " in "\n".join(config_problems(config))
    copy_path.parent.mkdir(parents=True)
    copy_path.write_bytes(b"placed")  # checked for its keys by fetch_weights, not by the plan
    assert not config_problems(config)


def test_a_released_init_is_fetched_once_and_loaded_by_its_runs(vox2vec_file, server, tmp_path):
    """The workflow's side: a fetch_weights job the fine-tuning runs read, and a probe on the released weights
    reading the pyramid its method declares."""
    from ssl3d.finetune.protocols import build_downstream
    from ssl3d.pretrain.registry import get_method

    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "experiments" / "micro.yaml").read_text()))
    config["finetune"]["inits"] = ["vox2vec_official"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "-n"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert re.search(r"^fetch_weights\s+1$", dry.stdout, re.M)
    assert re.search(r"rule finetune:\n\s+input: [^\n]*data/weights/vox2vec_official/verified\b", dry.stdout)

    entry, official = vox2vec_file
    verified = fetch_released(place(entry, official, tmp_path / "data", server), tmp_path / "data")
    spec = {"backbone": entry.backbone, "protocol": "probe", "init": entry.name, "released": entry.identity()}
    downstream = build_downstream(spec, in_channels=1, out_channels=3, pretrained=verified)
    assert downstream.transfer["method"] == "vox2vec" and downstream.transfer["fractions"]["encoder"] == 1.0
    assert downstream.probe_features == get_method("vox2vec").probe_features


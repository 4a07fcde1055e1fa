"""The downstream protocols (whole network, linear probe, frozen then fine-tuned) and the augmentation presets."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import ssl3d.finetune.protocols as protocols
import ssl3d.finetune.train as train
from ssl3d.evaluate.metrics import EmptyPolicy
from ssl3d.evaluate.run import evaluate_run, load_model
from ssl3d.finetune.augment import PRESETS, ROTATING, augmentation
from ssl3d.finetune.protocols import backbone_factor, build_downstream, build_optimization
from ssl3d.finetune.train import PatchSamples, finetune
from ssl3d.io import read_json
from ssl3d.nets import build_network
from ssl3d.nets.probe import LinearProbe
from ssl3d.validate import config_problems

from conftest import DEMO, run_config


BASICUNET = {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]}
SMALL = {"backbone": BASICUNET, "patch_size": [32, 32, 32], "steps": 4, "val_every": 2, "checkpoint_every": 2,
         "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 2}}


def spec(protocol="finetune", backbone=BASICUNET, **settings):
    return {"protocol": protocol, "protocol_settings": settings, "backbone": backbone, "init": "scratch",
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}}


def backbone_state(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if model.part(name) != "head"}


def test_backbone_factor_is_zero_then_rises_exponentially_to_one():
    factors = [backbone_factor(step, frozen_steps=3, ramp_steps=4, start_fraction=0.1) for step in range(1, 10)]
    assert factors[:3] == [0.0, 0.0, 0.0]
    assert factors[3:7] == pytest.approx([0.1, 0.1 ** 0.75, 0.1 ** 0.5, 0.1 ** 0.25])
    assert factors[7:] == [1.0, 1.0]
    assert [backbone_factor(step, 2, 0) for step in (2, 3)] == [0.0, 1.0]  # no ramp: straight to the head's lr


def test_frozen_then_finetune_schedules_each_group():
    model = build_network(BASICUNET, 1, 2)
    optimizer, scheduler = build_optimization(
        model, {**spec("frozen_then_finetune", frozen_steps=2, ramp_steps=2), "scheduler": {"name": "constant"}}, 10)
    head, backbone = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for n, p in model.named_parameters() if model.part(n) == "head"}
    lrs = []
    for _ in range(5):  # the lr each training step uses
        lrs.append((head["lr"], backbone["lr"]))
        optimizer.step()
        scheduler.step()
    assert [h for h, _ in lrs] == [0.01] * 5
    assert [b for _, b in lrs] == pytest.approx([0, 0, 0.001, 0.01 * 0.1 ** 0.5, 0.01])


def test_default_schedule_is_cosine_annealing_to_zero():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimization(model, spec(), 50)
    reference_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=50)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
        reference_optimizer.step()
        reference.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("optimizer", [{"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
                                       {"name": "sgd", "lr": 0.01, "weight_decay": 0.1, "momentum": 0.9}])
def test_frozen_backbone_is_bit_identical_for_its_frozen_steps_then_trains(optimizer):
    torch.manual_seed(0)
    model = build_network(BASICUNET, 1, 2)
    run = {**spec("frozen_then_finetune", frozen_steps=3, ramp_steps=2), "optimizer": optimizer}
    optim, scheduler = build_optimization(model, run, 8)
    initial, head = backbone_state(model), model.final_conv.weight.clone()
    x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 2, (2, 32, 32, 32))
    for step in range(1, 5):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
        scheduler.step()
        same = [torch.equal(tensor, initial[name]) for name, tensor in backbone_state(model).items()]
        assert all(same) if step <= 3 else not any(same), step
        assert not torch.equal(model.final_conv.weight, head)


def test_probe_reads_the_declared_pyramid_and_trains_only_its_heads():
    network = build_network(BASICUNET, 1, 3)
    probe = build_downstream(spec("probe", features="encoder"), 1, 3).model
    assert isinstance(probe, LinearProbe) and len(probe.heads) == len(network.encoder_levels)
    assert build_downstream(spec("probe"), 1, 3).probe_features == "decoder"  # from scratch
    optimizer, _ = build_optimization(probe, spec("probe"), 4)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in
                                                                                    probe.heads.parameters()}
    assert probe(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="protocol_settings.features"):
        LinearProbe(network, 3, "bottleneck")


def test_probe_keeps_batch_statistics_even_of_a_network_that_updates_them_in_eval_mode():
    network = build_network({"name": "genesis_unet3d", "batch_stats_at_eval": True}, 1, 2)
    probe = LinearProbe(network, 2).train()
    before = {name: buffer.clone() for name, buffer in probe.backbone.named_buffers()}
    probe(torch.randn(2, 1, 32, 32, 32)).sum().backward()
    assert all(torch.equal(buffer, before[name]) for name, buffer in probe.backbone.named_buffers())
    assert not probe.backbone.training


def test_probe_features_default_to_the_pre_trained_methods(tmp_path, monkeypatch):
    network = build_network(BASICUNET, 1, 2)
    checkpoint = tmp_path / "pretrained.pt"
    torch.save({"backbone": BASICUNET, "method": "some_method", "method_version": "1", "state_dict": {
        f"net.{name}": tensor for name, tensor in network.state_dict().items()},
        "transfer": {"prefixes": {"net.": ""}, "parts": ("encoder",), "coverage": {"encoder": 1.0}}}, checkpoint)

    class EncoderOnly:
        probe_features = "encoder"

    monkeypatch.setattr(protocols, "get_method", lambda name: EncoderOnly)
    built = build_downstream({**spec("probe"), "init": "some_method"}, 1, 2, pretrained=checkpoint)
    assert built.probe_features == "encoder" and built.transfer["fractions"]["encoder"] == 1.0
    assert torch.equal(built.model.backbone.conv_0.conv_0.conv.weight, network.conv_0.conv_0.conv.weight)
    assert build_downstream({**spec("probe", features="decoder"), "init": "x"}, 1, 2,
                            pretrained=checkpoint).probe_features == "decoder"  # the run's setting wins


def test_protocol_errors_name_the_setting():
    with pytest.raises(ValueError, match="protocol: unknown protocol 'linear'"):
        build_downstream(spec("linear"), 1, 2)
    with pytest.raises(ValueError, match="needs ramp_steps"):
        build_optimization(torch.nn.Linear(1, 1), spec("frozen_then_finetune", frozen_steps=2), 4)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['features'\]"):
        build_downstream(spec("frozen_then_finetune", frozen_steps=1, ramp_steps=1, features="encoder"), 1, 2)


def test_probing_changes_only_the_heads_and_evaluation_rebuilds_the_probe(tiny_index, tiny_splits, tmp_path,
                                                                        monkeypatch):
    built = {}

    def recording(*args, **kwargs):
        built["downstream"] = protocols.build_downstream(*args, **kwargs)
        built["initial"] = copy.deepcopy(built["downstream"].model.state_dict())
        return built["downstream"]

    monkeypatch.setattr(train, "build_downstream", recording)
    backbone = {**BASICUNET, "norm": "batch", "dropout": 0.2}  # batch statistics and dropout that must not act
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, protocol="probe",
                        protocol_settings={}, **{**SMALL, "backbone": backbone})
    out = tmp_path / "run"
    saved = torch.load(finetune(config, out), weights_only=False)
    assert saved["probe_features"] == "decoder" and read_json(out / "manifest.json")["probe_features"] == "decoder"
    initial = built["initial"]
    for name, tensor in saved["weights"].items():
        if name.startswith("backbone."):
            assert torch.equal(tensor, initial[name]), name
        else:
            assert name.startswith("heads.") and not torch.equal(tensor, initial[name]), name
    assert any(".bn." in name or "running_mean" in name for name in initial)  # buffers were checked too

    model, _ = load_model(out / "model.pt", torch.device("cpu"))
    assert isinstance(model, LinearProbe) and model.features == "decoder"
    table = pd.read_csv(evaluate_run(config, out / "model.pt", out / "per_case.csv", 2.0, EmptyPolicy()))
    assert set(table["protocol"]) == {"probe"} and len(table)


def test_frozen_then_finetune_runs_end_to_end(tiny_index, tiny_splits, tmp_path):
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, protocol="frozen_then_finetune",
                        protocol_settings={"frozen_steps": 2, "ramp_steps": 1}, grad_clip=1.0,
                        scheduler={"name": "cosine", "warmup_steps": 1}, **SMALL)
    finetune(config, tmp_path / "run")
    assert list(pd.read_csv(tmp_path / "run" / "train_log.csv")["step"]) == [1, 2, 3, 4]
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["protocol"] == "frozen_then_finetune" and manifest["probe_features"] is None


def patches(preset: str, seed: int = 0):
    """Image = label (as float), so a flip that moves one but not the other shows."""
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    label[0, 2:9, 3:20, 5:12] = 1
    label[0, 20:30, 1:5, 25:31] = 2
    case = {"image": label.astype(np.float32), "label": label}
    return PatchSamples([case], [32, 32, 32], [1, 1], seed, 16, augment=preset), label


FLIPS = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
# flips, then k quarter turns in the first two axes; a move that is a flip alone is found as one (k = 0)
MOVES = [(axes, k) for k in range(4) for axes in FLIPS]
INTENSITY = ("pgl", "hybridmim")  # presets that change intensities too


def moved(array: np.ndarray, move: tuple) -> np.ndarray:
    axes, k = move
    return np.rot90(np.flip(array, axes) if axes else array, k, axes=(1, 2))


def moves_of(label: np.ndarray, augmented: np.ndarray):
    for move in MOVES:
        if np.array_equal(moved(label, move), augmented):
            return move
    raise AssertionError("the label is not a flip or rotation of the original")


@pytest.mark.parametrize("preset", PRESETS)
def test_augmentation_presets_keep_image_and_label_aligned_and_are_reproducible(preset):
    samples, label = patches(preset)
    seen = set()
    for i in range(len(samples)):
        image, target = samples[i]
        assert type(image) is torch.Tensor and image.shape == (1, 32, 32, 32) and target.dtype == torch.long
        move = moves_of(label, target.numpy())
        seen.add(move)
        if preset in INTENSITY:  # intensities change; the image matches the label's move best
            correlations = [np.corrcoef(image.numpy().ravel(), moved(label, other).ravel())[0, 1] for other in MOVES]
            assert np.array_equal(moved(label, MOVES[int(np.argmax(correlations))]), moved(label, move))
        else:
            assert np.array_equal(image.numpy(), moved(label, move))
        again = patches(preset)[0][i]
        assert torch.equal(image, again[0]) and torch.equal(target, again[1])  # the same sample for a seed
    assert (len(seen) > 2) == (preset != "none")  # each sample draws its own flips
    assert any(k for _, k in seen) == (preset in ROTATING)
    if preset in INTENSITY:
        images = [samples[i][0] for i in range(len(samples))]
        changed = sum(not torch.equal(image, image.round()) for image in images)
        assert changed > {"pgl": 4, "hybridmim": 0}[preset]  # intensities were changed


def test_a_rotating_preset_needs_a_patch_square_in_its_first_two_axes():
    config = copy.deepcopy(DEMO)
    config["finetune"].update(augmentation="hybridmim", patch_size=[32, 32, 16])
    assert config_problems(config) == []
    config["finetune"]["patch_size"] = [32, 16, 32]
    assert config_problems(config) == ["finetune.augmentation: hybridmim rotates in the first two axes, which "
                                       "patch_size [32, 16, 32] does not have equal; make them equal"]


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="augmentation: unknown preset 'rotate'"):
        augmentation("rotate")


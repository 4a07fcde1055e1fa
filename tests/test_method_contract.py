"""The contract every registered method meets, run automatically on each method and each backbone it can run on
(methods and backbones added later included): see CONTRIBUTING.md."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from ssl3d.nets import BACKBONES, build_network
from ssl3d.pretrain.method import Method, Transfer, make_config
from ssl3d.pretrain.optim import build_optimizer
from ssl3d.pretrain.registry import get_method, methods
from ssl3d.pretrain.transfer import TransferError, plan_transfer
from ssl3d.report.figures import METHOD_FIGURES

CASES = [(name, backbone) for name, cls in methods().items() for backbone in cls.supported_backbones()]
# what is the method's alone (its random draws, its state) is checked on its cheapest backbone; what meets the
# backbone (the steps, the weight transfer) on each of them
CHEAPEST = [(name, min(cls.supported_backbones(), key=lambda b: (math.prod(BACKBONES[b].smallest["input"]), b)))
            for name, cls in methods().items()]


def small_backbone(backbone: str) -> dict:
    """The backbone's smallest instance (``Backbone.smallest``), so two CPU steps take a second."""
    return {"name": backbone, **BACKBONES[backbone].smallest["fields"]}


def small_method(name: str, backbone: str, seed: int = 0, in_channels: int = 1) -> Method:
    cls = get_method(name)
    torch.manual_seed(seed)
    patch = list(BACKBONES[backbone].smallest["input"])
    return cls(make_config(cls.Config, {"patch_size": patch, "batch_size": 2}), small_backbone(backbone), in_channels)


def batch_of_views(method: Method, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    samples = [method.make_views(method.prepare_volume(
        rng.random((method.in_channels, *method.region_size()), dtype=np.float32)), rng)
               for _ in range(method.config.batch_size)]
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def test_the_known_methods_are_registered():
    assert {"models_genesis", "byol", "hybridmim"} <= set(methods())


@pytest.mark.parametrize("name", sorted(methods()))
def test_declarations(name):
    cls = get_method(name)
    assert cls.paper and cls.version and cls.supported_backbones()
    assert cls.probe_features in ("encoder", "decoder") and cls.description()
    assert set(cls.figures) <= set(METHOD_FIGURES), "a declared figure must be in ssl3d.report.figures"
    config = cls.Config()
    assert config.loss_weights and all(w >= 0 for w in config.loss_weights.values())
    assert isinstance(cls.transfer, Transfer) and cls.transfer.prefixes


def two_cpu_steps(method: Method) -> None:
    optimizer = build_optimizer(method, {"name": "sgd", "lr": 0.01})
    for step in (1, 2):
        method.train()
        terms = method.loss_terms(batch_of_views(method, seed=step))
        weights = method.config.loss_weights
        # every weighted term is computed; a term may be skipped when its weight is 0 (an ablation)
        assert {name for name, weight in weights.items() if weight} <= set(terms) <= set(weights)
        assert all(torch.isfinite(t) and t.ndim == 0 for t in terms.values())
        loss = method.total_loss(terms)
        optimizer.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
        optimizer.step()
        method.after_step(step, 2)


@pytest.mark.parametrize("name, backbone", CASES)
def test_two_cpu_steps_give_finite_terms_named_as_the_configured_weights(name, backbone):
    two_cpu_steps(small_method(name, backbone))


@pytest.mark.parametrize("name", sorted(methods()))
def test_loss_terms_are_float32_under_bf16_autocast(name):
    """The engine's bf16 autocast (on a GPU by default, ``precision: bfloat16`` on a CPU) runs the networks in bf16;
    a term computed in bf16 keeps two or three significant digits, so every term is float32 (and finite). On the
    method's first backbone: the loss's precision is the method's."""
    method = small_method(name, get_method(name).supported_backbones()[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.loss_terms(batch_of_views(method))
    assert {name: t.dtype for name, t in terms.items()} == dict.fromkeys(terms, torch.float32)
    assert all(torch.isfinite(t) for t in terms.values())


@pytest.mark.parametrize("name, backbone", CHEAPEST)
def test_loss_terms_trace_through_torch_compile_to_the_same_terms(name, backbone):
    """The ``compile`` setting runs the loss terms through torch.compile (``ssl3d.engine``): Dynamo traces every
    method (graph breaks allowed) to the terms of the uncompiled call. Dynamo's ``eager`` backend: the tracing,
    without Inductor's minutes of code generation, and the same numbers."""
    method = small_method(name, backbone)
    method.train()
    batch = batch_of_views(method)
    terms = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        torch.manual_seed(1)
        loss_terms = torch.compile(method.loss_terms, backend="eager") if compiled else method.loss_terms
        terms[compiled] = {key: value.item() for key, value in loss_terms(batch).items()}
    torch._dynamo.reset()
    assert terms[True] == pytest.approx(terms[False], rel=1e-5)


@pytest.mark.parametrize("name", sorted(methods()))
def test_multichannel_volumes_are_taken_or_refused_when_the_method_is_built(name):
    cls = get_method(name)
    backbone = cls.supported_backbones()[-1]
    if not cls.multichannel:
        with pytest.raises(ValueError, match="one-channel"):
            small_method(name, backbone, in_channels=2)
        return
    two_cpu_steps(small_method(name, backbone, in_channels=2))


def test_a_method_is_refused_a_backbone_without_the_capability_it_requires():
    with pytest.raises(ValueError, match=r"needs a backbone with region_decoding or hidden_states; 'basicunet' has not "
                                         r"\(it runs on unet, swinunetr, hybridmim_unet\)"):
        small_method("hybridmim", "basicunet")


@pytest.mark.parametrize("name, backbone", CASES)
def test_weights_transfer_with_the_declared_coverage(name, backbone):
    method = small_method(name, backbone)
    downstream = build_network(small_backbone(backbone), in_channels=1, out_channels=5)
    load, report = plan_transfer(method.state_dict(), downstream, backbone, method.transfer)
    for part, need in method.transfer.coverage.items():
        assert report.fractions[part] >= need
    before = copy.deepcopy(downstream.state_dict())
    downstream.load_state_dict(load, strict=False)
    state = method.state_dict()
    source = {target + key.removeprefix(prefix): key for prefix, target in method.transfer.prefixes.items()
              for key in state if key.startswith(prefix)}
    for key in load:
        assert torch.equal(downstream.state_dict()[key], state[source[key]])
    assert any(not torch.equal(before[key], downstream.state_dict()[key]) for key in load)


@pytest.mark.parametrize("name, backbone", CHEAPEST)
def test_same_seed_same_first_loss(name, backbone):
    def first_loss():
        method = small_method(name, backbone, seed=3)  # seeds torch, so dropout draws the same masks too
        return method.total_loss(method.loss_terms(batch_of_views(method)))

    first = first_loss()
    assert torch.isfinite(first) and torch.equal(first, first_loss())


@pytest.mark.parametrize("name, backbone", CHEAPEST)
def test_checkpoint_round_trip(name, backbone, tmp_path):
    method = small_method(name, backbone, seed=1)
    torch.save(method.state_dict(), tmp_path / "method.pt")
    other = small_method(name, backbone, seed=2)
    other.load_state_dict(torch.load(tmp_path / "method.pt"))
    batch = batch_of_views(method)
    losses = []
    for model in (method, other):
        torch.manual_seed(0)  # same dropout masks for both
        losses.append(model.total_loss(model.loss_terms(batch)))
    assert torch.equal(*losses)


def test_a_wrong_transfer_declaration_fails_before_training():
    method = small_method("models_genesis", "basicunet")
    downstream = build_network(small_backbone("basicunet"), 1, 5)
    with pytest.raises(TransferError, match="no pre-trained tensor starts with"):
        plan_transfer(method.state_dict(), downstream, "basicunet", Transfer(prefixes={"encoder.": ""}))
    partial = Transfer(prefixes={"network.down_": "down_"})
    with pytest.raises(TransferError, match=r"encoder 96.9% < 100%, decoder 0.0% < 100%.*conv_0"):
        plan_transfer(method.state_dict(), downstream, "basicunet", partial)


def test_config_defaults_are_the_papers_and_unknown_overrides_are_named():
    assert dataclasses.asdict(get_method("models_genesis").Config())["optimizer"] == {
        "name": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}
    assert get_method("byol").Config().optimizer["name"] == "lars"
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lr'\]"):
        make_config(get_method("byol").Config, {"lr": 0.1})
    with pytest.raises(ValueError, match="BYOLConfig.precision: 'fp16' is not one of auto, float32, bfloat16"):
        make_config(get_method("byol").Config, {"precision": "fp16"})
    with pytest.raises(ValueError, match="BYOLConfig.channels_last: 'yes' is not true or false"):
        make_config(get_method("byol").Config, {"channels_last": "yes"})


def test_methods_from_installed_packages_are_discovered(monkeypatch, tmp_path):
    """An out-of-tree method, exposed through the `ssl3d.methods` entry-point group, joins the registry."""
    from importlib import metadata

    from ssl3d.pretrain import registry

    (tmp_path / "my_ssl_package.py").write_text(
        "from ssl3d.pretrain.method import Method, Transfer\n"
        "class Noise(Method):\n"
        "    name = 'noise_restoration'\n"
        "    paper = 'an out-of-tree example'\n"
        "    transfer = Transfer(prefixes={'network.': ''})\n"
        "    def make_views(self, region, rng):\n"
        "        return {'x': region}\n"
        "    def loss_terms(self, batch):\n"
        "        return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = metadata.EntryPoint(name="noise_restoration", value="my_ssl_package:Noise", group="ssl3d.methods")
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [entry] if group == "ssl3d.methods" else [])
    registry.methods.cache_clear()
    try:
        assert registry.get_method("noise_restoration").paper == "an out-of-tree example"
        assert {"models_genesis", "byol"} <= set(registry.methods())
    finally:
        registry.methods.cache_clear()


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'simclr'; registered: .*byol.*models_genesis"):
        get_method("simclr")

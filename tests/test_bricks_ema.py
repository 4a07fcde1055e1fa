"""BYOL's target-decay schedule and the EMA target network."""

from __future__ import annotations

import pytest
import torch

from ssl3d.pretrain.bricks.ema import EMATarget, byol_tau
from ssl3d.pretrain.optim import build_optimizer


def test_byol_tau_fixture_f11():
    assert byol_tau(0, 100) == pytest.approx(0.996, abs=1e-9)
    assert byol_tau(50, 100) == pytest.approx(0.998, abs=1e-9)
    assert byol_tau(100, 100) == pytest.approx(1.0, abs=1e-9)
    assert byol_tau(150, 100) == pytest.approx(1.0, abs=1e-9)  # min(k, K)
    assert byol_tau(0, 10, base=0.99) == pytest.approx(0.99, abs=1e-12)


def _linear(weight: float, bias: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer


def test_update_by_hand_and_frozen_target():
    online = _linear(1.0, -1.0)
    target = EMATarget(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[3.0, 5.0]]))
        online.bias.fill_(2.0)
    target.update(online, tau=0.75)
    torch.testing.assert_close(target.module.weight, torch.tensor([[1.5, 2.0]]))  # .75*1 + .25*3, .75*1 + .25*5
    torch.testing.assert_close(target.module.bias, torch.tensor([-0.25]))  # .75*-1 + .25*2
    assert all(not p.requires_grad for p in target.parameters())
    assert online.weight.requires_grad


def test_tau_one_keeps_and_tau_zero_copies():
    online = _linear(1.0, 0.5)
    target = EMATarget(online)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        online.weight.normal_()
        online.bias.normal_()
    target.update(online, tau=1.0)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    target.update(online, tau=0.0)
    torch.testing.assert_close(target.module.weight, online.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.module.bias, online.bias, rtol=0, atol=0)


def test_buffers_copied_mode_follows_holder_and_optimizer_skips_target():
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    holder = torch.nn.ModuleDict({"online": online, "target": EMATarget(online)})
    online(torch.randn(8, 3))  # moves the online running statistics
    holder["target"].update(online, tau=0.5)
    for name, buffer in online.named_buffers():
        torch.testing.assert_close(holder["target"].module.get_buffer(name), buffer, rtol=0, atol=0)
    holder.eval()
    assert not holder["target"].training and not holder["target"].module[1].training
    optimizer = build_optimizer(holder, {"name": "lars", "lr": 0.1})
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(online.parameters()))


def test_state_dict_round_trip():
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    target = EMATarget(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    target.update(online, tau=0.9)
    restored = EMATarget(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    restored.load_state_dict(target.state_dict())
    for key, value in target.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)
    assert all(not p.requires_grad for p in restored.parameters())
    x = torch.randn(5, 3)
    torch.testing.assert_close(restored.eval()(x), target.eval()(x))

"""LARS, the optimizer factory and the learning-rate schedules of the pre-training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl3d.pretrain.optim import LARS, build_optimizer, build_scheduler, warmup_cosine

LR, WD, MOMENTUM, ETA = 0.1, 0.01, 0.9, 0.001


def _linear(weight, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def _step(optimizer, layer, weight_grad, bias_grad) -> None:
    layer.weight.grad = torch.tensor(weight_grad)
    layer.bias.grad = torch.tensor(bias_grad)
    optimizer.step()


def test_lars_two_steps_by_hand():
    w, b = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([0.2, -0.4])
    gw1, gw2 = np.array([[0.3, 0.1], [-0.2, 0.4]]), np.array([[-0.1, 0.2], [0.05, 0.3]])
    gb1, gb2 = np.array([0.5, -0.5]), np.array([0.1, 0.2])
    layer = _linear(w.tolist(), b.tolist())
    optimizer = build_optimizer(layer, {"name": "lars", "lr": LR, "weight_decay": WD, "momentum": MOMENTUM,
                                        "trust_coefficient": ETA})
    _step(optimizer, layer, gw1.tolist(), gb1.tolist())
    _step(optimizer, layer, gw2.tolist(), gb2.tolist())

    d1 = gw1 + WD * w
    buf1 = ETA * np.linalg.norm(w) / np.linalg.norm(d1) * d1
    w1 = w - LR * buf1
    d2 = gw2 + WD * w1
    buf2 = MOMENTUM * buf1 + ETA * np.linalg.norm(w1) / np.linalg.norm(d2) * d2
    w2 = w1 - LR * buf2
    # the bias (ndim 1) is excluded: plain momentum SGD, no weight decay
    b2 = b - LR * gb1 - LR * (MOMENTUM * gb1 + gb2)
    np.testing.assert_allclose(layer.weight.detach().numpy(), w2, atol=1e-6, rtol=0)
    np.testing.assert_allclose(layer.bias.detach().numpy(), b2, atol=1e-6, rtol=0)


def test_lars_zero_norms_give_ratio_one():
    layer = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    optimizer = LARS(layer.parameters(), lr=LR, weight_decay=WD, trust_coefficient=ETA)
    _step(optimizer, layer, [[1.0, 2.0], [3.0, 4.0]], [1.0, 1.0])  # ||w|| = 0: plain step
    np.testing.assert_allclose(layer.weight.detach().numpy(), -LR * np.array([[1.0, 2.0], [3.0, 4.0]]), atol=1e-7)

    layer = _linear([[1.0, 2.0], [3.0, 4.0]], [1.0, 1.0])
    optimizer = LARS(layer.parameters(), lr=LR, weight_decay=0.0, trust_coefficient=ETA)
    _step(optimizer, layer, [[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])  # ||update|| = 0: nothing moves, no NaN
    np.testing.assert_array_equal(layer.weight.detach().numpy(), [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("source", ["module", "parameters", "named"])
def test_lars_groups_split_by_ndim(source):
    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    given = {"module": layer, "parameters": layer.parameters(), "named": layer.named_parameters()}[source]
    optimizer = build_optimizer(given, {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6})
    adapted, excluded = optimizer.param_groups
    assert [p.shape for p in adapted["params"]] == [(4, 3)]
    assert adapted["weight_decay"] == 1.5e-6 and not adapted["lars_exclude"]
    assert len(excluded["params"]) == 3 and excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    assert adapted["momentum"] == 0.9 and adapted["trust_coefficient"] == 0.001


def test_build_optimizer_kinds_and_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    adamw = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]})
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    assert len(adamw.param_groups[0]["params"]) == 2  # the frozen layer is left out
    sgd = build_optimizer(model, {"name": "sgd", "lr": 1.0, "nesterov": True})
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize(("settings", "field"), [
    ({"name": "adam", "lr": 1.0}, "optimizer.name"),
    ({"lr": 1.0}, "optimizer.name"),
    ({"name": "lars", "lr": 1.0, "nesterov": True}, "optimizer.nesterov"),
    ({"name": "adamw", "lr": 1.0, "momentum": 0.9}, "optimizer.momentum"),
    ({"name": "sgd", "weight_decay": 0.0}, "optimizer.lr"),
])
def test_build_optimizer_errors_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as error:
        build_optimizer(torch.nn.Linear(2, 2), settings)
    assert "allowed" in str(error.value) or "missing" in str(error.value)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_warmup_cosine_by_hand():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.4)
    lrs = _lrs(warmup_cosine(optimizer, total_steps=110, warmup_steps=10, final_lr_fraction=0.25), optimizer, 130)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.2, abs=1e-12)  # half-way through the warm-up
    assert lrs[10] == pytest.approx(0.4, abs=1e-12)  # end of the warm-up
    assert lrs[60] == pytest.approx(0.4 * (0.25 + 0.75 * 0.5), abs=1e-12)  # half-way through the cosine
    assert lrs[35] == pytest.approx(0.4 * (0.25 + 0.75 * (1 + math.cos(math.pi / 4)) / 2), abs=1e-12)
    assert lrs[110] == pytest.approx(0.1, abs=1e-12) and lrs[130] == pytest.approx(0.1, abs=1e-12)


def test_build_scheduler_kinds_and_errors():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    step = build_scheduler(optimizer, {"name": "step", "step_size": 4, "gamma": 0.5}, total_steps=20)
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)
    assert _lrs(step, optimizer, 8)[3:] == [1.0, 0.5, 0.5, 0.5, 0.5, 0.25]
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    assert _lrs(build_scheduler(optimizer, {"name": "constant"}, 5), optimizer, 5) == [0.3] * 6
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    assert _lrs(build_scheduler(optimizer, {"name": "cosine"}, 4), optimizer, 4)[::2] == pytest.approx([0.3, 0.15, 0])
    for settings, field in [({"name": "poly"}, "scheduler.name"),
                            ({"name": "step", "gamma": 0.5}, "scheduler.step_size"),
                            ({"name": "cosine", "gamma": 0.5}, "scheduler.gamma")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            build_scheduler(optimizer, settings, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(optimizer, total_steps=10, warmup_steps=11)


def _training(state=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = build_optimizer(model, {"name": "lars", "lr": 0.2, "weight_decay": 1e-2})
    scheduler = build_scheduler(optimizer, {"name": "cosine", "warmup_steps": 2, "final_lr_fraction": 0.1}, 8)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: range) -> None:
    for step in steps:
        x = torch.randn(6, 3, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_optimizer_and_scheduler_resume_from_state_dict():
    straight = _training()
    _train(*straight, range(6))
    first = _training()
    _train(*first, range(3))
    state = {"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "scheduler": first[2].state_dict()}
    resumed = _training(state)
    _train(*resumed, range(3, 6))
    assert resumed[1].param_groups[0]["lr"] == straight[1].param_groups[0]["lr"]
    assert resumed[1].param_groups[1]["lars_exclude"]
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedules_given_as_fractions_of_the_run_scale_with_its_length():
    from ssl3d.pretrain.optim import build_scheduler

    for total in (100, 400):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        scheduler = build_scheduler(optimizer, {"name": "cosine", "warmup_fraction": 0.1}, total)
        for _ in range(total // 20):  # half-way through the warm-up of 10% of the run
            optimizer.step()
            scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    assert build_scheduler(optimizer, {"name": "step", "step_fraction": 0.25, "gamma": 0.5}, 200).step_size == 50

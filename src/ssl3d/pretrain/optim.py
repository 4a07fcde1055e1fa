"""Optimizers and learning-rate schedules of the pre-training loop, built from a method's config dicts.

Why these: BYOL (and PGL, which follows it) trains with LARS and a linear warm-up followed by a cosine decay
(DeepMind's ``byol/utils/schedules.py::learning_schedule`` and ``optimizers.py``); Models Genesis uses SGD with
a step decay; the other methods use AdamW. ``build_optimizer`` and ``build_scheduler`` turn the ``optimizer`` and
``scheduler`` dicts of a method config into torch objects, and name the offending field when a dict is wrong.

LARS is written here because no maintained package fits this environment: lightly and timm pull in torchvision,
which breaks beside this torch build, and torchlars is an unmaintained CUDA extension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

_OPTIMIZER_FIELDS = {
    "adamw": {"name", "lr", "weight_decay", "betas"},
    "sgd": {"name", "lr", "weight_decay", "momentum", "nesterov"},
    "lars": {"name", "lr", "weight_decay", "momentum", "trust_coefficient"},
}
_SCHEDULER_FIELDS = {
    "cosine": {"name", "warmup_steps", "warmup_fraction", "final_lr_fraction"},
    "step": {"name", "step_size", "step_fraction", "gamma"},
    "constant": {"name"},
}


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as BYOL uses it: momentum SGD on a layer-wise trust-ratio-scaled update.

    Per parameter ``w`` with gradient ``g``: ``d = g + weight_decay * w``; unless the group has ``lars_exclude``,
    ``d *= trust_coefficient * ||w|| / ||d||`` (the ratio is 1 when either norm is 0); then
    ``buf = momentum * buf + d`` (``buf = d`` on the first step) and ``w -= lr * buf``. BYOL and SimCLR exclude
    biases and normalisation parameters from weight decay and from the adaptation: ``build_optimizer`` puts
    them in a group with ``weight_decay=0, lars_exclude=True``.

    A small hand-written implementation (see the module docstring for why no package is used).
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, lars_exclude: bool = False):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum} or "
                             f"trust_coefficient={trust_coefficient}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient, "lars_exclude": lars_exclude})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        update = param.grad.add(param, alpha=group["weight_decay"])
        if not group["lars_exclude"]:
            param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
            ratio = torch.where((param_norm > 0) & (update_norm > 0),
                                group["trust_coefficient"] * param_norm / update_norm, 1.0)
            update.mul_(ratio)
        state = self.state[param]
        if "momentum_buffer" in state:
            update = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
        else:
            state["momentum_buffer"] = update
        param.sub_(update, alpha=group["lr"])


def _check_fields(kind: str, settings: dict, allowed: dict[str, set[str]]) -> str:
    name = settings.get("name")
    if name not in allowed:
        raise ValueError(f"{kind}.name: unknown {kind} {name!r} (allowed: {', '.join(allowed)})")
    for field in settings:
        if field not in allowed[name]:
            raise ValueError(f"{kind}.{field}: unknown field for {kind} {name!r} "
                             f"(allowed: {', '.join(sorted(allowed[name]))})")
    return name


def _trainable(parameters_or_model) -> list[torch.Tensor]:
    """The parameters that require a gradient, from a module, parameters, or (name, parameter) pairs."""
    if isinstance(parameters_or_model, torch.nn.Module):
        items: Iterable = parameters_or_model.parameters()
    else:
        items = (item[1] if isinstance(item, tuple) else item for item in parameters_or_model)
    return [param for param in items if param.requires_grad]


def build_optimizer(parameters_or_model, settings: dict) -> torch.optim.Optimizer:
    """The optimizer ``settings["name"]`` (adamw, sgd, lars) over the trainable parameters.

    ``parameters_or_model`` is an ``nn.Module``, an iterable of parameters, or of (name, parameter) pairs;
    parameters that do not require a gradient (a frozen EMA target) are left out. Fields: ``lr`` (required),
    ``weight_decay`` (default 0), ``momentum`` (sgd, lars: 0.9), ``nesterov`` (sgd: False),
    ``trust_coefficient`` (lars: 0.001, BYOL's eta), ``betas`` (adamw: torch's default).
    """
    name = _check_fields("optimizer", settings, _OPTIMIZER_FIELDS)
    if "lr" not in settings:
        raise ValueError("optimizer.lr: missing (the base learning rate)")
    params = _trainable(parameters_or_model)
    lr, weight_decay = settings["lr"], settings.get("weight_decay", 0.0)
    if name == "adamw":
        betas = tuple(settings.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=settings.get("momentum", 0.9),
                               nesterov=settings.get("nesterov", False))
    adapted = [param for param in params if param.ndim > 1]
    excluded = [param for param in params if param.ndim <= 1]
    groups = [{"params": adapted}] if adapted else []
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=settings.get("momentum", 0.9),
                trust_coefficient=settings.get("trust_coefficient", 0.001))


def cosine_factor(total_steps: int, warmup_steps: int, final_lr_fraction: float = 0.0) -> Callable[[int], float]:
    """BYOL's learning schedule as a factor on the base lr: it rises linearly from 0 (step 0) to 1 at
    ``warmup_steps``, then follows a half cosine down to ``final_lr_fraction`` at ``total_steps`` and stays there."""
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(f"warmup_cosine: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) "
                         "and total_steps > 0")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_fraction + (1 - final_lr_fraction) * (1 + math.cos(math.pi * progress)) / 2

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  final_lr_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """BYOL's learning schedule (:func:`cosine_factor`) on every parameter group of ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(total_steps, warmup_steps, final_lr_fraction))


def _steps(settings: dict, field: str, total_steps: int, default: int | None = None) -> int:
    """``<field>_steps`` / ``step_size`` as given, or ``<field>_fraction`` of the run's total steps (a paper's
    schedule in epochs becomes a fraction, so it scales with the tier's number of steps)."""
    absolute = "step_size" if field == "step" else f"{field}_steps"
    if absolute in settings:
        return int(settings[absolute])
    if f"{field}_fraction" in settings:
        return max(1, round(settings[f"{field}_fraction"] * total_steps))
    if default is None:
        raise ValueError(f"scheduler.{absolute}: missing (or give scheduler.{field}_fraction)")
    return default


def lr_factor(settings: dict, total_steps: int) -> Callable[[int], float]:
    """The schedule ``settings`` (as :func:`build_scheduler` reads it) as a function of the step: the factor on the
    base lr after that many scheduler steps. Fine-tuning's ``frozen_then_finetune`` multiplies it by the backbone's
    own factor in one ``LambdaLR`` (``ssl3d.finetune.protocols``)."""
    name = _check_fields("scheduler", settings, _SCHEDULER_FIELDS)
    if name == "cosine":
        return cosine_factor(total_steps, _steps(settings, "warmup", total_steps, default=0),
                             settings.get("final_lr_fraction", 0.0))
    if name == "step":
        if "gamma" not in settings:
            raise ValueError("scheduler.gamma: missing (required by the step schedule)")
        step_size, gamma = _steps(settings, "step", total_steps), settings["gamma"]
        return lambda step: gamma ** (step // step_size)
    return lambda step: 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict, total_steps: int):
    """The per-step lr schedule ``settings["name"]``: ``cosine`` (:func:`warmup_cosine`; ``warmup_steps`` or
    ``warmup_fraction``, default 0; ``final_lr_fraction`` default 0), ``step`` (torch's ``StepLR``: lr times
    ``gamma`` every ``step_size`` steps or ``step_fraction`` of the run; Models Genesis uses gamma 0.5) or
    ``constant``."""
    factor = lr_factor(settings, total_steps)  # checks the fields
    if settings["name"] == "step":  # torch's own, as pre-training has always used (same values up to rounding)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=_steps(settings, "step", total_steps),
                                               gamma=settings["gamma"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimization_problems(optimizer: dict, scheduler: dict, total_steps: int) -> list[str]:
    """What :func:`build_optimizer` and :func:`build_scheduler` would refuse in these settings (``optimizer.lrr:
    unknown field ...``), found by building them over one placeholder parameter: the workflow's check at plan time,
    with the very code a training job runs."""
    problems = []
    for build in (lambda: build_optimizer([torch.nn.Parameter(torch.zeros(1))], optimizer),
                  lambda: lr_factor(scheduler, total_steps)):
        try:
            build()
        except (ValueError, TypeError, AttributeError) as err:
            problems.append(str(err))
    return problems

"""The exponential-moving-average target network of BYOL-style methods (BYOL, PGL), shared so that every method with
a momentum target updates it, schedules it and checkpoints it the same way.

The target is never trained by gradients: after each optimizer step its weights move towards the online
network's, ``target = tau * target + (1 - tau) * online``, with ``tau`` rising from ``base`` to 1 along a cosine
(DeepMind's ``byol/utils/schedules.py::target_ema``), so that the target freezes at the end of training.
"""

from __future__ import annotations

import copy
import math

import torch


def byol_tau(step: int, total_steps: int, base: float = 0.996) -> float:
    """``tau_k = 1 - (1 - base) * (cos(pi * min(k, K) / K) + 1) / 2``: ``base`` at step 0, 1 at ``total_steps``."""
    progress = min(step, total_steps) / total_steps
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


class EMATarget(torch.nn.Module):
    """A frozen deep copy of an online module, updated only by :meth:`update`.

    Its parameters never require a gradient, so an optimizer built by ``ssl3d.pretrain.optim.build_optimizer``
    over a method that holds it leaves them out, while the method's ``state_dict`` (checkpoints) and ``.to()``
    include it. Being a submodule, it follows the holder's train/eval mode, like the online network: in train
    mode its batch-norm layers normalise with the target's own batch statistics, as in BYOL, where the target
    network is applied in training mode. Its buffers (batch-norm running statistics) are copied from the online
    module at every update, so in eval mode it normalises as the online network does.
    """

    def __init__(self, online: torch.nn.Module):
        super().__init__()
        self.module = copy.deepcopy(online).requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: torch.nn.Module, tau: float) -> None:
        """``target = tau * target + (1 - tau) * online`` for parameters; buffers are copied."""
        for target, source in zip(self.module.parameters(), online.parameters(), strict=True):
            target.mul_(tau).add_(source, alpha=1 - tau)
        for target, source in zip(self.module.buffers(), online.buffers(), strict=True):
            target.copy_(source)

"""Training samples that depend only on (seed, sample index).

Sample i draws everything it needs (which case, where to crop, every augmentation) from
``numpy.random.default_rng([seed, i])`` and seeds the MONAI transforms it uses from that generator, never from a
stream shared across samples. So the batch of step k does not depend on the steps before it: a run resumed from a
checkpoint at step k replays exactly what an uninterrupted run would, and the result is the same with any number
of data-loader workers.
"""

from __future__ import annotations

import abc

import numpy as np
from torch.utils.data import Dataset


class SeededSamples(Dataset, abc.ABC):
    """Base class: subclasses implement ``sample(item, rng)``; ``transforms`` are reseeded per sample."""

    def __init__(self, items: list, seed: int, length: int, transforms=()):
        self.items, self.seed, self.length, self.transforms = items, seed, length, transforms

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        item = self.items[rng.integers(len(self.items))]
        for transform in self.transforms:
            transform.set_random_state(seed=int(rng.integers(2**31)))
        return self.sample(item, rng)

    @abc.abstractmethod
    def sample(self, item, rng: np.random.Generator):
        """One training sample from ``item``, drawing every random number from ``rng``."""

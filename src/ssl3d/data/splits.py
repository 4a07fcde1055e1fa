"""Split files: train / validation / test case lists and nested label-fraction subsets.

Label-efficiency curves are only comparable when a smaller fraction is a subset of a larger one (10% ⊂ 25% ⊂ 50%
⊂ 100%) and when several draws show the spread from *which* cases were labelled. Each draw is one seeded
permutation of the training cases; fraction f takes its first ceil(f·n) cases, which makes the nesting hold by
construction. The file records the seed and the rule so anyone can regenerate and compare it.
"""

from __future__ import annotations

import math

import numpy as np

from ssl3d.plan import fraction_key

RULE = ("cases sorted by id; permutation = numpy.random.default_rng([seed, 0]); test = first n_test, validation = "
        "next n_validation, train = rest (sorted). Subset draw d: permutation of train by default_rng([seed, 1, d]); "
        "fraction f = first ceil(f * n_train) of it (at least 1), sorted.")


def make_splits(case_ids: list[str], seed: int, n_validation: int, n_test: int, label_fractions: list[float],
                n_subsets: int) -> dict:
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("splits: case ids are not unique")
    if n_validation < 1 or n_test < 1:
        raise ValueError("splits: validation and test need at least one case each")
    n_train = len(ids) - n_validation - n_test
    if n_train < 1:
        raise ValueError(f"splits: {len(ids)} labelled cases cannot hold {n_validation} validation + {n_test} test "
                         "cases and at least one training case; lower splits.validation / splits.test")
    for fraction in label_fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"splits.label_fractions: {fraction} is not in (0, 1]")
    if n_subsets < 1:
        raise ValueError("splits.subsets: at least one subset draw is needed")
    order = [ids[i] for i in np.random.default_rng([seed, 0]).permutation(len(ids))]
    test, validation, train = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]
    train = sorted(train)
    subsets = {}
    for fraction in sorted(set(label_fractions)):
        count = max(1, math.ceil(fraction * n_train - 1e-9))
        subsets[fraction_key(fraction)] = []
        for draw in range(n_subsets):
            perm = np.random.default_rng([seed, 1, draw]).permutation(n_train)
            subsets[fraction_key(fraction)].append(sorted(train[i] for i in perm[:count]))
    return {
        "seed": seed,
        "rule": RULE,
        "train": train,
        "validation": sorted(validation),
        "test": sorted(test),
        "label_fractions": subsets,
    }


def training_cases(splits: dict, label_fraction: float, subset: int) -> list[str]:
    key = fraction_key(label_fraction)
    if key not in splits["label_fractions"]:
        raise KeyError(f"label fraction {key} is not in the split file (it has {sorted(splits['label_fractions'])})")
    draws = splits["label_fractions"][key]
    if not 0 <= subset < len(draws):
        raise KeyError(f"subset {subset} is not in the split file (it has draws 0..{len(draws) - 1})")
    return draws[subset]

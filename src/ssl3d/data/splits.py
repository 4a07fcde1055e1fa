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

FRACTION_RULE = ("Subset draw d: permutation of train by numpy.random.default_rng([seed, 1, d]); fraction f = first "
                 "ceil(f * n_train) of it (at least 1), sorted.")
RULE = ("cases sorted by id; permutation = numpy.random.default_rng([seed, 0]); test = first n_test, validation = "
        "next n_validation, train = rest (sorted). " + FRACTION_RULE)


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
    if n_subsets < 1:
        raise ValueError("splits.subsets: at least one subset draw is needed")
    order = [ids[i] for i in np.random.default_rng([seed, 0]).permutation(len(ids))]
    test, validation, train = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]
    return {
        "seed": seed,
        "rule": RULE,
        "train": sorted(train),
        "validation": sorted(validation),
        "test": sorted(test),
        "label_fractions": nested_subsets(sorted(train), seed, label_fractions, n_subsets),
    }


def nested_subsets(train: list[str], seed: int, label_fractions: list[float], n_subsets: int) -> dict:
    """Fraction key -> one case list per draw: the first ceil(f·n) of draw d's seeded permutation of ``train``."""
    for fraction in label_fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"splits.label_fractions: {fraction} is not in (0, 1]")
    counts = {fraction_key(f): max(1, math.ceil(f * len(train) - 1e-9)) for f in sorted(set(label_fractions))}
    return nested_draws(train, counts, seed, n_subsets)


def nested_draws(train: list[str], counts: dict[str, int], seed: int, n_subsets: int = 1) -> dict:
    """Key -> one case list per draw d: the first ``count`` cases of a ``default_rng([seed, 1, d])`` permutation of
    the sorted ``train`` (sorted), so a smaller subset of a draw lies inside a larger one."""
    train = sorted(train)
    orders = [np.random.default_rng([seed, 1, draw]).permutation(len(train)) for draw in range(n_subsets)]
    return {key: [sorted(train[i] for i in order[:count]) for order in orders] for key, count in counts.items()}


def _from_paper_part(name: str, part: dict, meta: dict, labelled: list[str], seed: int,
                     label_fractions: list[float], n_subsets: int) -> dict:
    """One train / validation / test of a paper split (the split, or one fold of it) with nested label fractions."""
    missing = sorted(set(part["train"] + part["validation"]) - set(labelled))
    if missing:
        raise ValueError(f"split {name!r}: {len(missing)} of its cases are not labelled cases of the dataset "
                         f"({', '.join(missing[:5])}...); is the dataset complete?")
    test, note = part["test"], meta.get("note", "")
    if not set(test) <= set(labelled):
        test = part["validation"]
        note = f"the test cases are the paper's validation cases: its test cases have no labels here. {note}"
    return {
        "seed": seed,
        "rule": f"paper split {name!r}: {meta['rule']} {FRACTION_RULE}",
        "note": note.strip(),
        "train": sorted(part["train"]),
        "validation": sorted(part["validation"]),
        "test": sorted(test),
        "label_fractions": nested_subsets(sorted(part["train"]), seed, label_fractions, n_subsets),
    }


def from_paper_split(name: str, paper: dict, labelled: list[str], seed: int, label_fractions: list[float],
                     n_subsets: int) -> dict:
    """A committed paper split (``ssl3d.data.paper_splits``) with the suite's nested label fractions of its train
    cases; a k-fold split gives ``{"folds": [...]}``, one such split per fold. Where the paper's test cases have
    no public labels (BTCV's 0061-0080), its validation cases are the test set, as the papers report them; the
    file says so."""
    parts = paper.get("folds")
    if parts is None:
        return _from_paper_part(name, paper, paper["meta"], labelled, seed, label_fractions, n_subsets)
    return {"folds": [_from_paper_part(f"{name} fold {k}", part, paper["meta"], labelled, seed, label_fractions,
                                       n_subsets) for k, part in enumerate(parts)]}


def run_split(splits: dict, fold: int | None, path: str = "split file") -> dict:
    """The train / validation / test of one run: the file itself, or fold ``fold`` of a k-fold file."""
    if "folds" not in splits:
        if fold is not None:
            raise ValueError(f"{path}: the run asks for fold {fold}, but the file is a single split")
        return splits
    if fold is None or not 0 <= fold < len(splits["folds"]):
        raise ValueError(f"{path}: a k-fold split with folds 0..{len(splits['folds']) - 1}; the run asks for "
                         f"fold {fold}")
    return splits["folds"][fold]


def training_cases(splits: dict, label_fraction: float, subset: int) -> list[str]:
    key = fraction_key(label_fraction)
    if key not in splits["label_fractions"]:
        raise KeyError(f"label fraction {key} is not in the split file (it has {sorted(splits['label_fractions'])})")
    draws = splits["label_fractions"][key]
    if not 0 <= subset < len(draws):
        raise KeyError(f"subset {subset} is not in the split file (it has draws 0..{len(draws) - 1})")
    return draws[subset]

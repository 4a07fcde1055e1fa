import json

import pytest

from ssl3d.data.splits import make_splits, training_cases

IDS = [f"case_{i:02d}" for i in range(30)]


def splits(**overrides):
    args = dict(seed=3, n_validation=4, n_test=6, label_fractions=[0.1, 0.25, 0.5, 1.0], n_subsets=3)
    return make_splits(IDS, **{**args, **overrides})


def test_partition_is_disjoint_and_complete():
    s = splits()
    train, val, test = set(s["train"]), set(s["validation"]), set(s["test"])
    assert len(val) == 4 and len(test) == 6 and len(train) == 20
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(IDS)


def test_fractions_are_nested_within_each_draw_and_sized_by_ceiling():
    s = splits()
    for draw in range(3):
        chain = [set(training_cases(s, f, draw)) for f in (0.1, 0.25, 0.5, 1.0)]
        assert [len(c) for c in chain] == [2, 5, 10, 20]  # ceil(0.1*20)=2, ceil(0.25*20)=5
        assert all(small <= large for small, large in zip(chain, chain[1:]))
        assert chain[-1] == set(s["train"])


def test_draws_differ_and_generation_is_deterministic():
    s = splits()
    assert training_cases(s, 0.25, 0) != training_cases(s, 0.25, 1)
    assert json.dumps(splits()) == json.dumps(s)
    assert splits(seed=4)["test"] != s["test"]


def test_order_of_input_ids_does_not_matter():
    assert make_splits(list(reversed(IDS)), 3, 4, 6, [0.5], 2) == make_splits(IDS, 3, 4, 6, [0.5], 2)


def test_records_seed_and_rule():
    s = splits()
    assert s["seed"] == 3 and "default_rng" in s["rule"]


@pytest.mark.parametrize("overrides, message", [
    ({"n_validation": 20, "n_test": 10}, "cannot hold"),
    ({"label_fractions": [0.0]}, "label_fractions"),
    ({"n_subsets": 0}, "subsets"),
])
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        splits(**overrides)


def test_unknown_fraction_or_subset_is_a_clear_error():
    s = splits()
    with pytest.raises(KeyError, match="0.3"):
        training_cases(s, 0.3, 0)
    with pytest.raises(KeyError, match="subset 5"):
        training_cases(s, 0.5, 5)


def test_a_paper_split_keeps_its_cases_and_gets_nested_fractions():
    from ssl3d.data.paper_splits import BTCV_LABELLED, load_paper_split
    from ssl3d.data.splits import from_paper_split

    paper = load_paper_split("btcv_dataset_0")
    split = from_paper_split("btcv_dataset_0", paper, BTCV_LABELLED, seed=0, label_fractions=[0.25, 1.0],
                             n_subsets=2)
    assert split["train"] == sorted(paper["train"]) and len(split["train"]) == 24
    # BTCV's test cases (0061-0080) have no public labels: the paper's 6 validation cases are the test set
    assert split["test"] == split["validation"] == sorted(paper["validation"]) and "no labels" in split["note"]
    small, full = split["label_fractions"]["0.25"], split["label_fractions"]["1"]
    assert [len(draw) for draw in small] == [6, 6] and small[0] != small[1]
    assert full == [split["train"]] * 2 and set(small[0]) <= set(full[0])
    with pytest.raises(ValueError, match="split 'btcv_dataset_0': 1 of its cases are not labelled cases"):
        from_paper_split("btcv_dataset_0", paper, BTCV_LABELLED[1:], 0, [1.0], 1)


def test_a_k_fold_paper_split_gives_one_split_per_fold_and_a_run_reads_its_own():
    from ssl3d.data.paper_splits import load_paper_split
    from ssl3d.data.splits import from_paper_split, run_split

    paper = load_paper_split("hdssl_btcv_3fold")
    labelled = sorted({case for fold in paper["folds"] for part in ("train", "validation", "test")
                       for case in fold[part]})
    split = from_paper_split("hdssl_btcv_3fold", paper, labelled, seed=0, label_fractions=[0.2, 1.0], n_subsets=1)
    assert len(split["folds"]) == 3
    for fold, (ours, theirs) in enumerate(zip(split["folds"], paper["folds"])):
        assert ours["test"] == sorted(theirs["test"]) and ours["train"] == sorted(theirs["train"])
        assert ours["label_fractions"]["0.2"][0] == training_cases(run_split(split, fold), 0.2, 0)
        assert len(ours["label_fractions"]["0.2"][0]) == 4  # ceil(0.2 * 19)
    assert sorted(case for fold in split["folds"] for case in fold["test"]) == labelled  # each case tested once
    with pytest.raises(ValueError, match=r"folds 0..2; the run asks for fold None"):
        run_split(split, None)
    with pytest.raises(ValueError, match="fold 3"):
        run_split(split, 3)
    with pytest.raises(ValueError, match="asks for fold 0, but the file is a single split"):
        run_split(splits(), 0)

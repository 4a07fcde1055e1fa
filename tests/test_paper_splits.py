"""The committed paper splits: each file is what its generator draws, with the papers' sizes and no overlaps."""

from importlib import resources

import pytest
from monai.apps import DecathlonDataset
from sklearn.model_selection import KFold, train_test_split

from ssl3d.data.paper_splits import (
    AMOS_MRI_LABELLED,
    BRATS2020_TRAINING,
    BTCV_LABELLED,
    GENERATORS,
    KITS19_LABELLED,
    MSD_LIVER_TRAINING,
    MSD_SPLEEN_TRAINING,
    decathlon_split,
    load_paper_split,
    regenerate,
)
from ssl3d.data.splits import training_cases

SPLIT_DIR = resources.files("ssl3d.data").joinpath("splits")


def _splits_of(data: dict) -> list[dict]:
    return data["folds"] if "folds" in data else [data]


def test_every_committed_file_has_a_generator():
    committed = {path.name.removesuffix(".json") for path in SPLIT_DIR.iterdir() if path.name.endswith(".json")}
    assert committed == set(GENERATORS)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_committed_file_is_what_its_generator_draws(name):
    committed = load_paper_split(name)
    assert committed == regenerate(name)
    assert {"generator", "seed", "rule", "source"} <= set(committed["meta"])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_splits_are_disjoint_and_read_like_the_suites_own(name):
    for split in _splits_of(load_paper_split(name)):
        train, validation, test = (set(split[key]) for key in ("train", "validation", "test"))
        assert train and validation and test
        assert not train & validation and not train & test and not validation & test
        # fine-tuning reads the full training set through the suite's own accessor
        assert training_cases(split, 1.0, 0) == split["train"]
        for draws in (*split["label_fractions"].values(), *split.get("label_counts", {}).values()):
            assert set(draws[0]) <= train


def test_unknown_split_names_the_choices():
    with pytest.raises(ValueError, match=r"paper split 'nope' is unknown; known: .*pgl_msd_liver"):
        load_paper_split("nope")


def test_btcv_dataset_0_is_the_published_list():
    split = load_paper_split("btcv_dataset_0")
    assert split["train"] == [f"img{i:04d}" for i in (*range(1, 11), *range(21, 35))]
    assert split["validation"] == [f"img{i:04d}" for i in range(35, 41)]
    assert split["test"] == [f"img{i:04d}" for i in range(61, 81)]
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (24, 6, 20)


@pytest.mark.parametrize("section", ["training", "validation"])
@pytest.mark.parametrize("n, val_frac", [(41, 0.5), (131, 0.5), (20, 0.2)])
def test_decathlon_split_is_monais(section, n, val_frac):
    """Against MONAI's own code: DecathlonDataset's split, run without its data (its __init__ needs the files)."""
    datalist = [f"case_{i}" for i in range(n)]
    monai_dataset = DecathlonDataset.__new__(DecathlonDataset)
    monai_dataset.section, monai_dataset.val_frac = section, val_frac
    monai_dataset.set_random_state(seed=0)
    ours = dict(zip(("training", "validation"), decathlon_split(datalist, val_frac, seed=0)))
    assert ours[section] == [item["image"] for item in monai_dataset._split_datalist([{"image": i} for i in datalist])]


@pytest.mark.parametrize("name, datalist, n_train, n_test", [
    ("pgl_msd_liver", MSD_LIVER_TRAINING, 66, 65),
    ("pgl_msd_spleen", MSD_SPLEEN_TRAINING, 20, 21),
    ("pgl_kits19", KITS19_LABELLED, 105, 105),
    ("pgl_btcv", BTCV_LABELLED, 15, 15),
])
def test_pgl_half_splits_have_the_papers_sizes(name, datalist, n_train, n_test):
    split = load_paper_split(name)
    # PGL's training set is train + validation (20% of it, PGL §5.1); its test set is the other half
    assert len(split["train"]) + len(split["validation"]) == n_train and len(split["test"]) == n_test
    assert len(split["validation"]) == int(n_train * 0.2)
    assert sorted(split["train"] + split["validation"] + split["test"]) == sorted(datalist)


def test_spleen_order_is_the_dataset_json_order_and_liver_is_a_stand_in():
    assert len(MSD_SPLEEN_TRAINING) == len(set(MSD_SPLEEN_TRAINING)) == 41
    assert MSD_SPLEEN_TRAINING[:2] == ["spleen_19", "spleen_31"]
    assert "unknown" in load_paper_split("pgl_msd_liver")["meta"]["source"]


def test_pgl_btcv_fractions_are_nested():
    fractions = load_paper_split("pgl_btcv")["label_fractions"]
    assert [len(fractions[key][0]) for key in ("0.2", "0.5", "1")] == [3, 6, 12]
    assert set(fractions["0.2"][0]) <= set(fractions["0.5"][0]) <= set(fractions["1"][0])


@pytest.mark.parametrize("name, ids, n_folds, n_validation", [
    ("hdssl_btcv_3fold", BTCV_LABELLED, 3, 1),
    ("hdssl_amos_mri_5fold", AMOS_MRI_LABELLED, 5, 6),
    ("brats2020_5fold", BRATS2020_TRAINING, 5, 30),
])
def test_kfold_test_sets_partition_the_cases(name, ids, n_folds, n_validation):
    folds = load_paper_split(name)["folds"]
    assert len(folds) == n_folds
    tests = [fold["test"] for fold in folds]
    assert sorted(sum(tests, [])) == sorted(ids)
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    for fold in folds:
        assert len(fold["validation"]) == n_validation
        assert sorted(fold["train"] + fold["validation"] + fold["test"]) == sorted(ids)


def test_hdssl_btcv_folds_are_vox2vecs_on_its_own_id_spelling():
    """vox2vec names BTCV cases '0001'; the suite 'img0001'. Both sort alike, so the folds are the same cases."""
    ids = sorted(case.removeprefix("img") for case in BTCV_LABELLED)
    folds = load_paper_split("hdssl_btcv_3fold")["folds"]
    for fold, (train_val_idx, test_idx) in zip(folds, KFold(3, shuffle=True, random_state=42).split(ids)):
        train, validation = train_test_split([ids[i] for i in train_val_idx], test_size=1, random_state=42)
        assert fold["test"] == sorted(f"img{ids[i]}" for i in test_idx)
        assert (fold["train"], fold["validation"]) == (sorted(f"img{i}" for i in train), [f"img{validation[0]}"])
        assert (len(fold["train"]), len(fold["test"])) == (19, 10)


def test_amos_mri_has_60_labelled_scans_and_nested_few_shot_subsets():
    assert len(set(AMOS_MRI_LABELLED)) == 60
    assert all(501 <= int(case.removeprefix("amos_")) <= 600 for case in AMOS_MRI_LABELLED)
    for fold in load_paper_split("hdssl_amos_mri_5fold")["folds"]:
        assert len(fold["train"]) == 42  # HDSSL Table 3
        four, eight = fold["label_counts"]["4"][0], fold["label_counts"]["8"][0]
        assert (len(four), len(eight)) == (4, 8) and set(four) <= set(eight)


def test_brats_folds_cover_369_cases():
    assert BRATS2020_TRAINING[0] == "BraTS20_Training_001" and len(BRATS2020_TRAINING) == 369
    sizes = [len(fold["test"]) for fold in load_paper_split("brats2020_5fold")["folds"]]
    assert sizes == [74, 74, 74, 74, 73]

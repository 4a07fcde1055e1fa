"""The papers' own data splits, committed as JSON under ``splits/`` (package data) and regenerable from here.

Why committed: a paper's numbers are comparable only on the paper's split, and most splits are drawn by a seeded
library call (MONAI's ``DecathlonDataset``, scikit-learn's ``KFold``) whose output could drift with the library or
the input order. A committed list is what the workflow reads (:func:`load_paper_split`); the generator here
(:func:`regenerate`) says how it was drawn, and the tests regenerate every file and compare, so drift fails loudly.

Format: the keys of :mod:`ssl3d.data.splits` -- ``train`` / ``validation`` / ``test`` (sorted case ids) and
``label_fractions`` ({fraction: [draw, ...]}, nested draws of ``train``) -- so fine-tuning reads a paper split as it
reads the suite's own. A k-fold file holds ``folds``: a list of such splits. ``label_counts`` has the same shape as
``label_fractions`` but is keyed by a number of training cases (HDSSL's few-shot 4 and 8 scans). Every file has a
``meta`` block: its generator, seed, rule and sources. Case ids are those of :mod:`ssl3d.data.convert`.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
from sklearn.model_selection import KFold, train_test_split

from ssl3d.data.splits import nested_draws
from ssl3d.io import write_json
from ssl3d.plan import fraction_key

BTCV_LABELLED = [f"img{i:04d}" for i in (*range(1, 11), *range(21, 41))]
BTCV_TEST = [f"img{i:04d}" for i in range(61, 81)]
KITS19_LABELLED = [f"case_{i:05d}" for i in range(210)]
BRATS2020_TRAINING = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
# Task09_Spleen dataset.json "training", in file order (MONAI's DecathlonDataset shuffles this order). Source: the
# file as quoted in github.com/sarah-antillia/ImageMask-Dataset-Spleen README.md (commit e188e6e); its first two
# entries (spleen_19, spleen_31) match MONAI's test_load_decathlon_datalist.
MSD_SPLEEN_TRAINING = [f"spleen_{i}" for i in (
    19, 31, 52, 40, 3, 17, 21, 33, 9, 29, 46, 25, 13, 62, 27, 44, 56, 60, 2, 53, 41, 22, 14, 18, 20, 32, 16, 12, 63,
    28, 24, 59, 47, 8, 6, 61, 10, 38, 45, 26, 49)]
# Task03_Liver dataset.json "training": no public copy of the file was found, so its order is unknown. Stand-in: the
# 131 ids in numeric order (liver_0 .. liver_130). The split is then MONAI's rule on this order, not necessarily the
# split DecathlonDataset draws from the real file; regenerate when the file's order is known.
MSD_LIVER_TRAINING = [f"liver_{i}" for i in range(131)]
# AMOS22's 60 labelled MR scans (40 imagesTr + 20 imagesVa; ids 0507..0600 with gaps). Source: the "training" list
# of github.com/JiYuanFeng/AMOS splits/dataset_mr.json (the AMOS authors' repository, commit 5b6e658), whose "test"
# list names the 20 validation scans; the 40 training ids match a third-party nnU-Net split of AMOS MR.
AMOS_MRI_LABELLED = [f"amos_{i:04d}" for i in (
    507, 508, 510, 514, 517, 518, 522, 530, 532, 538, 540, 541, 544, 545, 546, 547, 548, 549, 550, 551, 552, 553, 554,
    555, 556, 557, 558, 559, 561, 562, 563, 568, 570, 571, 572, 573, 575, 576, 578, 580, 581, 582, 583, 584, 585, 586,
    587, 588, 589, 590, 591, 592, 593, 594, 595, 596, 597, 598, 599, 600)]

PGL_RULE = ("PGL half/half (PGL §4.2: 'split randomly' / 'split equally and randomly'; seeds not stated): the "
            "datalist shuffled as monai.apps.DecathlonDataset(val_frac=0.5, seed=0) does -- "
            "numpy.random.RandomState(0).shuffle(arange(n)), the first int(n * 0.5) indices are its 'validation' "
            "section, the rest its 'training' section; one section is the PGL training set, the other the test set "
            "(see train_side). Validation: PGL §5.1 'randomly selected 20% of training scans'; not stated how; "
            "chosen: the same DecathlonDataset rule on the training set (val_frac=0.2, seed=0), whose 'validation' "
            "section is this file's validation and the rest its train: train + validation = PGL's training set.")


def decathlon_split(datalist: list[str], val_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) sections as ``monai.apps.DecathlonDataset(val_frac=..., seed=...)`` draws them from a
    ``dataset.json`` training list: a ``RandomState(seed)`` shuffle of the indices, validation = the first
    ``int(n * val_frac)``. Reimplemented (three lines) rather than called, because the dataset class needs the data
    on disk; the tests check it against MONAI's own ``_split_datalist``."""
    indices = np.arange(len(datalist))
    np.random.RandomState(seed).shuffle(indices)
    n_validation = int(len(datalist) * val_frac)
    return [datalist[i] for i in indices[n_validation:]], [datalist[i] for i in indices[:n_validation]]


def _split(train: list[str], validation: list[str], test: list[str], **subsets) -> dict:
    return {"train": sorted(train), "validation": sorted(validation), "test": sorted(test),
            "label_fractions": {fraction_key(1.0): [sorted(train)]}, **subsets}


def btcv_dataset_0() -> dict:
    """The UNETR / SwinUNETR BTCV split, a fixed published list (no seed)."""
    meta = {
        "generator": "btcv_dataset_0", "seed": None,
        "rule": "fixed list: training img0001-0010 + img0021-0034 (24), validation img0035-0040 (6), test "
                "img0061-0080 (20)",
        "source": "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/swin_unetr_btcv_dataset_0.json;"
                  " printed in full in github.com/Project-MONAI/tutorials 3d_segmentation/"
                  "unetr_btcv_segmentation_3d.ipynb (datasets.md §1b)",
        "note": "test = the 20 Synapse test images, which have no public labels: SwinUNETR/UNETR report Dice on "
                "'validation'. Evaluate on 'validation' unless labels for the test images are available.",
    }
    return {"meta": meta, **_split(BTCV_LABELLED[:24], BTCV_LABELLED[24:], BTCV_TEST)}


PGL_DATASETS = {
    # name: (datalist in dataset.json order, which DecathlonDataset section is PGL's training set, its source)
    "msd_liver": (MSD_LIVER_TRAINING, "training",
                  "Task03_Liver dataset.json order unknown; stand-in: numeric order (see MSD_LIVER_TRAINING). "
                  "Sizes 66 train / 65 test (PGL §4.2): train = the 'training' section (131 - int(65.5))."),
    "msd_spleen": (MSD_SPLEEN_TRAINING, "validation",
                   "Task09_Spleen dataset.json order (see MSD_SPLEEN_TRAINING). Sizes 20 train / 21 test (PGL "
                   "§4.2): DecathlonDataset's sections are 21 'training' / 20 'validation', so train = the "
                   "'validation' section, to keep the paper's sizes (datasets.md §1b leaves the side open)."),
    "kits19": (KITS19_LABELLED, "training", "KiTS19 labelled cases case_00000-00209 in numeric order (no "
               "dataset.json). 105 / 105 (PGL §4.2): train = the 'training' section."),
    "btcv": (BTCV_LABELLED, "training", "BTCV's 30 labelled cases img0001-0010, img0021-0040 in numeric order "
             "(BTCV has no Decathlon datalist). 15 / 15 (PGL §4.2): train = the 'training' section."),
}
# PGL Fig. 5 / Appendix: BCV fine-tuned on 20% and 50% of its training scans; how they were drawn is not stated.
PGL_BTCV_FRACTIONS = (0.2, 0.5)


def pgl_half(dataset: str) -> dict:
    """PGL's half/half split of one downstream dataset, with a 20% validation set drawn from the training half."""
    datalist, train_side, source = PGL_DATASETS[dataset]
    training, validation = decathlon_split(datalist, val_frac=0.5, seed=0)
    train, test = (training, validation) if train_side == "training" else (validation, training)
    train, held_out = decathlon_split(train, val_frac=0.2, seed=0)
    meta = {"generator": f"pgl_half({dataset!r})", "seed": 0, "rule": PGL_RULE, "train_side": train_side,
            "source": source}
    split = _split(train, held_out, test)
    if dataset == "btcv":
        sizes = {fraction_key(f): math.ceil(f * len(train)) for f in PGL_BTCV_FRACTIONS}
        split["label_fractions"] = {**nested_draws(train, sizes, seed=0), **split["label_fractions"]}
        meta["label_fractions"] = ("PGL BCV 20% / 50% (PGL Fig. 5): not stated how drawn; chosen: ceil(f * "
                                   "n_train) cases, nested, from a default_rng([0, 1, 0]) permutation of train")
    return {"meta": meta, **split}


def _kfold(ids: list[str], n_splits: int, n_validation: int | float, seed: int) -> list[tuple[list, list, list]]:
    """vox2vec's rule (vox2vec/utils/split.py, eval/btcv.py): ``KFold(n_splits, shuffle=True, random_state=seed)``
    over the sorted ids gives (train_val, test); ``train_test_split(train_val, test_size=n_validation,
    random_state=seed)`` then gives (train, validation)."""
    ids = sorted(ids)
    folds = []
    for train_val_idx, test_idx in KFold(n_splits, shuffle=True, random_state=seed).split(ids):
        train, validation = train_test_split([ids[i] for i in train_val_idx], test_size=n_validation,
                                             random_state=seed)
        folds.append((train, validation, [ids[i] for i in test_idx]))
    return folds


def hdssl_btcv_3fold() -> dict:
    """HDSSL's BTCV 3-fold cross-validation (HDSSL §3.3), drawn as vox2vec draws its BTCV folds."""
    meta = {
        "generator": "hdssl_btcv_3fold", "seed": 42,
        "rule": "sorted 30 labelled ids; KFold(3, shuffle=True, random_state=42) -> (train_val, test); "
                "train_test_split(train_val, test_size=1, random_state=42) -> (train, validation); scikit-learn",
        "source": "HDSSL §3.3 (3-fold CV on BTCV); rule of vox2vec eval/btcv.py + utils/split.py (datasets.md §1b); "
                  "HDSSL's own fold files btcv_fold{0,1,2}_tr20.json are not published ('tr20' = the 20 train+"
                  "validation cases of a fold: 19 train + 1 validation here)",
    }
    return {"meta": meta, "folds": [_split(*fold) for fold in _kfold(BTCV_LABELLED, 3, 1, seed=42)]}


AMOS_FEW_SHOT = (4, 8)


def hdssl_amos_mri_5fold() -> dict:
    """HDSSL's AMOS-MRI 5-fold cross-validation with 4- and 8-scan training subsets (HDSSL §3.1, §3.3, Table 3)."""
    meta = {
        "generator": "hdssl_amos_mri_5fold", "seed": 42,
        "rule": "sorted 60 labelled MR ids; KFold(5, shuffle=True, random_state=42) -> (train_val, test: 12); "
                "train_test_split(train_val, test_size=6, random_state=42) -> (train: 42, validation: 6); "
                "label_counts 4 and 8: nested, the first n of a default_rng([42, 1, 0]) permutation of train",
        "source": "HDSSL §3.1 (60 AMOS MR images), §3.3 (5-fold CV), Table 3 (training on 42, 8 and 4 scans). "
                  "Fold rule: not stated; chosen: vox2vec's (as for BTCV). Validation size: not stated; derived: "
                  "Table 3's 42 training scans of the 48 non-test scans leave 6. Few-shot draw: not stated; chosen: "
                  "nested seeded subsets of each fold's train, same validation and test. Ids: see "
                  "AMOS_MRI_LABELLED (github.com/JiYuanFeng/AMOS splits/dataset_mr.json)",
    }
    folds = []
    for train, validation, test in _kfold(AMOS_MRI_LABELLED, 5, 6, seed=42):
        counts = nested_draws(train, {str(n): n for n in AMOS_FEW_SHOT}, seed=42)
        folds.append(_split(train, validation, test, label_counts=counts))
    return {"meta": meta, "folds": folds}


def brats2020_5fold() -> dict:
    """5 folds over the 369 BraTS 2020 training cases; HybridMIM published no split (datasets.md §1b)."""
    meta = {
        "generator": "brats2020_5fold", "seed": 42,
        "rule": "sorted ids BraTS20_Training_001..369; KFold(5, shuffle=True, random_state=42) -> (train_val, "
                "test); train_test_split(train_val, test_size=0.1, random_state=42) -> (train, validation); "
                "scikit-learn",
        "source": "HybridMIM §4.1 (369 cases) and §4.2 (80% for training); the split is not stated; chosen: 5-fold "
                  "(80/20, as SwinUNETR's brats21_folds.json, datasets.md §1b), vox2vec's seeded rule, and a 10% "
                  "validation set from each fold's training cases (not stated)",
    }
    return {"meta": meta, "folds": [_split(*fold) for fold in _kfold(BRATS2020_TRAINING, 5, 0.1, seed=42)]}


GENERATORS = {
    "btcv_dataset_0": btcv_dataset_0,
    "pgl_msd_liver": lambda: pgl_half("msd_liver"),
    "pgl_msd_spleen": lambda: pgl_half("msd_spleen"),
    "pgl_kits19": lambda: pgl_half("kits19"),
    "pgl_btcv": lambda: pgl_half("btcv"),
    "hdssl_btcv_3fold": hdssl_btcv_3fold,
    "hdssl_amos_mri_5fold": hdssl_amos_mri_5fold,
    "brats2020_5fold": brats2020_5fold,
}


def _known(name: str) -> None:
    if name not in GENERATORS:
        raise ValueError(f"paper split {name!r} is unknown; known: {', '.join(sorted(GENERATORS))}")


def regenerate(name: str) -> dict:
    """The split file ``name`` as its generator draws it now."""
    _known(name)
    return GENERATORS[name]()


def load_paper_split(name: str) -> dict:
    """The committed split file ``splits/<name>.json``."""
    _known(name)
    return json.loads(resources.files("ssl3d.data").joinpath("splits", f"{name}.json").read_text())


if __name__ == "__main__":  # (re)write every committed file: python -m ssl3d.data.paper_splits
    for split_name in GENERATORS:
        write_json(resources.files("ssl3d.data").joinpath("splits", f"{split_name}.json"), regenerate(split_name))

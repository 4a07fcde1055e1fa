"""Statistics of the reports: pairing of per-case values, Wilcoxon tests, effect sizes, Holm, bootstrap, Friedman."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ssl3d.analysis.stats import (bootstrap_ci, cliffs_delta, compare_inits, friedman_nemenyi, nemenyi_cd,
                                  paired_case_values, rank_biserial, significance_matrix, wilcoxon_test)
from ssl3d.evaluate.columns import PER_CASE_COLUMNS

WHERE = {"dataset": "d", "label_fraction": 0.5}


def rows(init, values, backbone="unet", target="spleen", seed=0, subset=0, metric="dice", first_case=0):
    """Per-case rows of one run: case c{first_case + i} gets values[i]."""
    return [{"dataset": "d", "case_id": f"c{first_case + i:02d}", "target": target, "metric": metric, "value": value,
             "init": init, "backbone": backbone, "protocol": "finetune", "label_fraction": 0.5, "subset": subset,
             "seed": seed, "run_id": f"{init}-{backbone}-{subset}-{seed}", "empty_reference": False,
             "empty_prediction": False, "empty_policy": "both_empty=nan"} for i, value in enumerate(values)]


def table(*groups):
    return pd.DataFrame([row for group in groups for row in group], columns=PER_CASE_COLUMNS)


def scores(n, rng, shift=0.0):
    return np.clip(rng.normal(0.7 + shift, 0.1, n), 0, 1)


# --- pairing --------------------------------------------------------------------------------------------------

def test_seeds_and_subsets_are_averaged_per_case_before_pairing():
    base = np.linspace(0.5, 0.9, 8)
    per_case = table(rows("a", base - 0.1, seed=0), rows("a", base + 0.1, seed=1),
                     rows("b", base + 0.1, seed=0), rows("b", base - 0.1, seed=1, subset=0),
                     rows("b", base + 0.05, seed=0, subset=1), rows("b", base - 0.05, seed=1, subset=1))
    raw = per_case[per_case.init == "a"].merge(per_case[per_case.init == "b"], on=["case_id", "seed", "subset"])
    assert (raw.value_x != raw.value_y).all()  # pairing runs would see a difference in every row
    paired = paired_case_values(per_case, "a", "b", **WHERE)
    assert list(paired.case_id) == [f"c{i:02d}" for i in range(8)]  # one row per case, not per run
    np.testing.assert_allclose(paired.a, base)
    np.testing.assert_allclose(paired.b, base)
    assert wilcoxon_test(paired.a, paired.b)["n_nonzero"] == 0


def test_only_cases_both_rows_have_are_paired():
    per_case = table(rows("a", np.full(8, 0.8)), rows("b", np.full(8, 0.6), first_case=2))
    paired = paired_case_values(per_case, "a", "b", **WHERE)
    assert list(paired.case_id) == [f"c{i:02d}" for i in range(2, 8)]
    assert (paired.a == 0.8).all() and (paired.b == 0.6).all()


def test_mean_target_skips_nan_targets():
    per_case = table(rows("a", [0.8, 0.6, np.nan]), rows("a", [np.nan, 0.4, np.nan], target="liver"),
                     rows("b", [0.5, 0.5, 0.5]), rows("b", [0.7, 0.3, 0.1], target="liver"))
    paired = paired_case_values(per_case, "a", "b", **WHERE)
    assert list(paired.case_id) == ["c00", "c01"]  # c02 has no defined target for a
    np.testing.assert_allclose(paired.a, [0.8, 0.5])  # NaN liver skipped, not counted as 0
    np.testing.assert_allclose(paired.b, [0.6, 0.4])
    liver = paired_case_values(per_case, "a", "b", target="liver", **WHERE)
    assert list(liver.case_id) == ["c01"]


def test_a_row_is_named_by_init_or_by_init_and_backbone():
    per_case = table(rows("scratch", [0.5] * 6), rows("scratch", [0.6] * 6, backbone="hm"), rows("hm", [0.7] * 6,
                                                                                                  backbone="hm"))
    with pytest.raises(ValueError, match="several backbones"):
        paired_case_values(per_case, "hm", "scratch", **WHERE)
    paired = paired_case_values(per_case, "hm", ("scratch", "hm"), **WHERE)
    assert (paired.b == 0.6).all()


# --- Wilcoxon and effect sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize("n, ties, method", [(10, False, "exact"), (10, True, "permutation (exhaustive)"),
                                             (60, False, "asymptotic (normal)"), (30, True, "asymptotic (normal)")])
def test_wilcoxon_p_is_scipys(n, ties, method):
    rng = np.random.default_rng(n)
    a, b = scores(n, rng, 0.03), scores(n, rng)
    if ties:
        a, b = np.round(a * 16) / 16, np.round(b * 16) / 16  # dyadic: a - b is exact, so ties are real ties
        b[:2] = a[:2]  # zero differences too
    result = wilcoxon_test(a, b)
    expected = stats.wilcoxon(a, b)
    assert result["method"] == method and result["reason"] is None
    assert result["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert result["statistic"] == expected.statistic
    assert result["median_difference"] == pytest.approx(np.median(a - b))


def test_too_few_pairs_give_nan_p_with_a_reason():
    few = wilcoxon_test([0.9, 0.8, 0.7, 0.9, 0.8], [0.1, 0.2, 0.3, 0.1, 0.2])
    assert math.isnan(few["p"]) and "fewer than 6" in few["reason"]
    assert few["cliffs_delta"] == 1 and few["rank_biserial"] == 1  # effect sizes are still reported
    zeros = wilcoxon_test([0.9, 0.8, 0.7, 0.9, 0.8, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.1, 0.2, 0.5, 0.5, 0.5])
    assert zeros["n_pairs"] == 8 and zeros["n_nonzero"] == 5 and math.isnan(zeros["p"])


def test_cliffs_delta_on_hand_computed_examples():
    assert cliffs_delta([1, 2, 3], [0, 0, 0]) == 1
    assert cliffs_delta([0, 0, 0], [1, 2, 3]) == -1
    assert cliffs_delta([2, 3, 4], [1, 3]) == 0.5  # 2: +1 -1, 3: +1 0, 4: +1 +1 -> 3 / 6
    rng = np.random.default_rng(0)
    a, b = np.round(rng.random(12), 1), np.round(rng.random(9), 1)
    u = stats.mannwhitneyu(a, b).statistic
    assert cliffs_delta(a, b) == pytest.approx(2 * u / (12 * 9) - 1)


def test_rank_biserial_on_hand_computed_examples():
    assert rank_biserial([1, 2, 3]) == 1
    assert rank_biserial([1, -2, 3, 4]) == pytest.approx(0.6)  # R+ = 1 + 3 + 4, R- = 2: (8 - 2) / 10
    assert rank_biserial([0, 1, -2, 3, 4]) == pytest.approx(0.6)  # zeros dropped, as the wilcox test does
    assert rank_biserial([-1, 2, -1]) == 0  # tied ranks 1.5, 3, 1.5
    assert rank_biserial([0, 0]) == 0


# --- comparison tables and Holm -------------------------------------------------------------------------------

def comparison_table():
    rng = np.random.default_rng(1)
    base = scores(12, rng)
    return table(*(rows(init, np.clip(base + shift + rng.normal(0, 0.02, 12), 0, 1), seed=seed)
                   for init, shift in (("scratch", 0.0), ("mg", 0.01), ("byol", 0.05)) for seed in (0, 1)))


def test_compare_inits_against_reference_and_best_with_holm():
    result = compare_inits(comparison_table(), "scratch", **WHERE)
    assert list(zip(result.init, result.versus, result.other_init)) == [
        ("byol", "reference", "scratch"), ("mg", "reference", "scratch"), ("mg", "best", "byol")]
    assert (result.n_cases == 12).all()
    assert (result.loc[result.init == "byol", "mean_difference"] > 0).all()
    np.testing.assert_allclose(result.mean_difference, result["mean"] - result.other_mean)
    np.testing.assert_allclose(result.p_holm, multipletests(result.p, method="holm")[1])


def test_compare_inits_uses_the_reference_on_the_rows_backbone_and_lowest_distance_as_best():
    rng = np.random.default_rng(2)
    base = rng.uniform(5, 20, 10)
    per_case = table(rows("scratch", base, metric="hd95"), rows("scratch", base + 1, backbone="hm", metric="hd95"),
                     rows("hm", base - 2, backbone="hm", metric="hd95"))
    result = compare_inits(per_case, **WHERE, metric="hd95")
    first = result.iloc[0]
    assert (first.init, first.other_init, first.other_backbone) == ("hm", "scratch", "hm")
    assert first.mean_difference == pytest.approx(-3)
    assert set(result.loc[result.versus == "best", "other_init"]) == {"hm"}


def test_a_row_on_a_backbone_without_the_reference_is_compared_with_the_best_only():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.8, 10)
    per_case = table(rows("scratch", base), rows("mg", base + 0.02), rows("hm", base + 0.1, backbone="hm"))
    result = compare_inits(per_case, **WHERE)
    assert list(zip(result.init, result.versus, result.other_init)) == [
        ("mg", "reference", "scratch"), ("mg", "best", "hm"), ("scratch", "best", "hm")]
    np.testing.assert_allclose(result.p_holm, multipletests(result.p, method="holm")[1])
    across = compare_inits(per_case, ("scratch", "unet"), **WHERE)  # a named row is every row's reference
    assert ("hm", "reference", "scratch") in set(zip(across.init, across.versus, across.other_init))
    with pytest.raises(ValueError, match="no row for reference init 'byol'"):
        compare_inits(per_case, "byol", **WHERE)


def test_significance_matrix_is_holm_over_all_pairs():
    per_case = comparison_table()
    matrix = significance_matrix(per_case, **WHERE)
    names = ["byol", "mg", "scratch"]
    assert list(matrix.index) == names and list(matrix.columns) == names
    assert matrix.isna().values.diagonal().all() and np.allclose(matrix, matrix.T, equal_nan=True)
    pairs = [("byol", "mg"), ("byol", "scratch"), ("mg", "scratch")]
    raw = [stats.wilcoxon(*paired_case_values(per_case, a, b, **WHERE)[["a", "b"]].to_numpy().T).pvalue
           for a, b in pairs]
    for (a, b), expected in zip(pairs, multipletests(raw, method="holm")[1]):
        assert matrix.loc[a, b] == pytest.approx(expected)


# --- bootstrap ------------------------------------------------------------------------------------------------

def test_bootstrap_ci_contains_the_mean_and_is_deterministic_under_the_seed():
    values = scores(20, np.random.default_rng(3))
    ci = bootstrap_ci(values, n_resamples=2000)
    assert ci["low"] < values.mean() < ci["high"] and ci["mean"] == pytest.approx(values.mean())
    assert bootstrap_ci(values, n_resamples=2000) == ci
    assert bootstrap_ci(values, n_resamples=2000, seed=1) != ci
    constant = bootstrap_ci([0.7, 0.7, 0.7])
    assert constant["low"] == constant["high"] == constant["mean"] == pytest.approx(0.7)
    assert math.isnan(bootstrap_ci([0.7])["low"])


# --- Friedman and Nemenyi -------------------------------------------------------------------------------------

def test_nemenyi_cd_matches_demsar_2006():
    # Demšar 2006, worked example: four algorithms on 14 data sets, q_0.05 = 2.569, CD = 2.569 sqrt(4 * 5 / (6 * 14))
    assert nemenyi_cd(4, 14) == pytest.approx(2.569 * math.sqrt(20 / 84), abs=1e-3)
    assert round(nemenyi_cd(4, 14), 2) == 1.25


def test_friedman_p_is_scipys_and_pairs_beyond_cd_are_listed():
    rng = np.random.default_rng(4)
    blocks = pd.DataFrame(rng.random((14, 4)) * 0.1 + [0.9, 0.8, 0.7, 0.6], columns=["A", "B", "C", "D"])
    result = friedman_nemenyi(blocks)
    expected = stats.friedmanchisquare(*(blocks[c] for c in blocks.columns))
    assert result["p"] == pytest.approx(expected.pvalue) and result["statistic"] == pytest.approx(expected.statistic)
    assert result["ranks"].to_dict() == {"A": 1, "B": 2, "C": 3, "D": 4}
    assert result["cd"] == pytest.approx(nemenyi_cd(4, 14))
    assert [(a, b) for a, b, _ in result["significant_pairs"]] == [("A", "C"), ("A", "D"), ("B", "D")]
    assert list(friedman_nemenyi(blocks, higher_is_better=False)["ranks"].index) == ["D", "C", "B", "A"]


@pytest.mark.parametrize("shape", [(1, 4), (5, 2)])
def test_friedman_needs_two_blocks_and_three_inits(shape):
    with pytest.raises(ValueError, match=">= 2 blocks and >= 3 inits"):
        friedman_nemenyi(pd.DataFrame(np.ones(shape)))


def test_friedman_rejects_incomplete_blocks():
    with pytest.raises(ValueError, match="complete blocks"):
        friedman_nemenyi(pd.DataFrame([[0.5, 0.6, np.nan], [0.5, 0.6, 0.7]], columns=["a", "b", "c"]))

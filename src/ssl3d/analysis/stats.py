"""Significance of the differences between inits: paired per-case tests, effect sizes, bootstrap CIs and ranks.

Everything starts from the per-case long table (:data:`ssl3d.evaluate.run.PER_CASE_COLUMNS`).

Why paired, per-case tests
    Within one dataset and label fraction every init is evaluated on the same test cases, and case difficulty
    varies far more than the difference between inits. Comparing two inits case by case (a Wilcoxon
    signed-rank test on the paired differences) removes the between-case variance that an unpaired test would
    leave in. Only cases that both inits have are paired (an inner join on ``case_id``).

Why seeds are averaged first
    For a per-dataset comparison the independent units are the test cases, not the training runs: the seeds
    (and subset draws) of one init all predict the same cases, so their rows are repeated measures of one case.
    Pairing raw rows would multiply the sample size by the number of runs and let seed noise masquerade as
    evidence. Each case's value is therefore the mean over the init's runs first, then the pair is formed.

Why Holm
    A comparison table (every init against the reference and against the best init, or every pair for the
    heat-map) is read as one family, so its p-values are corrected together with Holm's step-down method,
    which controls the family-wise error rate without assumptions on the dependence between the tests and is
    uniformly more powerful than Bonferroni.

Across datasets the unit is the dataset (or dataset x fraction block): :func:`friedman_nemenyi` ranks the inits
within each block (Friedman test, Nemenyi critical difference; Demšar 2006).

Libraries: the tests, the bootstrap and the multiplicity correction are scipy's (``wilcoxon``, ``bootstrap``,
``friedmanchisquare``, ``studentized_range``) and statsmodels' (``multipletests``). Hand-written here, because
neither library provides them: the matched-pairs rank-biserial correlation, Cliff's delta, the average ranks,
the Nemenyi critical difference (a formula on scipy's studentized range quantile) and the two-way bootstrap over
runs and cases (:func:`runs_cases_bootstrap_ci`).

A row of the benchmark is an (init, backbone) pair (``scratch`` is trained on every backbone of the grid).
Wherever a row is asked for, an init name is enough when that init has one backbone in the table; otherwise
pass ``(init, backbone)``.
"""

from __future__ import annotations

import gc
import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

__all__ = ["LOWER_IS_BETTER", "MIN_PAIRS", "SCRATCH", "bootstrap_ci", "case_values", "cliffs_delta", "best_row",
           "compare_inits", "compare_rows", "format_p", "friedman_nemenyi", "nemenyi_cd", "paired_case_values",
           "rank_biserial", "runs_cases_bootstrap_ci", "significance_matrix", "wilcoxon_test"]

ROW = ["init", "backbone"]
# The init of the supervised baseline (no pre-training), the reference every other init is compared with; defined
# here, the lowest layer that compares inits, and imported by the report.
SCRATCH = "scratch"
# Metrics where a smaller value is better (distances); every other metric is a score.
LOWER_IS_BETTER = frozenset({"hd95"})
# With n non-zero differences the smallest two-sided p of the exact signed-rank test is 2 / 2**n: 0.0625 for
# n = 5, so below 6 pairs the test cannot reject at 0.05 whatever the data; a p-value there misleads.
MIN_PAIRS = 6
# Differences are rounded before ranking so that floating-point residue (means of the same values taken over a
# different number of runs) is not mistaken for a difference or break a tie (see scipy.stats.wilcoxon's warning).
DIFFERENCE_DECIMALS = 12
# Exhaustive sign permutations are affordable (and deterministic) up to 2**13 = 8192 sign patterns.
MAX_PERMUTATION_PAIRS = 13
MAX_EXACT_PAIRS = 50

RowKey = str | tuple[str, str]


# --- per-case values ------------------------------------------------------------------------------------------

def case_values(per_case: pd.DataFrame, dataset: str, label_fraction: float, target: str = "mean",
                metric: str = "dice") -> pd.DataFrame:
    """One value per (init, backbone, case) of one dataset, label fraction and metric: columns init, backbone,
    case_id, value.

    A case's value is first averaged over the row's runs (every seed of every subset draw: repeated measures of
    the same case), then, for ``target="mean"``, over the case's targets. Both means skip NaN: a target that is
    NaN (both masks empty under the ``nan`` policy) does not count for that case, and a case with no defined
    value at all is dropped. Raises ``ValueError`` when nothing matches, when ``target`` is absent, or when a
    row mixes protocols (they would be averaged together).
    """
    rows = per_case[(per_case["dataset"] == dataset) & (per_case["metric"] == metric)
                    & np.isclose(per_case["label_fraction"].astype(float), label_fraction)]
    if rows.empty:
        raise ValueError(f"no {metric} rows for dataset {dataset!r} at label fraction {label_fraction:g}")
    protocols = rows.groupby(ROW)["protocol"].nunique()
    if (protocols > 1).any():
        raise ValueError(f"rows {list(protocols[protocols > 1].index)} mix protocols; select one protocol first")
    per_target = rows.groupby(ROW + ["case_id", "target"])["value"].mean()
    if target == "mean":
        values = per_target.groupby(level=ROW + ["case_id"]).mean()
    elif target in per_target.index.get_level_values("target"):
        values = per_target.xs(target, level="target")
    else:
        raise ValueError(f"target {target!r} not in the table (targets: {sorted(set(rows['target']))})")
    return values.dropna().rename("value").reset_index()


def _rows(values: pd.DataFrame) -> list[tuple[str, str]]:
    """The (init, backbone) rows of a case-value table, in its (sorted) order."""
    return list(dict.fromkeys(zip(values["init"], values["backbone"])))


def _resolve(key: RowKey, rows: list[tuple[str, str]]) -> tuple[str, str]:
    """The (init, backbone) row a key names; an init name must be unambiguous."""
    if isinstance(key, tuple):
        if key not in rows:
            raise ValueError(f"no row {key}; rows: {rows}")
        return key
    matches = [row for row in rows if row[0] == key]
    if len(matches) != 1:
        problem = "no row for" if not matches else "several backbones for"
        raise ValueError(f"{problem} init {key!r}; pass (init, backbone), rows: {rows}")
    return matches[0]


def _pair(values: pd.DataFrame, a: tuple[str, str], b: tuple[str, str]) -> pd.DataFrame:
    """Columns case_id, a, b on the cases both rows have (inner join), sorted by case."""
    def one(row: tuple[str, str], name: str) -> pd.DataFrame:
        mask = (values["init"] == row[0]) & (values["backbone"] == row[1])
        return values.loc[mask, ["case_id", "value"]].rename(columns={"value": name})
    return one(a, "a").merge(one(b, "b"), on="case_id", how="inner").sort_values("case_id", ignore_index=True)


def paired_case_values(per_case: pd.DataFrame, a: RowKey, b: RowKey, dataset: str, label_fraction: float,
                       target: str = "mean", metric: str = "dice") -> pd.DataFrame:
    """Values of rows ``a`` and ``b`` on identical test cases: columns case_id, a, b, one row per case.

    ``a`` and ``b`` are init names, or ``(init, backbone)`` where an init has several backbones. Seeds and subset
    draws are averaged per case before pairing, and the ``mean`` target is each case's NaN-skipping mean over its
    targets (see :func:`case_values`); only cases both rows have are kept.
    """
    values = case_values(per_case, dataset, label_fraction, target, metric)
    rows = _rows(values)
    return _pair(values, _resolve(a, rows), _resolve(b, rows))


# --- paired test and effect sizes -----------------------------------------------------------------------------

def rank_biserial(differences) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): ``(R+ - R-) / (R+ + R-)`` over the ranks of the
    absolute non-zero differences, the effect size that belongs to the signed-rank test (zeros are dropped, as the
    ``wilcox`` zero method does). +1: every case favours the first sample; 0 when no difference is non-zero.
    Hand-written: scipy has no rank-biserial correlation.
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def cliffs_delta(values_a, values_b) -> float:
    """Cliff's delta, ``P(a > b) - P(a < b)`` over all (a_i, b_j) pairs: the probability of superiority of one
    sample over the other, in [-1, 1]. It ignores the pairing (it is the unpaired dominance effect size,
    reported because it reads without reference to the test), and equals ``2 U / (n_a n_b) - 1`` with U the
    Mann-Whitney statistic. Hand-written: scipy has no Cliff's delta.
    """
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    return float(np.sign(np.subtract.outer(a, b)).mean())


def _wilcoxon_method(d: np.ndarray) -> tuple[str | stats.PermutationMethod, str]:
    """The p-value method and its description. Stated explicitly (it is the rule scipy's ``method="auto"``
    documents) so that the reported mode is the one used: the exact null distribution when the differences have
    no zeros or ties and n <= 50; with zeros or ties, which invalidate that distribution, an exhaustive
    sign-permutation test up to n = 13; otherwise the normal approximation (tie-corrected variance, no
    continuity correction).
    """
    has_ties_or_zeros = np.any(d == 0) or np.unique(np.abs(d)).size < d.size
    if not has_ties_or_zeros and d.size <= MAX_EXACT_PAIRS:
        return "exact", "exact"
    if has_ties_or_zeros and d.size <= MAX_PERMUTATION_PAIRS:
        return stats.PermutationMethod(), "permutation (exhaustive)"
    return "asymptotic", "asymptotic (normal)"


def wilcoxon_test(values_a, values_b) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired values (``scipy.stats.wilcoxon``), with effect sizes.

    ``zero_method="wilcox"``: zero differences (cases where both rows score the same, e.g. two Dice of 0) carry
    no sign and are discarded. The p-value method is reported in ``method`` (see :func:`_wilcoxon_method`).
    With fewer than :data:`MIN_PAIRS` non-zero differences ``p`` is NaN and ``reason`` says why: the test could
    not reach 0.05 on any data. Returns n_pairs, n_nonzero, statistic, p, method, reason, mean_difference,
    median_difference (of a - b), rank_biserial and cliffs_delta.
    """
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("paired values contain NaN; pair the cases first (paired_case_values)")
    d = np.round(a - b, DIFFERENCE_DECIMALS)
    n_nonzero = int(np.count_nonzero(d))
    result = {"n_pairs": int(d.size), "n_nonzero": n_nonzero, "statistic": math.nan, "p": math.nan,
              "method": None, "reason": None,
              "mean_difference": float(d.mean()) if d.size else math.nan,
              "median_difference": float(np.median(d)) if d.size else math.nan,
              "rank_biserial": rank_biserial(d), "cliffs_delta": cliffs_delta(a, b) if d.size else math.nan}
    if n_nonzero < MIN_PAIRS:
        result["reason"] = (f"{n_nonzero} non-zero paired difference(s) of {d.size} pairs: fewer than {MIN_PAIRS}, "
                            f"the signed-rank test cannot reach p < 0.05")
        return result
    method, result["method"] = _wilcoxon_method(d)
    test = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method=method)
    result.update(statistic=float(test.statistic), p=float(test.pvalue))
    return result


def _holm(p_values) -> np.ndarray:
    """Holm-corrected p-values (statsmodels); NaN p-values (untested comparisons) stay NaN and are not counted in
    the family."""
    p = np.asarray(p_values, dtype=float)
    corrected = np.full(p.shape, math.nan)
    tested = ~np.isnan(p)
    if tested.any():
        # statsmodels' Holm ends in gc.collect(), 0.3-0.5 s a call once torch and matplotlib are loaded; objects
        # frozen beforehand are not scanned (the collection itself still runs)
        gc.freeze()
        try:
            corrected[tested] = multipletests(p[tested], method="holm")[1]
        finally:
            gc.unfreeze()
    return corrected


def format_p(p: float) -> str:
    """A p-value as tables and figures print it: three decimals, ``<0.001`` below, ``–`` where not tested."""
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


# --- comparison tables ----------------------------------------------------------------------------------------

def _row_means(values: pd.DataFrame) -> pd.Series:
    return values.groupby(ROW, sort=False)["value"].mean()


def best_row(values: pd.DataFrame, metric: str) -> tuple[str, str]:
    """The (init, backbone) with the best mean over its case values: highest, lowest for distances (HD95)."""
    means = _row_means(values)
    return means.idxmin() if metric in LOWER_IS_BETTER else means.idxmax()


def _reference_for(row: tuple[str, str], reference: RowKey, rows: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The reference row a row is compared with: ``(init, backbone)`` as given; for an init name, that init on the
    row's own backbone, so that an init is measured against the supervised baseline of its architecture and not
    against another network's (None where that backbone has no such row: the row is compared with the best only).
    """
    if isinstance(reference, tuple):
        return reference
    return (reference, row[1]) if (reference, row[1]) in rows else None


def compare_rows(values: pd.DataFrame, reference: RowKey = SCRATCH, metric: str = "dice") -> pd.DataFrame:
    """The tests of :func:`compare_inits` on a case-value table (:func:`case_values`), without its context
    columns and without checking that the reference exists (the leaderboard ranks tables without scratch)."""
    rows = _rows(values)
    best = best_row(values, metric)
    comparisons, seen = [], set()
    for versus, other_of in (("reference", lambda row: _reference_for(row, reference, rows)),
                             ("best", lambda row: best)):
        for row in rows:
            other = other_of(row)
            if other is not None and row != other and frozenset((row, other)) not in seen:
                seen.add(frozenset((row, other)))
                comparisons.append((versus, row, other))
    lines = []
    for versus, row, other in comparisons:
        pair = _pair(values, row, other)
        test = wilcoxon_test(pair["a"], pair["b"])
        n_cases = test.pop("n_pairs")
        lines.append({"init": row[0], "backbone": row[1], "versus": versus, "other_init": other[0],
                      "other_backbone": other[1], "n_cases": n_cases, "mean": pair["a"].mean(),
                      "other_mean": pair["b"].mean(), **test})
    table = pd.DataFrame(lines)
    if not table.empty:
        table["p_holm"] = _holm(table["p"])
    return table


def compare_inits(per_case: pd.DataFrame, reference: RowKey = SCRATCH, *, dataset: str, label_fraction: float,
                  metric: str = "dice", target: str = "mean") -> pd.DataFrame:
    """Every row (init, backbone) against the reference and against the best row, one line per comparison.

    ``reference``: an init name, compared on each row's own backbone (a row on a backbone the reference init was
    not trained on is compared with the best row only), or ``(init, backbone)``, one row every other is compared
    with. The best row is the one with the best mean over its cases (highest; lowest for distances such as HD95).
    A pair is tested once: the best row's comparison with the reference is listed under ``versus="reference"``
    and not again under ``"best"``. Differences are row minus comparator (positive: the row scores higher).
    ``p_holm`` is Holm-corrected across the tested comparisons of this table (one family per dataset, fraction,
    metric and target). Columns: dataset, label_fraction, metric, target, init, backbone, versus, other_init,
    other_backbone, n_cases, mean, other_mean and the fields of :func:`wilcoxon_test` except n_pairs, plus p_holm.
    Raises ``ValueError`` when the reference names no row of the table.
    """
    values = case_values(per_case, dataset, label_fraction, target, metric)
    rows = _rows(values)
    if isinstance(reference, tuple):
        _resolve(reference, rows)
    elif reference not in {init for init, _ in rows}:
        raise ValueError(f"no row for reference init {reference!r}; rows: {rows}")
    table = compare_rows(values, reference, metric)
    context = {"dataset": dataset, "label_fraction": label_fraction, "metric": metric, "target": target}
    return table.assign(**context)[[*context, *table.columns]] if not table.empty else table


def _labels(rows: list[tuple[str, str]]) -> list[str]:
    """Init names, with the backbone added for an init that has several."""
    counts = pd.Series([init for init, _ in rows]).value_counts()
    return [init if counts[init] == 1 else f"{init} ({backbone})" for init, backbone in rows]


def significance_matrix(per_case: pd.DataFrame, dataset: str, label_fraction: float, metric: str = "dice",
                        target: str = "mean") -> pd.DataFrame:
    """Holm-corrected Wilcoxon p-values of every pair of rows (symmetric, NaN on the diagonal and where a pair
    has too few cases), for a heat-map. The family is all k(k-1)/2 pairs of the matrix. Index and columns are
    the init names (``init (backbone)`` for an init on several backbones).
    """
    values = case_values(per_case, dataset, label_fraction, target, metric)
    rows = _rows(values)
    pairs = list(itertools.combinations(range(len(rows)), 2))
    p = []
    for i, j in pairs:
        pair = _pair(values, rows[i], rows[j])
        p.append(wilcoxon_test(pair["a"], pair["b"])["p"])
    matrix = np.full((len(rows), len(rows)), math.nan)
    for (i, j), corrected in zip(pairs, _holm(p)):
        matrix[i, j] = matrix[j, i] = corrected
    labels = _labels(rows)
    return pd.DataFrame(matrix, index=labels, columns=labels)


# --- bootstrap and ranks --------------------------------------------------------------------------------------

def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Bootstrap confidence interval of the mean over cases (``scipy.stats.bootstrap``, BCa).

    BCa (bias-corrected and accelerated) rather than the plain percentile interval because per-case Dice is
    bounded and skewed (a few failed cases in a long low tail), which BCa corrects for and the percentile interval
    does not. Resampling units are cases (seed-averaged values, as from :func:`case_values`). The generator is
    seeded, so the interval is reproducible. With all values equal the interval is the single value (BCa is
    undefined there); with fewer than two values it is NaN. Returns mean, low, high, n, confidence, method.
    """
    x = np.asarray(values, dtype=float)
    result = {"mean": float(x.mean()) if x.size else math.nan, "low": math.nan, "high": math.nan, "n": int(x.size),
              "confidence": confidence, "method": "BCa"}
    if x.size < 2:
        return result
    if np.ptp(x) == 0:
        return result | {"low": result["mean"], "high": result["mean"]}
    interval = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                               method="BCa", rng=np.random.default_rng(seed)).confidence_interval
    return result | {"low": float(interval.low), "high": float(interval.high)}


def runs_cases_bootstrap_ci(matrix, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Bootstrap confidence interval of the mean of a runs × test cases matrix, resampling runs and cases
    independently (a two-way bootstrap: each resample draws runs with replacement and cases with replacement, and
    takes the mean of the cells they cross).

    Both vary: runs by seed and subset draw, cases by difficulty. An interval across runs alone (a t-interval) is
    undefined for one run and ±12.7 standard errors for two, spanning Dice 0 to 1; an interval across cases alone
    (:func:`bootstrap_ci`) leaves seed noise out. Resampling both keeps both sources. A NaN cell (a case a run has
    no value for) is left out of each resample's mean. Percentile interval: BCa's jackknife has no two-way form.
    Hand-written: ``scipy.stats.bootstrap`` draws one set of indices shared by its samples. Resamples are drawn as
    counts (multinomial), so the cost is n_resamples × cases, whatever the number of runs. With fewer than two
    defined cells the bounds are NaN. Returns mean, low, high, n_runs, n_cases, confidence, method.
    """
    x = np.asarray(matrix, dtype=float)
    defined = ~np.isnan(x)
    n_runs, n_cases = x.shape
    result = {"mean": float(x[defined].mean()) if defined.any() else math.nan, "low": math.nan, "high": math.nan,
              "n_runs": n_runs, "n_cases": n_cases, "confidence": confidence, "method": "percentile (runs × cases)"}
    if defined.sum() < 2:
        return result
    rng = np.random.default_rng(seed)
    runs = rng.multinomial(n_runs, np.full(n_runs, 1 / n_runs), size=n_resamples)
    cases = rng.multinomial(n_cases, np.full(n_cases, 1 / n_cases), size=n_resamples)
    totals = ((runs @ np.where(defined, x, 0.0)) * cases).sum(axis=1)
    counts = ((runs @ defined) * cases).sum(axis=1)
    means = totals[counts > 0] / counts[counts > 0]
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return result | {"low": float(low), "high": float(high)}


def nemenyi_cd(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks (Demšar 2006, eq. for CD):
    ``CD = q_alpha * sqrt(k (k + 1) / (6 N))``, with ``q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)``
    (the studentized range statistic of k means with infinite degrees of freedom, over sqrt 2; 2.569 for k = 4 at
    alpha = 0.05, as in Demšar's table 5)."""
    q_alpha = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q_alpha * math.sqrt(k * (k + 1) / (6 * n_blocks)))


def friedman_nemenyi(scores: pd.DataFrame, alpha: float = 0.05, higher_is_better: bool = True) -> dict:
    """Friedman test over blocks and the Nemenyi post-hoc critical difference (Demšar 2006).

    ``scores``: one row per block (a dataset, or dataset x fraction), one column per init, values the block's
    summary score (e.g. mean Dice). The blocks are the independent units here, so a complete block is required
    (rows with NaN raise). Ranks are within each block, 1 = best (ties share the average rank); the Friedman
    statistic and p are ``scipy.stats.friedmanchisquare``'s (the chi-square form, which Demšar notes is
    conservative for few blocks). Two inits differ significantly when their average ranks differ by more than
    the critical difference (:func:`nemenyi_cd`). Needs >= 2 blocks and >= 3 inits (``ValueError`` otherwise).
    Returns statistic, p, n_blocks, k, alpha, ranks (Series, best first), cd and significant_pairs (list of
    (init, init, rank difference), better-ranked init first).
    """
    n_blocks, k = scores.shape
    if n_blocks < 2 or k < 3:
        raise ValueError(f"Friedman/Nemenyi needs >= 2 blocks and >= 3 inits, got {n_blocks} x {k}")
    incomplete = scores.index[scores.isna().any(axis=1)]
    if len(incomplete):
        raise ValueError(f"blocks {list(incomplete)} miss scores; the Friedman test needs complete blocks")
    test = stats.friedmanchisquare(*(scores[column].to_numpy(dtype=float) for column in scores.columns))
    ranks = scores.rank(axis=1, ascending=not higher_is_better).mean().sort_values()
    cd = nemenyi_cd(k, n_blocks, alpha)
    significant = [(a, b, float(ranks[b] - ranks[a])) for a, b in itertools.combinations(ranks.index, 2)
                   if ranks[b] - ranks[a] > cd]
    return {"statistic": float(test.statistic), "p": float(test.pvalue), "n_blocks": n_blocks, "k": k,
            "alpha": alpha, "ranks": ranks, "cd": cd, "significant_pairs": significant}

"""search.stats against scipy's reference implementations on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from search.stats import compare


def items(values, task="t", coefs=None):
    values = list(map(float, values))
    n = len(values)
    return {"tasks": [task] * n if isinstance(task, str) else list(task), "values": values,
            "coefs": coefs or [1 / n] * n}


def test_mcnemar_exact_matches_scipy_binomtest():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 120)
    cand = base.copy()
    flip_up = np.flatnonzero(base == 0)[:14]  # 14 items the candidate gets right and the baseline wrong
    flip_down = np.flatnonzero(base == 1)[:5]  # 5 the other way
    cand[flip_up], cand[flip_down] = 1, 0
    (row,) = [d for d in compare(items(base), items(cand)) if d.name == "t"]
    assert row.test == "McNemar exact"
    assert row.p_value == pytest.approx(sp.binomtest(14, 19, 0.5).pvalue, rel=1e-12)
    assert row.diff == pytest.approx((14 - 5) / 120)
    assert row.significant == (row.p_value < 0.05)


def test_sign_flip_exact_matches_scipy_permutation_test():
    rng = np.random.default_rng(2)
    base = rng.random(11)
    cand = base + rng.normal(0.15, 0.2, 11)
    (row,) = [d for d in compare(items(base), items(cand)) if d.name == "t"]
    ref = sp.permutation_test((cand, base), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                              permutation_type="samples", n_resamples=2**11, alternative="two-sided")
    assert row.test == "sign-flip exact"
    assert row.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_sign_flip_random_draws_agree_with_scipy():
    rng = np.random.default_rng(3)
    base = rng.random(300)
    cand = base + rng.normal(0.012, 0.2, 300)
    (row,) = [d for d in compare(items(base), items(cand), resamples=40000) if d.name == "t"]
    ref = sp.permutation_test((cand, base), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                              permutation_type="samples", n_resamples=40000, alternative="two-sided",
                              rng=np.random.default_rng(0))
    assert row.test == "sign-flip (40000 draws)"
    assert 0.02 < ref.pvalue < 0.5  # a borderline case, where a wrong null would show
    assert row.p_value == pytest.approx(ref.pvalue, abs=0.012)


def test_bootstrap_interval_agrees_with_scipy_paired_percentile():
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2, 200).astype(float)
    cand = np.where(rng.random(200) < 0.2, 1.0, base)
    (row,) = [d for d in compare(items(base), items(cand), resamples=40000) if d.name == "t"]
    ref = sp.bootstrap((cand, base), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                       paired=True, vectorized=True, method="percentile", n_resamples=40000,
                       confidence_level=0.95, rng=np.random.default_rng(0))
    assert row.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert row.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.006)
    assert row.ci_low < row.diff < row.ci_high


def test_weighted_row_is_the_suite_score_difference_and_resamples_within_tasks():
    rng = np.random.default_rng(5)
    n_a, n_b = 150, 50
    tasks = ["a"] * n_a + ["b"] * n_b
    coefs = [0.75 / n_a] * n_a + [0.25 / n_b] * n_b  # task a weighs 3, task b 1
    base = rng.integers(0, 2, n_a + n_b).astype(float)
    cand = base.copy()
    cand[:n_a] = np.where(rng.random(n_a) < 0.3, 1.0, base[:n_a])  # a gains
    cand[n_a:] = np.where(rng.random(n_b) < 0.3, 0.0, base[n_a:])  # b loses
    rows = {d.name: d for d in compare(items(base, tasks, coefs), items(cand, tasks, coefs))}
    diff_a = cand[:n_a].mean() - base[:n_a].mean()
    diff_b = cand[n_a:].mean() - base[n_a:].mean()
    assert rows["a"].diff == pytest.approx(diff_a)
    assert rows["b"].diff == pytest.approx(diff_b)
    assert rows["weighted"].diff == pytest.approx(0.75 * diff_a + 0.25 * diff_b)
    assert rows["weighted"].baseline == pytest.approx(float(np.dot(coefs, base)))
    assert rows["weighted"].test.startswith("sign-flip")
    assert rows["a"].significant and rows["a"].p_value < 1e-4
    assert rows["weighted"].ci_low < rows["weighted"].diff < rows["weighted"].ci_high
    # the weighted interval is narrower than task b's alone, which has a third of the items
    assert rows["weighted"].ci_high - rows["weighted"].ci_low < rows["b"].ci_high - rows["b"].ci_low


def test_no_gain_is_not_significant():
    rng = np.random.default_rng(6)
    base = rng.integers(0, 2, 200).astype(float)
    cand = base.copy()
    swap = rng.choice(200, 20, replace=False)
    cand[swap] = 1 - cand[swap]  # 20 items change, in both directions
    (row,) = [d for d in compare(items(base), items(cand)) if d.name == "t"]
    assert not row.significant and row.p_value > 0.05
    assert row.ci_low < 0 < row.ci_high
    assert "not significant" in row.verdict(0.95)
    same = compare(items(base), items(base))
    assert all(d.p_value == 1.0 and not d.significant and d.diff == 0 for d in same)


def test_items_must_pair():
    with pytest.raises(ValueError, match="same items"):
        compare(items([1, 0, 1]), items([1, 0]))


def test_corpus_level_metric_gets_no_item_statistics():
    base = items([1, 0, float("nan")])
    rows = compare(base, base)
    assert rows == []

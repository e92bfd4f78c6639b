"""Is a gain real? Paired comparisons of two candidates scored on the same items.

Both candidates are scored on one split, so their item values pair up (objectives.suite.ItemValues).
For each task, and for the weighted score, this module gives the difference (candidate - baseline),
a paired bootstrap percentile confidence interval and a two-sided p-value:

- the bootstrap resamples items with replacement within each task (stratified, so every resample
  keeps each task's weight in the weighted score), B resamples;
- the p-value is a paired sign-flip (randomisation) test: under "no difference" either model's value
  of an item is equally likely to be the other's, so the sign of each item's difference is a coin
  flip. When every non-zero difference has the same size (one task of 0/1 items, the usual case)
  that distribution is binomial and the test is McNemar's exact test; with at most 16 non-zero
  differences it is enumerated; otherwise it is estimated from B random sign flips, p = (1 + hits) /
  (1 + B). Two-sided as scipy defines it: twice the smaller one-sided p, capped at 1.

A difference is called significant when p < alpha.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

EXACT_FLIPS = 16  # enumerate all 2^m sign patterns up to this many non-zero differences
_CHUNK = 1_000_000  # bootstrap draws per batch (indices held in memory at once)


@dataclass(frozen=True)
class Difference:
    """Candidate minus baseline on one task (or the weighted score), with its uncertainty."""

    name: str  # a task name, or "weighted"
    baseline: float
    candidate: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # "McNemar exact", "sign-flip exact" or "sign-flip (B draws)"
    n_items: int
    significant: bool

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def verdict(self, confidence: float) -> str:
        """One phrase a user can act on."""
        ci = f"{confidence:.0%} CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}], p = {self.p_value:.3g}"
        if not self.significant:
            return f"{self.diff:+.4f}: not significant ({ci})"
        return f"{self.diff:+.4f}: significant {'gain' if self.diff > 0 else 'loss'} ({ci})"


def compare(baseline: dict, candidate: dict, alpha: float = 0.05, resamples: int = 10000,
            seed: int = 0) -> list[Difference]:
    """Per task and weighted: candidate against baseline on the same items (ItemValues.as_dict forms).

    Tasks with a non-finite item value (metrics lm-eval only aggregates over the whole corpus) get no
    item-level statistics and are left out, as is then the weighted row.
    """
    tasks, coefs = baseline["tasks"], np.asarray(baseline["coefs"], dtype=np.float64)
    if list(tasks) != list(candidate["tasks"]) or len(coefs) != len(candidate["values"]):
        raise ValueError("the two candidates were not scored on the same items")
    base = np.asarray(baseline["values"], dtype=np.float64)
    cand = np.asarray(candidate["values"], dtype=np.float64)
    names = list(dict.fromkeys(tasks))
    groups = {name: np.flatnonzero(np.asarray(tasks) == name) for name in names}
    finite = {name: bool(np.isfinite(base[ix]).all() and np.isfinite(cand[ix]).all()) for name, ix in groups.items()}
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        if finite[name]:
            ix = groups[name]
            out.append(_difference(name, {name: ix}, base, cand, coefs, alpha, resamples, rng))
    if len(names) > 1 and all(finite.values()):
        out.append(_difference("weighted", groups, base, cand, coefs, alpha, resamples, rng))
    elif len(names) == 1 and out:
        out.append(Difference(**{**out[0].as_dict(), "name": "weighted"}))
    return out


def _difference(name: str, groups: dict[str, np.ndarray], base: np.ndarray, cand: np.ndarray, coefs: np.ndarray,
                alpha: float, resamples: int, rng: np.random.Generator) -> Difference:
    """Statistics of sum_t share_t * (coef-weighted mean difference in task t) over `groups`."""
    shares = {t: coefs[ix].sum() for t, ix in groups.items()}
    total = sum(shares.values())
    weight = np.zeros_like(coefs)  # each item's weight in the compared score (sums to 1)
    for ix in groups.values():
        weight[ix] = coefs[ix] / total
    every = np.concatenate(list(groups.values()))
    b = float((weight[every] * base[every]).sum())
    c = float((weight[every] * cand[every]).sum())
    low, high = bootstrap_ci(groups, cand - base, coefs, {t: s / total for t, s in shares.items()},
                             alpha, resamples, rng)
    p, test = sign_flip_p(weight[every] * (cand[every] - base[every]), resamples, rng,
                          binary=_binary(base[every]) and _binary(cand[every]) and len(groups) == 1)
    return Difference(name, b, c, c - b, low, high, p, test, int(every.size), p < alpha)


def bootstrap_ci(groups: dict[str, np.ndarray], diffs: np.ndarray, coefs: np.ndarray, shares: dict[str, float],
                 alpha: float, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of the weighted difference, items resampled within each task."""
    stat = np.zeros(resamples)
    for t, ix in groups.items():
        n = ix.size
        d, c = diffs[ix], coefs[ix]
        per_batch = max(1, _CHUNK // n)
        for start in range(0, resamples, per_batch):
            stop = min(resamples, start + per_batch)
            draw = rng.integers(0, n, size=(stop - start, n))
            w = c[draw]
            stat[start:stop] += shares[t] * (w * d[draw]).sum(axis=1) / w.sum(axis=1)
    low, high = np.quantile(stat, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_flip_p(weighted_diffs: np.ndarray, resamples: int, rng: np.random.Generator,
                binary: bool = False) -> tuple[float, str]:
    """Two-sided p-value of sum(weighted_diffs) under random signs, and the name of the test used."""
    nz = weighted_diffs[weighted_diffs != 0]
    m = nz.size
    if m == 0:
        return 1.0, "McNemar exact" if binary else "sign-flip exact"
    observed = float(nz.sum())
    tol = 1e-9 * max(1.0, float(np.abs(nz).sum()))
    if np.allclose(np.abs(nz), abs(nz[0]), rtol=1e-12, atol=0):
        # Every flip moves the sum by the same step: the null is binomial (McNemar's exact test).
        k = int((nz > 0).sum())
        less = sum(math.comb(m, j) for j in range(0, k + 1)) / 2**m
        greater = sum(math.comb(m, j) for j in range(k, m + 1)) / 2**m
        return min(1.0, 2 * min(less, greater)), "McNemar exact" if binary else "sign-flip exact"
    if m <= EXACT_FLIPS:
        signs = ((np.arange(2**m)[:, None] >> np.arange(m)) & 1) * 2 - 1
        null = signs @ nz
        label = "sign-flip exact"
    else:
        null = np.empty(resamples)
        per_batch = max(1, _CHUNK // m)
        for start in range(0, resamples, per_batch):
            stop = min(resamples, start + per_batch)
            signs = rng.integers(0, 2, size=(stop - start, m)) * 2 - 1
            null[start:stop] = signs @ nz
        label = f"sign-flip ({resamples} draws)"
    less, greater = (null <= observed + tol).sum(), (null >= observed - tol).sum()
    if m <= EXACT_FLIPS:
        p = 2 * min(less, greater) / null.size
    else:
        p = 2 * (1 + min(less, greater)) / (1 + null.size)
    return min(1.0, float(p)), label


def _binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())

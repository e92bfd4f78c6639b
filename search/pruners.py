"""Stopping a candidate's scoring early: the pruners a study's `pruner.type` names.

The trial loop scores the search items in the suite's seeded order (objectives.suite: the mean of
the item values over all items is the weighted search score, over the first k an unbiased estimate
of it) and compares the candidate with the best trial so far on the items both scored.

- `racing` (search.pruners.Race): stop once the candidate is confidently worse than the k-th best
  trial (k = selection.top_k, the candidates the final pick is made from; no pruning until k trials
  are fully scored) on the whole search set. Racing against the best alone stopped nearly every
  candidate after a lucky best and left the pick a thin pool (BENCHMARKS.md). With d the paired
  differences (candidate - k-th best) on the n shared items of N, the
  full-set difference is estimated by mean(d), with standard error sd(d) / sqrt(n) * sqrt((N - n) /
  (N - 1)): the finite-population factor says that once most of the search set is scored little is
  left to learn, so a candidate that trails by a small margin late is stopped too. Stop when
  mean(d) + z * stderr < 0, z the one-sided normal quantile of 1 - p_threshold. It runs in the
  worker: the k-th best's item values are read once when the trial starts (one storage read) and the
  candidate's values are stored once when it ends (one write), where Optuna's pruners need a storage
  write per item (trial.report), which costs more than scoring a small model's item.
- `wilcoxon`: Optuna's WilcoxonPruner (a signed-rank test on the shared items, reported item by item).
- `none`: every candidate scores every item.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import optuna


class Race:
    """Whether a candidate's item values so far are confidently worse than the incumbent's.

    Call `lost` with the candidate's growing list of values: the paired differences are summed as
    they arrive, so each check costs the items added since the last one, not all items so far.
    """

    def __init__(self, n_items: int, p_threshold: float = 0.1, n_startup_steps: int = 20):
        self.n_items = n_items
        self.z = NormalDist().inv_cdf(1 - p_threshold)
        self.n_startup_steps = max(2, n_startup_steps)
        self._lists: tuple[int, int] | None = None  # ids of the (mine, incumbent) lists the sums belong to
        self._n, self._sum, self._squares = 0, 0.0, 0.0

    def lost(self, mine: list[float], incumbent: list[float] | None) -> bool:
        """True when the upper confidence bound of (mine - incumbent) on the full search set is below 0."""
        if not incumbent:
            return False
        if self._lists != (id(mine), id(incumbent)) or len(mine) < self._n:  # another race: start again
            self._lists, self._n, self._sum, self._squares = (id(mine), id(incumbent)), 0, 0.0, 0.0
        n = min(len(mine), len(incumbent))  # both are values of the same items in the same order
        for a, b in zip(mine[self._n:n], incumbent[self._n:n], strict=True):
            self._sum += a - b
            self._squares += (a - b) ** 2
        self._n = n
        if n < self.n_startup_steps:
            return False
        mean = self._sum / n
        var = max(0.0, (self._squares - self._sum * mean) / (n - 1))
        remaining = max(0.0, (self.n_items - n) / (self.n_items - 1)) if self.n_items > 1 else 0.0
        return mean + self.z * math.sqrt(var / n * remaining) < 0


def optuna_pruner(kind: str, p_threshold: float, n_startup_steps: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a study: Wilcoxon's, or none (racing decides in the worker)."""
    if kind == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=n_startup_steps)
    return optuna.pruners.NopPruner()

"""Stopping a candidate's scoring early: the pruners a study's `pruner.type` names.

The trial loop scores the search items in the suite's seeded order (objectives.suite: the mean of
the item values over all items is the weighted search score, over the first k an unbiased estimate
of it) and compares the candidate with a fully scored trial on the items both scored.

- `racing` (search.pruners.Race): stop once the candidate is confidently worse, on the whole search
  set, than the best fully scored trial (`against: best`, the default) or the k-th best (`against:
  top_k`, k = selection.top_k, the pool the final pick is made from; no pruning until k trials are
  fully scored). With d the paired differences (candidate - that trial) on the n shared items of N,
  the full-set difference is estimated by mean(d), with standard error sd(d) / sqrt(n) *
  sqrt((N - n) / (N - 1)): the finite-population factor says that once most of the search set is
  scored little is left to learn, so a candidate that trails by a small margin late is stopped too.
  Stop when mean(d) <= 0 and mean(d) + z * stderr < margin: the candidate is not ahead and cannot
  beat that trial by more than `margin` (an indifference zone, as in ranking-and-selection
  procedures; default 0.01 of the weighted score). With margin 0 a candidate level with the best is
  never stopped, and a search's many proposals near the best run to the last item; the margin ends
  those races once the items say the gain could only be smaller than it (BENCHMARKS.md, "Pruners,
  third round"). A candidate ahead is never stopped: it may become the new best. The spread of d
  counts one extra item that differs by as much as one item can (Race.stderr), so candidates that
  agree on the first few dozen items are not stopped on that alone. With `boundary: anytime` (the
  default) z is the normal-mixture boundary (Race.z_at), which holds at every check at once: a
  candidate better than the one it races by the margin is stopped with probability at most
  p_threshold over its whole race. With `boundary: per_look` z
  is the normal quantile of 1 - p_threshold at each check, and over the checks of a race such a
  candidate is stopped far more often (58% at p 0.1, checked every 5 of 300 items:
  tests/search/test_pruning.py measures it); racing the best with that bound cost quality, racing
  the 5th best cost items (BENCHMARKS.md, "Search quality"). It runs in the worker: the raced
  trial's item values are read once when the trial starts (one storage read) and the candidate's
  values are stored once when it ends (one write), where Optuna's pruners need a storage write per
  item (trial.report), which costs more than scoring a small model's item.
- `wilcoxon`: Optuna's WilcoxonPruner (a signed-rank test on the shared items, reported item by item).
- `none`: every candidate scores every item.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import optuna


class Race:
    """Whether a candidate's paired differences so far are confidently worse than the incumbent's.

    The differences (candidate - incumbent) arrive item by item with `add`; `lost` checks the bound.
    """

    def __init__(self, n_items: int, p_threshold: float = 0.1, n_startup_steps: int = 20, anytime: bool = False,
                 margin: float = 0.0, item_scale: float = 1.0):
        self.n_items = n_items
        self.p_threshold = p_threshold
        self.anytime = anytime
        self.margin = margin
        self.item_scale = item_scale
        self.z = NormalDist().inv_cdf(1 - p_threshold)
        self.n_startup_steps = max(2, n_startup_steps)
        self.n, self._sum, self._squares = 0, 0.0, 0.0

    def add(self, difference: float) -> None:
        """The next item's difference (candidate - incumbent)."""
        self.n += 1
        self._sum += difference
        self._squares += difference * difference

    def mean(self) -> float:
        """The estimated mean difference over the whole search set: the mean over the items so far."""
        return self._sum / self.n if self.n else 0.0

    def stderr(self) -> float:
        """Its standard error, with the finite-population factor for the items left.

        The spread of the differences counts one extra item that differs by a whole item (item_scale):
        two close candidates may agree on the first few dozen items, and a spread of 0 from them
        would end the race on no evidence.
        """
        n, N = self.n, self.n_items
        if n < 2 or N < 2:
            return 0.0
        spread = (max(0.0, self._squares - self._sum * self.mean()) + self.item_scale ** 2) / n
        return math.sqrt(spread / n * max(0.0, (N - n) / (N - 1)))

    def lost(self) -> bool:
        """True when the candidate is not ahead and its difference's upper confidence bound is below the margin.

        A candidate ahead so far is never stopped (it may become the new best): with a margin, one
        slightly better than the trial it races would otherwise be stopped on its last items (where
        the standard error shrinks to 0), having cost every item, and left out of the ranking it leads.
        """
        if self.n < self.n_startup_steps or self.n >= self.n_items:  # at the last item nothing is left to save
            return False
        return self.mean() <= 0 and self.mean() + self.z_at(self.n) * self.stderr() < self.margin

    def z_at(self, n: int) -> float:
        """The bound's width in standard errors after n items.

        per look: the normal quantile of 1 - p_threshold at every check, so a candidate as good as
        the incumbent is stopped with probability p_threshold at each check, more over a whole race.
        anytime: the normal-mixture boundary (Robbins; Howard et al. 2021, two-sided form), which holds at
        every n at once: such a candidate is stopped with probability at most p_threshold over the
        race. Its mixing variance is n_startup_steps items' worth, where the bound is tightest.
        """
        if not self.anytime:
            return self.z
        m = self.n_startup_steps
        return math.sqrt((n + m) / n * (math.log((n + m) / m) + 2 * math.log(1 / self.p_threshold)))


def optuna_pruner(kind: str, p_threshold: float, n_startup_steps: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a study: Wilcoxon's, or none (racing decides in the worker)."""
    if kind == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=n_startup_steps)
    return optuna.pruners.NopPruner()

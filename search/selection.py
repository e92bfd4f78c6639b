"""The final pick of a study and whether its gain over the baseline is real.

After hundreds of candidates against one search set, the best search score is biased upward (the
winner's curse): the top of the ranking is partly luck on those items. So the pick is made on items
that did not drive the search, and reported on items used for nothing else:

1. the top `selection.top_k` trials by search score (the baseline among them if it ranks there) are
   re-scored on the validation items; the best validation score is the pick (ties: better search
   score). A study without validation items picks the best search score.
2. the pick and the baseline are scored on the held-out items, item by item; search.stats gives the
   paired difference with its confidence interval and p-value, per task and weighted.

The summary is stored in the study attribute `selection` (status, notes and report read it); it is
recomputed when the study has new trials. Selection needs the model, so it runs in `search start`.
"""

from __future__ import annotations

import optuna

from search import results, stats
from search.trial_record import (
    HeldOut,
    selection_of,
    validation_of,
    write_late_holdout,
    write_selection,
    write_validation,
)


def finalize(study: optuna.Study, candidates, study_file) -> dict | None:
    """Pick the final merge, score it and the baseline on held-out items, store and return the summary."""
    cfg = study_file.selection
    suite = candidates.suite
    base = results.baseline_trial(study)
    top = results.ranked(study)[: cfg.top_k]
    if base is None or not top:
        return None
    n_finished = results.n_finished(study)
    done = selection_of(study)
    if done is not None and done.get("n_finished") == n_finished and done.get("top") == [r.number for r in top]:
        return done
    validation: dict[int, float] = {}
    if suite.n_items("validation"):
        for record in top:
            scored = validation_of(study, record.number)
            if scored is None:
                candidates.build(record.recipe)
                result = suite.evaluate(candidates.model, "validation", candidates.batch_size)
                scored = write_validation(study, record.number, result.score, result.task_scores)
            validation[record.number] = scored["score"]
        winner = max(top, key=lambda r: (validation[r.number], r.score, -r.number))
    else:
        winner = top[0]
    out = {"n_finished": n_finished, "top": [r.number for r in top], "validation": validation,
           "picked_on": "validation" if validation else "search", "winner": winner.number,
           "baseline": base.number, "alpha": cfg.alpha, "comparison": [], "gap": None, "baseline_gap": None}
    if suite.n_items("holdout"):
        held = {r.number: _holdout_items(study, candidates, r) for r in (base, winner)}
        rows = stats.compare(held[base.number].items, held[winner.number].items, cfg.alpha, cfg.resamples,
                             cfg.seed)
        order = {spec.name: i for i, spec in enumerate(suite.specs)}  # the study's task order, weighted last
        rows.sort(key=lambda row: order.get(row.name, len(order)))
        out["comparison"] = [row.as_dict() for row in rows]
        out["gap"] = winner.score - held[winner.number].score
        out["baseline_gap"] = base.score - held[base.number].score
    write_selection(study, out)
    return out


def _holdout_items(study: optuna.Study, candidates, record) -> HeldOut:
    """The trial's held-out scores with their item values, scored now if they were not kept."""
    if record.holdout is not None and record.holdout.items is not None:
        return record.holdout
    candidates.build(record.recipe)
    result = candidates.suite.evaluate(candidates.model, "holdout", candidates.batch_size)
    held = HeldOut(result.score, result.task_scores, result.metrics, items=result.items.as_dict())
    write_late_holdout(study, record.number, held)
    return held


def comparison_rows(selection: dict | None) -> list[stats.Difference]:
    """The stored comparison as Difference rows (per task, then weighted)."""
    return [stats.Difference(**row) for row in (selection or {}).get("comparison", [])]


def comparison_table(selection: dict) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted cells of the held-out comparison, one row per task then weighted.

    The terminal, the dashboard note and the HTML report all print these cells.
    """
    header = ["task", "baseline", "pick", "difference", f"{1 - selection['alpha']:.0%} CI", "p", "test"]
    cells = [[r.name, f"{r.baseline:.4f}", f"{r.candidate:.4f}", f"{r.diff:+.4f}" + ("" if r.significant else " n.s."),
              f"{r.ci_low:+.4f}..{r.ci_high:+.4f}", f"{r.p_value:.2g}", r.test] for r in comparison_rows(selection)]
    return header, cells


def how_picked(selection: dict) -> str:
    """How the final pick was made, in one sentence."""
    if selection["picked_on"] == "validation":
        return (f"trial {selection['winner']}: the best validation score among the top {len(selection['top'])} "
                "by search score (validation items took no part in the search)")
    return (f"trial {selection['winner']}: the best search score (the study has no validation items, so this "
            "pick's search score is biased upward; its held-out score is not)")


def verdict(selection: dict) -> str:
    """Whether the pick's weighted held-out gain over the baseline is real, in one sentence."""
    rows = [r for r in comparison_rows(selection) if r.name == "weighted"]
    if not rows:
        return "no held-out items: the gain over the baseline cannot be checked"
    row = rows[0]
    if selection["winner"] == selection["baseline"]:
        return "no gain over the baseline (not significant): the final pick is the baseline itself"
    return f"held-out gain of trial {selection['winner']} over the baseline: {row.verdict(1 - selection['alpha'])}"


def gap_sentence(selection: dict) -> str | None:
    """The pick's search-to-held-out gap against the baseline's (the winner's curse shows as the difference)."""
    if selection.get("gap") is None:
        return None
    excess = selection["gap"] - selection["baseline_gap"]
    return (f"search-to-held-out gap: {selection['gap']:+.4f} for the pick, {selection['baseline_gap']:+.4f} for the "
            f"baseline ({excess:+.4f}: how much the search score flatters the pick)")

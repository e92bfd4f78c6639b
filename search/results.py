"""Reading a study back: baseline, best, held-out scores, counts; what status/export/report show."""

from __future__ import annotations

import math

import optuna

TrialState = optuna.trial.TrialState


def scored(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials that scored every search item (pruned ones carry only a running mean)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get("pruned") and "score" in t.user_attrs]


def n_finished(study: optuna.Study) -> int:
    """COMPLETE + PRUNED trials: what the n_trials budget counts."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def counts(study: optuna.Study) -> dict[str, int]:
    """Complete (fully scored), pruned and failed trial counts."""
    trials = study.get_trials(deepcopy=False)
    pruned = sum(t.state == TrialState.PRUNED or (t.state == TrialState.COMPLETE and t.user_attrs.get("pruned"))
                 for t in trials)
    return {"n_complete": len(scored(study)), "n_pruned": pruned,
            "n_failed": sum(t.state == TrialState.FAIL for t in trials)}


def best_score(study: optuna.Study) -> float:
    """The best weighted search score so far, -inf when none."""
    return max((t.user_attrs["score"] for t in scored(study)), default=-math.inf)


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fully scored trials, best weighted score first (ties: earlier trial first)."""
    return sorted(scored(study), key=lambda t: (-t.user_attrs["score"], t.number))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial with the best weighted score on the search items."""
    top = ranked(study)
    return top[0] if top else None


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The hand-written baseline's trial (trial 0 unless it failed and was retried)."""
    return next((t for t in scored(study) if t.user_attrs.get("baseline")), None)


def holdout_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict | None:
    """Held-out scores of a trial: {"score", "task_scores", ...}, or None if never scored."""
    if "holdout_score" in trial.user_attrs:
        return {"score": trial.user_attrs["holdout_score"], "task_scores": trial.user_attrs.get("holdout_task_scores"),
                "metrics": trial.user_attrs.get("holdout_metrics")}
    return study.user_attrs.get(f"holdout.{trial.number}")


def trial_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> dict | None:
    """The status JSON entry of one trial."""
    if trial is None:
        return None
    held = holdout_of(study, trial)
    return {"number": trial.number, "value": trial.user_attrs["score"],
            "holdout": held["score"] if held else None, "params": dict(trial.params),
            "task_scores": trial.user_attrs.get("task_scores"),
            "holdout_task_scores": held.get("task_scores") if held else None}


def status(study: optuna.Study) -> dict:
    """What `search status --json` prints."""
    return {"study": study.study_name, **counts(study),
            "baseline": trial_summary(study, baseline_trial(study)),
            "best": trial_summary(study, best_trial(study))}

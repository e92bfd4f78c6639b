"""Reading a study back: baseline, best, held-out scores, counts; what status/export/report show."""

from __future__ import annotations

import math

import optuna

from search.trial_record import StudyRecord, TrialRecord, selection_of

TrialState = optuna.trial.TrialState


def records(study: optuna.Study, states: tuple | None = None) -> list[TrialRecord]:
    """The records of a study's trials (held-out scores folded in), in trial order."""
    study_record = StudyRecord.of(study)
    return [study_record.trial(t) for t in study.get_trials(deepcopy=False, states=states)]


def scored(study: optuna.Study) -> list[TrialRecord]:
    """COMPLETE trials that scored every search item (pruned ones carry only a running mean)."""
    return [r for r in records(study, (TrialState.COMPLETE,)) if r.fully_scored]


def n_finished(study: optuna.Study) -> int:
    """COMPLETE + PRUNED trials: what the n_trials budget counts."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def counts(study: optuna.Study) -> dict[str, int]:
    """Complete (fully scored), pruned and failed trial counts."""
    every = records(study)
    pruned = sum(r.state == TrialState.PRUNED or (r.state == TrialState.COMPLETE and r.pruned) for r in every)
    return {"n_complete": sum(r.fully_scored for r in every), "n_pruned": pruned,
            "n_failed": sum(r.state == TrialState.FAIL for r in every)}


def best_score(study: optuna.Study) -> float:
    """The best weighted search score so far, -inf when none."""
    return max((r.score for r in scored(study)), default=-math.inf)


def ranked(study: optuna.Study) -> list[TrialRecord]:
    """Fully scored trials, best weighted score first (ties: earlier trial first)."""
    return sorted(scored(study), key=lambda r: (-r.score, r.number))


def best_trial(study: optuna.Study) -> TrialRecord | None:
    """The trial with the best weighted score on the search items."""
    top = ranked(study)
    return top[0] if top else None


def final_pick(study: optuna.Study) -> TrialRecord | None:
    """The merge to publish: the selection's winner once `search start` made it, else the best search score."""
    chosen = selection_of(study)
    if chosen:
        pick = next((r for r in scored(study) if r.number == chosen["winner"]), None)
        if pick is not None:
            return pick
    return best_trial(study)


def baseline_trial(study: optuna.Study) -> TrialRecord | None:
    """The hand-written baseline's trial (trial 0 unless it failed and was retried)."""
    return next((r for r in scored(study) if r.baseline), None)


def trial_summary(record: TrialRecord | None) -> dict | None:
    """The status JSON entry of one trial."""
    if record is None:
        return None
    held = record.holdout
    return {"number": record.number, "value": record.score,
            "holdout": held.score if held else None, "params": dict(record.params),
            "task_scores": record.task_scores,
            "holdout_task_scores": held.task_scores if held else None}


def status(study: optuna.Study) -> dict:
    """What `search status --json` prints."""
    return {"study": study.study_name, **counts(study),
            "baseline": trial_summary(baseline_trial(study)),
            "best": trial_summary(best_trial(study)),
            "final_pick": trial_summary(final_pick(study)),
            "selection": selection_of(study)}

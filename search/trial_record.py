"""One typed record of a trial: what the trial loop writes and what status/export/notes/figures read.

This module is the only place that knows the storage keys. A record field declares its key with
`stored("key")`; `TrialRecord.of` reads every such field, `write` stores fields by name on a running
trial. Keys are the ones earlier versions wrote, so older studies stay readable. Held-out scores live
on the trial (`holdout_*`), or in a study attribute `holdout.<number>` when they were scored after the
trial finished (`write_late_holdout`); `StudyRecord` folds both into `TrialRecord.holdout`.

To add a field: declare it here with `stored("new_key")` (a default keeps older studies readable),
write it with `write(trial, new_field=...)`, read it as `record.new_field`.
The worker bookkeeping (slot, owner, heartbeat, retry history, the n_trials budget) is
search/workers.py's own concern and stays there; so do the parents' fingerprints (search/runner.py).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import optuna

TrialState = optuna.trial.TrialState
KEY = "merge_search_key"  # dataclass field metadata: the storage key of a stored field

# Study user attributes read back by status/notes/figures.
TASK_NAMES = "task_names"
SLICE_LENGTHS = "slice_lengths"
PARENTS = "parents"  # study user attr: fingerprints of the parents its trials were scored with
LORA_MERGE_DTYPE = "lora_merge_dtype"  # study user attr: the dtype its parents' adapters were applied in
BASELINE_RECIPE = "baseline_recipe"
LATE_HOLDOUT = "holdout."  # + trial number: held-out scores written after the trial finished
VALIDATION = "validation."  # + trial number: {"score", "task_scores"} on the validation items
SELECTION = "selection"  # the final pick and its comparison with the baseline (search/selection.py)


def stored(key: str, default: Any = None, factory: Any = None) -> Any:
    """A record field kept in the trial's user attribute `key`."""
    if factory is not None:
        return field(default_factory=factory, metadata={KEY: key})
    return field(default=default, metadata={KEY: key})


@dataclass(frozen=True)
class HeldOut:
    """Scores on the held-out items (never seen by the search)."""

    score: float
    task_scores: dict[str, float] | None = None
    metrics: dict | None = None
    seconds: float | None = None  # None when scored after the trial (not timed)
    items: dict | None = None  # objectives.ItemValues.as_dict(): per-item values for paired tests

    def as_dict(self) -> dict:
        """The dict stored in a `holdout.<number>` study attribute."""
        return {"score": self.score, "task_scores": self.task_scores, "metrics": self.metrics, "items": self.items}

    @classmethod
    def from_dict(cls, data: dict | None) -> HeldOut | None:
        """A study attribute `holdout.<number>` as a record, None when absent."""
        if not isinstance(data, dict) or data.get("score") is None:
            return None
        return cls(data["score"], data.get("task_scores"), data.get("metrics"), data.get("seconds"), data.get("items"))


# The trial attributes that make up HeldOut, one per field (the study attribute holds them as one dict).
HOLDOUT_KEYS = {"score": "holdout_score", "task_scores": "holdout_task_scores", "metrics": "holdout_metrics",
                "seconds": "holdout_seconds", "items": "holdout_items"}


@dataclass(frozen=True)
class TrialRecord:
    """What one trial measured and built; fields without `stored` come from Optuna's own trial."""

    number: int
    state: TrialState
    params: dict[str, Any]
    values: list[float] | None  # Optuna's objective values (a pruned trial's: the running mean)
    baseline: bool = stored("baseline", False)  # set when the slot is enqueued (search/workers.py)
    recipe: Any = stored("recipe")  # the search space's recipe: builds the candidate again
    mergekit_yaml: str | None = stored("mergekit_yaml")
    merge_seconds: float | None = stored("merge_seconds")
    scoring_seconds: float | None = stored("scoring_seconds")
    items_scored: int | None = stored("items_scored")
    pruned: bool = stored("pruned", False)
    score: float | None = stored("score")  # weighted score on the search items (the running mean if pruned)
    # a pruned trial's estimate of its full search score (what the sampler was told): the score of the
    # trial it was compared with (the raced trial, or the best for wilcoxon) plus the mean paired
    # difference on the items both scored
    estimate: float | None = stored("estimate")
    # the search items' values in the suite's order (as many as were scored): the pruner's and the
    # paired estimate's reference; older studies have Optuna's intermediate values instead
    item_values: list[float] | None = stored("item_values")
    task_scores: dict[str, float] = stored("task_scores", factory=dict)
    metrics: dict = stored("metrics", factory=dict)
    fail_reason: str | None = stored("fail_reason")
    holdout: HeldOut | None = None
    trial: optuna.trial.FrozenTrial | None = field(default=None, repr=False, compare=False)  # for Optuna APIs

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial | optuna.Trial, late_holdout: dict | None = None) -> TrialRecord:
        """The record of a finished (FrozenTrial) or running trial; `late_holdout` is its `holdout.<n>` attr."""
        attrs = trial.user_attrs
        values = {f.name: attrs.get(f.metadata[KEY], _default(f)) for f in _stored_fields()}
        frozen = isinstance(trial, optuna.trial.FrozenTrial)
        held = HeldOut.from_dict({name: attrs.get(key) for name, key in HOLDOUT_KEYS.items()})
        return cls(number=trial.number, state=trial.state if frozen else TrialState.RUNNING,
                   params=dict(trial.params), values=trial.values if frozen else None,
                   holdout=held or HeldOut.from_dict(late_holdout), trial=trial if frozen else None, **values)

    @property
    def fully_scored(self) -> bool:
        """COMPLETE and scored on every search item (a pruned trial carries only a running mean)."""
        return self.state == TrialState.COMPLETE and not self.pruned and self.score is not None


@dataclass(frozen=True)
class StudyRecord:
    """What the study itself records for status/notes/figures: task names, slice lengths, late held-out scores."""

    task_names: list[str] | None
    slice_lengths: list[int] | None
    late_holdout: dict[int, dict]

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        """Read a study's attributes once."""
        attrs = study.user_attrs
        late = {int(k.removeprefix(LATE_HOLDOUT)): v for k, v in attrs.items()
                if k.startswith(LATE_HOLDOUT) and k.removeprefix(LATE_HOLDOUT).isdigit()}
        return cls(attrs.get(TASK_NAMES), attrs.get(SLICE_LENGTHS), late)

    def trial(self, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        """The record of one of the study's trials, held-out scores folded in."""
        return TrialRecord.of(trial, self.late_holdout.get(trial.number))


def _stored_fields():
    return [f for f in fields(TrialRecord) if KEY in f.metadata]


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def key_of(name: str) -> str:
    """The storage key of a stored record field (KeyError names an unknown field)."""
    for f in _stored_fields():
        if f.name == name:
            return f.metadata[KEY]
    raise KeyError(f"TrialRecord has no stored field {name!r}")


def write(trial: optuna.Trial, **values: Any) -> None:
    """Store record fields on a running trial, one user attribute each, in the order given."""
    for name, value in values.items():
        trial.set_user_attr(key_of(name), value)


def write_holdout(trial: optuna.Trial, held: HeldOut) -> None:
    """Store a running trial's held-out scores."""
    for name, key in HOLDOUT_KEYS.items():
        trial.set_user_attr(key, getattr(held, name))


def write_late_holdout(study: optuna.Study, number: int, held: HeldOut) -> None:
    """Store held-out scores of a finished trial (Optuna no longer changes its attributes) on the study."""
    study.set_user_attr(f"{LATE_HOLDOUT}{number}", held.as_dict())


def validation_of(study: optuna.Study, number: int) -> dict | None:
    """A trial's scores on the validation items ({"score", "task_scores"}), None if never scored on them."""
    return study.user_attrs.get(f"{VALIDATION}{number}")


def write_validation(study: optuna.Study, number: int, score: float, task_scores: dict[str, float]) -> dict:
    """Store a trial's validation scores on the study (any worker may score them); returns them."""
    scored = {"score": score, "task_scores": task_scores}
    study.set_user_attr(f"{VALIDATION}{number}", scored)
    return scored


def selection_of(study: optuna.Study) -> dict | None:
    """The stored final pick and its comparison (search/selection.py), None before the first selection."""
    return study.user_attrs.get(SELECTION)


def write_selection(study: optuna.Study, summary: dict) -> None:
    """Store the final pick and its comparison."""
    study.set_user_attr(SELECTION, summary)


def write_failure(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> None:
    """Store why a trial failed, through the storage (the trial may belong to a dead worker)."""
    storage.set_trial_user_attr(trial_id, key_of("fail_reason"), reason)

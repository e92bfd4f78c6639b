"""Owners, orphans and the budget count on a real SQLite study (no worker processes)."""

from __future__ import annotations

import subprocess
import time

import optuna
import pytest

from search.storage import open_storage
from search.workers import (
    BEAT,
    OWNER,
    RETRY_GRACE_S,
    SLOT,
    Owner,
    fail,
    orphan_reason,
    reclaim,
    refill,
    retry,
    surplus,
)

TrialState = optuna.trial.TrialState
DIST = optuna.distributions.FloatDistribution(0, 1)


@pytest.fixture
def study(tmp_path):
    return optuna.create_study(study_name="w", storage=open_storage(f"sqlite:///{tmp_path / 'w.db'}"))


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_refill_counts_finished_running_and_waiting(study):
    assert refill(study, 4, {"x": 0.5}, 4) == 4
    trials = study.get_trials(deepcopy=False)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1 and all(t.user_attrs[SLOT] for t in trials)
    first, second = study.ask(), study.ask()
    first.suggest_float("x", 0, 1)
    study.tell(first, 1.0)
    assert refill(study, 4, {"x": 0.5}, 4) == 0
    assert fail(study, study.get_trials(deepcopy=False)[second.number], "interrupted")  # a slot was lost
    assert refill(study, 4, {"x": 0.5}, 4) == 0  # its worker may be enqueueing the retry
    assert refill(study, 4, {"x": 0.5}, 4, now=time.time() + RETRY_GRACE_S + 1) == 1
    assert states(study).count(TrialState.WAITING) == 3
    assert not fail(study, study.get_trials(deepcopy=False)[second.number], "again")  # already finished


def test_candidate_failures_stop_the_refill_at_the_cap(study):
    refill(study, 2, {"x": 0.5}, 2)
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, state=TrialState.FAIL)  # failures with no reason count as the candidate's fault
    assert refill(study, 2, {"x": 0.5}, 2) == 0


def test_surplus_slot(study):
    refill(study, 2, {"x": 0.5}, 2)
    study.enqueue_trial({}, user_attrs={SLOT: True})  # two workers refilled the same lost slot
    a, b = study.ask(), study.ask()
    study.tell(a, 1.0)
    study.tell(b, 1.0)
    c = study.ask()
    assert surplus(study, c.number, 2)


def test_dead_owner_here_is_an_orphan_at_once_and_retried_with_its_parameters(study):
    me = Owner.me(30)
    proc = subprocess.Popen(["sleep", "30"])
    refill(study, 1, {"x": 0.25}, 1)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    owner = Owner(me.host, me.boot, proc.pid, -1, 30, me.pidns)
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, owner.as_attr())
    frozen = study.get_trials(deepcopy=False)[trial.number]
    assert orphan_reason(frozen, me) is None  # alive
    proc.kill()
    proc.wait()
    assert "died" in orphan_reason(frozen, me)
    assert reclaim(study, me) == [trial.number]
    trials = study.get_trials(deepcopy=False)
    assert trials[trial.number].state == TrialState.FAIL and "died" in trials[trial.number].user_attrs["fail_reason"]
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.25}
    assert retry.system_attrs["failed_trial"] == trial.number and retry.user_attrs == {"baseline": True, SLOT: True}


def test_a_refill_between_reclaims_fail_and_retry_adds_no_slot(study):
    """reclaim fails an orphan, then enqueues its retry: a refill by another worker in between must
    not add a fresh slot, or the retry (popped after it) is the surplus one and the parameters are lost."""
    refill(study, 2, {"x": 0.25}, 2)
    first, orphan = study.ask(), study.ask()
    study.tell(first, 1.0)
    orphan.suggest_float("x", 0, 1)
    frozen = study.get_trials(deepcopy=False)[orphan.number]
    assert fail(study, frozen, "orphaned: its worker (pid 1 on h) died")
    assert refill(study, 2, {"x": 0.25}, 2) == 0  # the retry is on its way
    retry(study, frozen)
    assert refill(study, 2, {"x": 0.25}, 2) == 0
    again = study.ask()
    assert again.params == frozen.params and not surplus(study, again.number, 2)


def test_an_orphan_whose_reclaimer_died_before_the_retry_comes_back_after_the_grace(study):
    refill(study, 1, {"x": 0.25}, 1)
    orphan = study.ask()
    assert fail(study, study.get_trials(deepcopy=False)[orphan.number], "orphaned: no heartbeat for 99 s")
    assert refill(study, 1, {"x": 0.25}, 1) == 0
    assert refill(study, 1, {"x": 0.25}, 1, now=time.time() + RETRY_GRACE_S + 1) == 1


def test_other_hosts_trials_become_orphans_only_when_silent(study):
    me = Owner.me(30)
    refill(study, 1, {"x": 0.25}, 1)
    trial = study.ask()
    other = Owner("elsewhere", "boot", 1, 1, 30)
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, other.as_attr())
    study._storage.set_trial_system_attr(trial._trial_id, BEAT, time.time())
    frozen = study.get_trials(deepcopy=False)[trial.number]
    assert orphan_reason(frozen, me) is None
    assert orphan_reason(frozen, me, now=time.time() + 59) is None
    assert "no heartbeat" in orphan_reason(frozen, me, now=time.time() + 61)
    assert reclaim(study, me) == []

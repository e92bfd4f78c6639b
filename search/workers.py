"""Who runs which trial: owners, heartbeats, orphaned trials and the n_trials budget.

Every RUNNING trial records its owner (host, boot, pid namespace, pid, process start time) and a heartbeat time
in its system attributes. A trial whose owner on this host is dead is an orphan at once; any other
RUNNING trial becomes one when its last beat is older than two of its owner's intervals. An orphan
is failed (fail_reason says why) and retried with its parameters. The budget is kept by counting:
finished + running + waiting slots must reach n_trials; `refill` enqueues the difference, and a
worker that pops a slot the budget no longer needs gives it up (see `surplus`). Both run on every
storage (RDB and journal files alike), and any number of workers converges on exactly n_trials.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import optuna

from search.trial_record import TrialRecord, key_of, write_failure

TrialState = optuna.trial.TrialState
FrozenTrial = optuna.trial.FrozenTrial
OWNER = "owner"  # trial system attr: the Owner dict of the worker running it
BEAT = "beat"  # trial system attr: time.time() of the owner's last heartbeat
SLOT = "slot"  # user attr of the enqueued trials that make up the n_trials budget
BUDGET = "n_trials"  # study user attr: the budget its creator (or a bigger resume) set
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# fail_reason prefixes of trials that failed through no fault of their candidate
INTERRUPTED = "interrupted"
ORPHANED = "orphaned"
SURPLUS = "surplus slot"
# how long a slot failed as orphaned or interrupted counts as live while its worker enqueues the retry
RETRY_GRACE_S = 60.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    # Containers share the kernel (and its boot id) but not their pids: compare pids in one namespace only.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: dead
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    """The worker process that runs a trial."""

    host: str
    boot: str
    pid: int
    start: int  # clock ticks since boot; tells a reused pid from the original process
    interval: int  # its heartbeat interval, seconds
    pidns: str = ""

    @classmethod
    def me(cls, interval: int) -> Owner:
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), _boot_id(), pid, _start_ticks(pid) or -1, interval, _pid_namespace())

    @classmethod
    def of(cls, trial: FrozenTrial) -> Owner | None:
        """The owner a trial records, if any."""
        data = trial.system_attrs.get(OWNER)
        try:
            return cls(**data) if isinstance(data, dict) else None
        except TypeError:
            return None

    def as_attr(self) -> dict:
        """The dict stored on a trial."""
        return {"host": self.host, "boot": self.boot, "pid": self.pid, "start": self.start, "interval": self.interval,
                "pidns": self.pidns}

    def same_process(self, other: Owner | None) -> bool:
        """Whether `other` names this very process."""
        return other is not None and (other.host, other.boot, other.pidns, other.pid, other.start) == (
            self.host, self.boot, self.pidns, self.pid, self.start)

    def dead_here(self, other: Owner | None) -> bool:
        """Whether `other` ran on this machine (this boot, this pid namespace) and its process no longer exists."""
        if other is None or (other.host, other.boot, other.pidns) != (self.host, self.boot, self.pidns):
            return False
        ticks = _start_ticks(other.pid)
        if ticks is None:
            return True
        return ticks not in (-1, other.start) and other.start != -1  # the pid now names another process


def last_beat(trial: FrozenTrial) -> float:
    """When the trial last showed a sign of life."""
    beat = trial.system_attrs.get(BEAT)
    start = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(beat), start) if isinstance(beat, (int, float)) else start


def orphan_reason(trial: FrozenTrial, me: Owner, now: float | None = None) -> str | None:
    """Why a RUNNING trial (not this process's) has no live worker, or None if it may still have one."""
    owner = Owner.of(trial)
    if me.dead_here(owner):
        return f"{ORPHANED}: its worker (pid {owner.pid} on {owner.host}) died"
    interval = owner.interval if owner else me.interval
    silent = (now or time.time()) - last_beat(trial)
    if silent > 2 * interval:
        who = f"pid {owner.pid} on {owner.host}" if owner else "unknown worker"
        return f"{ORPHANED}: no heartbeat from its worker ({who}) for {silent:.0f} s"
    return None


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a slot that runs `trial`'s parameters again (the baseline stays the baseline)."""
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    user_attrs = {k: trial.user_attrs[k] for k in (SLOT, key_of("baseline")) if k in trial.user_attrs}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=user_attrs,
        system_attrs={"failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                      "retry_history": history}))


def fail(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with its reason; False if it finished meanwhile (someone else did it)."""
    storage = study._storage
    try:
        write_failure(storage, trial._trial_id, reason)
        return storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def reclaim(study: optuna.Study, me: Owner, mine: int | None = None) -> list[int]:
    """Fail the orphaned RUNNING trials (not `mine`) and retry each; returns their numbers."""
    now = time.time()
    done = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number == mine:
            continue
        reason = orphan_reason(trial, me, now)
        if reason and fail(study, trial, reason):
            if trial.user_attrs.get(SLOT):
                retry(study, trial)
            done.append(trial.number)
    return done


def counts(study: optuna.Study) -> dict[str, int]:
    """Finished, running and waiting trials, as the budget counts them."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {"finished": sum(s in FINISHED for s in states), "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING)}


def refill(study: optuna.Study, budget: int, baseline_params: dict, max_failures: int,
           now: float | None = None) -> int:
    """Enqueue slots until finished + running + waiting reaches the budget; returns how many were added.

    A lost slot (a worker killed between failing a trial and giving its slot back) comes back here,
    RETRY_GRACE_S after the failure.
    Candidate failures (NaN, out of memory...) stop the refill once they reach `max_failures`.
    """
    trials = study.get_trials(deepcopy=False)
    live = [t for t in trials if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
    missing = budget - len(live) - len(_awaiting_retry(trials, now or time.time()))
    if missing <= 0:
        return 0
    failures = sum(1 for t in trials if t.state == TrialState.FAIL and not _no_fault(t))
    if failures >= max_failures:
        return 0
    added = 0
    if not any(TrialRecord.of(t).baseline for t in live):
        study.enqueue_trial(baseline_params, user_attrs={key_of("baseline"): True, SLOT: True})
        added += 1
    for _ in range(missing - added):
        study.enqueue_trial({}, user_attrs={SLOT: True})
        added += 1
    return added


def _awaiting_retry(trials: list[FrozenTrial], now: float) -> list[FrozenTrial]:
    """Slots just failed as orphaned (by `reclaim`) or interrupted (by a stopping worker) whose retry
    is not enqueued yet (they fail first, then enqueue): counted as live, or a refill in between would
    add a fresh slot and the retry, popped after it, would be the surplus one. A slot whose retry never
    comes (its worker killed in between) is refilled after RETRY_GRACE_S."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get(SLOT) and t.number not in retried
            and str(TrialRecord.of(t).fail_reason or "").startswith((ORPHANED, INTERRUPTED))
            and t.datetime_complete is not None and now - t.datetime_complete.timestamp() < RETRY_GRACE_S]


def _no_fault(trial: FrozenTrial) -> bool:
    reason = str(TrialRecord.of(trial).fail_reason or "")
    return reason.startswith((INTERRUPTED, ORPHANED, SURPLUS, "BudgetReached")) or not trial.user_attrs.get(SLOT)


def surplus(study: optuna.Study, trial_number: int, budget: int) -> bool:
    """Whether the slot just popped is one more than the budget needs (others cover it)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in trials if t.number != trial_number) >= budget


def claim_next(study: optuna.Study, me: Owner) -> None:
    """Name this process as the owner of the slot it is about to pop, so a kill right after the pop
    (before the trial's first heartbeat) leaves a trial that is known to be orphaned."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            study._storage.set_trial_system_attr(trial._trial_id, OWNER, me.as_attr())
            study._storage.set_trial_system_attr(trial._trial_id, BEAT, time.time())
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue
        return


class Heartbeat:
    """While a trial runs: record this process as its owner, then beat every `interval` seconds."""

    def __init__(self, study: optuna.Study, trial_id: int, me: Owner):
        self._storage, self._trial_id, self._me = study._storage, trial_id, me
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merge-search-heartbeat", daemon=True)

    def beat(self) -> None:
        """Write owner and time now."""
        self._storage.set_trial_system_attr(self._trial_id, OWNER, self._me.as_attr())
        self._storage.set_trial_system_attr(self._trial_id, BEAT, time.time())

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._me.interval):
            try:
                self.beat()
            except Exception:  # the trial finished meanwhile, or the storage hiccuped: next beat retries
                if self._stop.is_set():
                    return

"""A killed worker costs at most its trial; several workers share one study on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from search.workers import Owner
from tests.conftest import REPO, run_cli
from tests.search.conftest import study_dict, write_study

TrialState = optuna.trial.TrialState
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start_worker(path, *args, env: dict | None = None) -> subprocess.Popen:
    """`search start` in the background, as a worker process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "search.cli", "start", str(path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def storage_of(kind: str, tmp_path) -> tuple[list[str], str]:
    """(--storage arguments, URL to load the study) for an SQLite database or a journal file."""
    if kind == "sqlite":
        return [], f"sqlite:///{tmp_path / 'toy.db'}"
    journal = tmp_path / "toy.journal"
    return ["--storage", str(journal)], str(journal)


def load(url: str) -> optuna.Study:
    from search.storage import open_storage

    return optuna.load_study(study_name="toy", storage=open_storage(url))


def check_resumed(url: str, before: dict, n_trials: int, interrupted: int) -> list:
    """Exactly n_trials finished, none RUNNING or WAITING, earlier results unchanged, the victim retried."""
    trials = load(url).trials
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert {t.number: t.value for t in trials if t.number in before} == before
    assert trials[interrupted].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted]
    assert len(retried) == 1 and retried[0].state in FINISHED
    # The retry keeps whatever the killed trial had sampled before it died (possibly not all of it).
    assert trials[interrupted].params.items() <= retried[0].params.items()
    return trials


# Default heartbeat (30 s), no sleep: the resume starts at once, as a user would restart.
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.parametrize("point", ["start", "merge", "scoring"])
def test_sigkill_then_immediate_resume(study_parts, tmp_path, kind, point):
    """SIGKILL before the trial's first heartbeat, before its merge, or mid-scoring; resume at once."""
    args, url = storage_of(kind, tmp_path)
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path, study={"n_trials": 5}))
    worker = start_worker(path, *args, env={"MERGE_SEARCH_FAULT": f"{point}:2:SIGKILL"})
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == -signal.SIGKILL, err[-2000:]
    study = load(url)
    before = {t.number: t.value for t in study.trials if t.state in FINISHED}
    running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert sorted(before) == [0, 1] and running == [2]

    start = time.monotonic()
    result = run_cli("start", str(path), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - start < 120  # never waited for the 60 s grace period of a live worker's beat
    trials = check_resumed(url, before, 5, running[0])
    assert "died" in trials[2].user_attrs["fail_reason"]


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_scoring_then_resume(study_parts, tmp_path, signame, code):
    """Ctrl-C / SIGTERM: the trial ends FAIL "interrupted", its slot comes back, the command resumes."""
    args, url = storage_of("sqlite", tmp_path)
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path, study={"n_trials": 4}))
    result = run_cli("start", str(path), env={"MERGE_SEARCH_FAULT": f"scoring:1:{signame}"})
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "search: interrupted; run the same command again to resume"
    study = load(url)
    before = {t.number: t.value for t in study.trials if t.state in FINISHED}
    assert sorted(before) == [0]
    assert study.trials[1].state == TrialState.FAIL and study.trials[1].user_attrs["fail_reason"] == "interrupted"
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == 3  # the slot came back

    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    check_resumed(url, before, 4, 1)


def test_external_sigterm_exits_within_seconds(study_parts, tmp_path):
    """A SIGTERM from outside, whenever it lands in a trial, ends the worker with 143 in a few seconds."""
    args, url = storage_of("journal", tmp_path)
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path, study={"n_trials": 200}))
    worker = start_worker(path, *args)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        if os.path.exists(url) and len([t for t in load(url).trials if t.state in FINISHED]) >= 2:
            break
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 143, err[-2000:]
    assert time.monotonic() - sent < 10
    trials = load(url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    finished = len([t for t in trials if t.state in FINISHED])
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in failed)
    # Every slot is accounted for: finished + waiting = the budget (the interrupted one came back).
    assert finished + len([t for t in trials if t.state == TrialState.WAITING]) == 200


@pytest.mark.skipif(not os.environ.get("MERGE_SEARCH_PG_URL") and not os.environ.get("CI"),
                    reason="set MERGE_SEARCH_PG_URL to a PostgreSQL database (.ci/run starts one)")
def test_three_workers_on_postgresql(study_parts, tmp_path):
    """Three workers share a study; one is SIGKILLed mid-run; the other two finish exactly n_trials."""
    url = os.environ["MERGE_SEARCH_PG_URL"]  # in CI a missing server is a failure, not a skip
    name = f"toy_pg_{os.getpid()}_{int(time.time())}"
    study = study_dict(study_parts, tmp_path, study={"n_trials": 12, "storage": url, "name": name})
    path = write_study(tmp_path / "study.yaml", study)
    workers = [start_worker(path) for _ in range(3)]
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            trials = optuna.load_study(study_name=name, storage=url).trials
        except Exception:  # not created yet
            continue
        if len([t for t in trials if t.state in FINISHED]) >= 3 and any(
                t.state == TrialState.RUNNING and Owner.of(t) and Owner.of(t).pid == workers[0].pid for t in trials):
            break
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    outputs = [w.communicate(timeout=600) for w in workers[1:]]
    for worker, (_, err) in zip(workers[1:], outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=name, storage=url).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 12
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The kill lands inside a trial almost always; in the rare case it lands between two, none was lost.
    killed = [t for t in trials if t.state == TrialState.FAIL and "died" in t.user_attrs.get("fail_reason", "")]
    assert len(killed) <= 1
    for trial in killed:
        assert [t.state for t in trials if t.system_attrs.get("failed_trial") == trial.number] in (
            [TrialState.COMPLETE], [TrialState.PRUNED])
    assert sum(bool(t.user_attrs.get("baseline")) for t in finished) == 1
    params = [tuple(sorted(t.params.items())) for t in finished if not t.system_attrs.get("failed_trial")]
    assert len(set(params)) == len(params), "a parameter set was scored twice"
    status = run_cli("status", "--storage", url, "--study-name", name, "--json")
    assert status.returncode == 0 and url.split("@")[0].split(":")[-1] not in status.stderr


def test_journal_file_storage(study_parts, tmp_path):
    """A plain file path ending in .journal uses Optuna's journal storage (shared file systems)."""
    journal = tmp_path / "toy.journal"
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path, study={"n_trials": 3}))
    result = run_cli("start", str(path), "--storage", str(journal))
    assert result.returncode == 0, result.stderr[-2000:]
    status = run_cli("status", "--storage", str(journal), "--study-name", "toy", "--json")
    assert status.returncode == 0, status.stderr
    assert '"n_complete": 3' in status.stdout
    assert not (tmp_path / "toy.db").exists()

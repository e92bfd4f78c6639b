"""A killed worker costs at most its trial; several workers share one study on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import REPO, run_cli
from tests.search.conftest import study_dict, write_study

TrialState = optuna.trial.TrialState
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start_worker(path, *args) -> subprocess.Popen:
    """`search start` in the background, as a worker process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "search.cli", "start", str(path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_trial_then_resume(study_parts, tmp_path):
    storage = f"sqlite:///{tmp_path / 'toy.db'}"
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path, study={"n_trials": 8}))
    worker = start_worker(path, "--heartbeat", "1")
    deadline = time.time() + 300
    study = None
    while time.time() < deadline:
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="toy", storage=storage)
        except (KeyError, Exception):
            continue
        done = study.get_trials(deepcopy=False, states=FINISHED)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # Kill inside the objective, after the trial's first heartbeat: Optuna only fails trials
        # that have one (a kill in the milliseconds before it leaves the trial RUNNING).
        if len(done) >= 3 and any(t.user_attrs.get("mergekit_yaml") for t in running):
            break
    assert worker.poll() is None, worker.stderr.read()[-2000:]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: t.value for t in optuna.load_study(study_name="toy", storage=storage).trials
              if t.state in FINISHED}
    killed = [t.number for t in optuna.load_study(study_name="toy", storage=storage).trials
              if t.state == TrialState.RUNNING]
    assert len(before) >= 3 and len(killed) == 1

    time.sleep(2.5)  # past the grace period (2 heartbeats), so the killed trial counts as stale
    result = run_cli("start", str(path), "--heartbeat", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert len([t for t in trials if t.state in FINISHED]) == 8
    assert {t.number: t.value for t in trials if t.number in before} == before
    assert trials[killed[0]].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retried) == 1 and retried[0].state in FINISHED
    # The retry keeps whatever the killed trial had sampled before it died (possibly not all of it).
    assert trials[killed[0]].params.items() <= retried[0].params.items()


@pytest.mark.skipif(not os.environ.get("MERGE_SEARCH_PG_URL") and not os.environ.get("CI"),
                    reason="set MERGE_SEARCH_PG_URL to a PostgreSQL database (.ci/run starts one)")
def test_three_workers_on_postgresql(study_parts, tmp_path):
    url = os.environ["MERGE_SEARCH_PG_URL"]  # in CI a missing server is a failure, not a skip
    name = f"toy_pg_{os.getpid()}_{int(time.time())}"
    study = study_dict(study_parts, tmp_path, study={"n_trials": 9, "storage": url, "name": name})
    path = write_study(tmp_path / "study.yaml", study)
    workers = [start_worker(path) for _ in range(3)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=name, storage=url).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 9
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    params = [tuple(sorted(t.params.items())) for t in finished]
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

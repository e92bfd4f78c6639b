"""End to end through the CLI: start, status --json, export -> mergekit-yaml, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_cli
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder
from tests.search.conftest import study_dict, write_study


@pytest.fixture(scope="module")
def finished_study(study_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    path = write_study(tmp / "study.yaml", study_dict(study_parts, tmp))
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp, result


def test_start_prints_baseline_against_best(finished_study):
    _, _, result = finished_study
    assert "baseline (trial 0) against best" in result.stdout
    assert "held-out" in result.stdout


def test_status_json(finished_study):
    path, _, _ = finished_study
    result = run_cli("status", str(path), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["study"] == "toy"
    assert status["n_complete"] + status["n_pruned"] == 10 and status["n_failed"] == 0
    base, best = status["baseline"], status["best"]
    assert base["number"] == 0
    assert base["params"]["t.self_attn.2"] == 0.3 and base["params"]["t.default.0"] == 0.5
    assert best["value"] >= base["value"]
    for entry in (base, best):
        assert 0 <= entry["value"] <= 1 and 0 <= entry["holdout"] <= 1
        assert set(entry["params"]) == {f"t.{f}.{i}" for f in ("self_attn", "mlp") for i in range(5)} | {"t.default.0"}


def test_trials_carry_what_was_measured(finished_study):
    path, tmp, _ = finished_study
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    for trial in study.trials:
        attrs = trial.user_attrs
        wanted = {"metrics", "task_scores", "merge_seconds", "scoring_seconds", "items_scored", "mergekit_yaml"}
        assert wanted <= set(attrs)
        assert attrs["items_scored"] == 60
        assert set(attrs["metrics"]["toy_a"]) >= {"acc,none", "acc_norm,none"}
        weighted = (attrs["task_scores"]["toy_a"] + 2 * attrs["task_scores"]["toy_b"]) / 3
        assert trial.value == pytest.approx(weighted)
    assert study.metric_names == ["weighted score"]


def test_export_builds_the_scored_candidate(finished_study, tmp_path):
    path, tmp, _ = finished_study
    result = run_cli("export", str(path), "--top", "2", "--out", str(tmp_path / "exp"))
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "exp").glob("*.yml"))
    assert len(files) == 2 and files[0].name.startswith("01-trial")
    best_yaml = files[0]

    mergekit = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(best_yaml),
                               str(tmp_path / "mk")], capture_output=True, text=True)
    assert mergekit.returncode == 0, mergekit.stderr[-2000:]
    ours = run_cli("merge", str(best_yaml), str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stderr
    assert_within_one_ulp(load_folder(tmp_path / "ours"), load_folder(tmp_path / "mk"))

    status = json.loads(run_cli("status", str(path), "--json").stdout)
    assert status["best"]["number"] == int(best_yaml.stem.split("trial")[1])


def test_exported_candidate_equals_in_memory_candidate(finished_study, tmp_path):
    """Rebuild the best trial from its stored YAML in memory, score it: the same score as recorded."""
    from merge_core.config import parse_config
    from search.runner import Candidates
    from search.study_config import load_study_file

    path, tmp, _ = finished_study
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    best = max((t for t in study.trials if not t.user_attrs.get("pruned")), key=lambda t: t.user_attrs["score"])
    import yaml
    exported = parse_config(yaml.safe_load(best.user_attrs["mergekit_yaml"]))
    candidates = Candidates(load_study_file(path), "cpu")
    candidates.build(exported.parameters["t"])  # parameters: one dict per config, any method
    result = candidates.suite.evaluate(candidates.model, "search", 8)
    assert result.score == pytest.approx(best.user_attrs["score"], abs=1e-12)
    assert result.task_scores == pytest.approx(best.user_attrs["task_scores"], abs=1e-12)


def test_resume_counts_earlier_trials(finished_study):
    path, tmp, _ = finished_study
    more = run_cli("start", str(path), "--n-trials", "12")
    assert more.returncode == 0, more.stderr[-2000:]
    again = run_cli("start", str(path), "--n-trials", "12")
    assert again.returncode == 0
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == 12
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1


def test_export_and_status_bad_input(finished_study, tmp_path):
    path, tmp, _ = finished_study
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    storage = f"sqlite:///{tmp / 'toy.db'}"
    cases = [
        (["export", str(path), "--out", str(blocker / "sub")], "cannot create"),
        (["export", str(path), "--top", "0"], "--top"),
        (["export", "--storage", storage, "--study-name", "nope"], "no study named 'nope'"),
        (["status", "--storage", storage], "which study"),
        (["status", "--storage", "postgresql://u:hunter2@localhost:1/db", "--study-name", "x"], "cannot open"),
    ]
    before = (tmp / "toy.db").stat().st_mtime_ns
    for args, needle in cases:
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert "hunter2" not in result.stderr + result.stdout
    assert blocker.read_text() == "keep"
    assert (tmp / "toy.db").stat().st_mtime_ns == before

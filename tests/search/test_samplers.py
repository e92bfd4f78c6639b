"""Every sampler runs a study through the CLI; nsga2 gets one objective per task."""

from __future__ import annotations

import json

import optuna
import pytest

from tests.conftest import run_cli
from tests.search.conftest import study_dict, write_study


@pytest.mark.parametrize("sampler", ["cmaes", "gp", "nsga2", "random"])
def test_sampler_runs(study_parts, tmp_path, sampler):
    study = study_dict(study_parts, tmp_path, study={"n_trials": 4, "sampler": sampler})
    path = write_study(tmp_path / "study.yaml", study)
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'toy.db'}")
    finished = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4
    if sampler == "nsga2":
        assert loaded.metric_names == ["toy_a", "toy_b"]
        assert all(t.values == [t.user_attrs["task_scores"]["toy_a"], t.user_attrs["task_scores"]["toy_b"]]
                   for t in finished)
    status = json.loads(run_cli("status", str(path), "--json").stdout)
    assert status["best"]["value"] == max(t.user_attrs["score"] for t in finished)

"""The final pick on validation items and the paired held-out comparison, end to end through the CLI."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest

from tests.conftest import run_cli
from tests.search.conftest import study_dict, write_study


def _tasks(validation: int) -> list[dict]:
    return [{"name": "toy_a", "metric": "acc", "search_items": 20, "validation_items": validation,
             "holdout_items": 20},
            {"name": "toy_b", "metric": "acc_norm", "weight": 2, "search_items": 20, "validation_items": validation,
             "holdout_items": 20}]


@pytest.fixture(scope="module")
def picked(study_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    study = study_dict(study_parts, tmp, study={"n_trials": 8}, selection={"top_k": 3, "resamples": 2000})
    study["objectives"]["tasks"] = _tasks(validation=15)
    path = write_study(tmp / "study.yaml", study)
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp, result


def test_pick_is_the_best_validation_score_among_the_top_k(picked):
    path, tmp, result = picked
    status = json.loads(run_cli("status", str(path), "--json").stdout)
    chosen = status["selection"]
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    ranked = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                    key=lambda t: (-t.user_attrs["score"], t.number))
    assert chosen["top"] == [t.number for t in ranked[:3]]
    assert chosen["picked_on"] == "validation"
    validation = {int(k): v for k, v in chosen["validation"].items()}
    assert chosen["winner"] == max(chosen["top"], key=lambda n: (validation[n], -chosen["top"].index(n)))
    for number in chosen["top"]:  # every candidate of the pick was scored on the validation items
        assert study.user_attrs[f"validation.{number}"]["score"] == validation[number]
    assert status["final_pick"]["number"] == chosen["winner"]
    # held-out items are scored for the pick and the baseline only
    held = {t.number for t in study.trials if "holdout_score" in t.user_attrs}
    held |= {int(k.split(".")[1]) for k in study.user_attrs if k.startswith("holdout.")}
    assert held == {chosen["winner"], chosen["baseline"]}
    rows = {r["name"]: r for r in chosen["comparison"]}
    assert set(rows) == {"toy_a", "toy_b", "weighted"}
    for row in rows.values():
        assert 0 <= row["p_value"] <= 1 and row["ci_low"] <= row["diff"] <= row["ci_high"]
        assert row["n_items"] == (20 if row["name"] != "weighted" else 40)
    assert rows["weighted"]["candidate"] == pytest.approx(status["final_pick"]["holdout"])
    assert chosen["gap"] == pytest.approx(status["final_pick"]["value"] - status["final_pick"]["holdout"])
    assert "final pick: trial" in result.stdout and "paired" in result.stdout


def test_export_puts_the_pick_first(picked, tmp_path):
    path, _, _ = picked
    status = json.loads(run_cli("status", str(path), "--json").stdout)
    result = run_cli("export", str(path), "--top", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"01-trial{status['selection']['winner']}.yml").is_file()


def test_a_study_that_cannot_beat_its_baseline_says_not_significant(study_parts, tmp_path):
    # Both parents are the same weights: every candidate is the baseline's merge, so no gain exists.
    twin = tmp_path / "twin"
    shutil.copytree(study_parts["a"], twin)
    parts = {**study_parts, "b": twin}
    study = study_dict(parts, tmp_path, study={"n_trials": 5}, selection={"resamples": 2000})
    study["objectives"]["tasks"] = _tasks(validation=0)
    path = write_study(tmp_path / "study.yaml", study)
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = json.loads(run_cli("status", str(path), "--json").stdout)["selection"]
    assert chosen["picked_on"] == "search"
    weighted = next(r for r in chosen["comparison"] if r["name"] == "weighted")
    assert weighted["diff"] == 0 and weighted["p_value"] == 1 and not weighted["significant"]
    text = run_cli("status", str(path)).stdout
    assert "not significant" in " ".join(text.split())

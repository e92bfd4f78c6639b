"""Candidates whose forward pass gives NaN/Inf end FAIL with their reason; a worker stops on repeats."""

from __future__ import annotations

import shutil

import optuna
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.search.conftest import study_dict, write_study


def test_nan_candidates_fail_and_the_worker_stops_saying_what_to_change(study_parts, tmp_path):
    bad = tmp_path / "parent_b_nan"
    shutil.copytree(study_parts["b"], bad)
    weights = next(bad.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.final_layernorm.weight"][0] = float("nan")  # every merge with t > 0 there is NaN
    save_file(tensors, weights, metadata={"format": "pt"})
    study = study_dict(study_parts, tmp_path, study={"n_trials": 6})
    study["merge"]["models"] = [str(study_parts["a"]), str(bad)]
    path = write_study(tmp_path / "study.yaml", study)

    result = run_cli("start", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "3 trials in a row failed (NonFiniteOutput: NaN/Inf" in line and "merge.dtype" in line
    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'toy.db'}").trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 3 and all("NaN/Inf" in t.user_attrs["fail_reason"] for t in failed)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert torch.isnan(load_file(weights)["model.final_layernorm.weight"][0])

"""`search demo` from an empty folder: builds the parents, runs the shipped demo study, exports the best."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli


def test_demo_runs_from_an_empty_folder(tmp_path):
    result = run_cli("demo", "--n-trials", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline (trial 0) against best" in result.stdout
    # what a run writes by default goes under ./runs of the current folder
    assert (tmp_path / "runs" / "demo-models" / "parent_a" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo.db").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "demo" / "export").glob("*.yml"))
    study = REPO / "studies" / "demo.yaml"  # its task folder is found relative to the study file
    status = json.loads(run_cli("status", str(study), "--json", cwd=tmp_path).stdout)
    assert status["n_complete"] + status["n_pruned"] == 4
    assert status["baseline"]["holdout"] is not None and status["best"]["holdout"] is not None
    dry = run_cli("start", str(study), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]

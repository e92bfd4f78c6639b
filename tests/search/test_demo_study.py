"""`search demo` from a fresh folder: builds the parents, runs the demo study, exports the best."""

from __future__ import annotations

import json
import shutil

from tests.conftest import REPO, run_cli


def test_demo_runs_from_scratch(tmp_path):
    shutil.copytree(REPO / "studies", tmp_path / "studies")  # the study's paths are relative to the CWD
    result = run_cli("demo", "--n-trials", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline (trial 0) against best" in result.stdout
    assert (tmp_path / "runs" / "demo-models" / "parent_a" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "demo" / "export").glob("*.yml"))
    status = json.loads(run_cli("status", "studies/demo.yaml", "--json", cwd=tmp_path).stdout)
    assert status["n_complete"] + status["n_pruned"] == 4
    assert status["baseline"]["holdout"] is not None and status["best"]["holdout"] is not None

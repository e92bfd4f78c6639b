"""Bad study files: exit code 2, one line naming the field, nothing created in storage."""

from __future__ import annotations

import pytest

from tests.conftest import build_tiny_model, run_cli
from tests.search.conftest import study_dict, write_study


def broken(parts, tmp, case: str) -> dict:
    """A study dict with one kind of mistake."""
    study = study_dict(parts, tmp)
    if case == "typo_key":
        study["study"]["n_trails"] = 5
    elif case == "wrong_type":
        study["study"]["n_trials"] = "many"
    elif case == "low_gt_high":
        study["search_space"]["self_attn"] = {"anchors": 5, "low": 0.8, "high": 0.2}
    elif case == "k_below_one":
        study["search_space"]["mlp"] = {"anchors": 0}
    elif case == "unknown_sampler":
        study["study"]["sampler"] = "annealing"
    elif case == "unknown_task":
        study["objectives"]["tasks"][0]["name"] = "toy_c"
    elif case == "missing_model":
        study["merge"]["models"][1] = str(tmp / "absent_model")
    elif case == "shapes_differ":
        study["merge"]["models"][1] = str(build_tiny_model(tmp / "wide", "phi", seed=5, hidden=64))
    elif case == "bad_storage":
        study["study"]["storage"] = "postgres-ql//nobody@nowhere/db"
    elif case == "n_trials_zero":
        study["study"]["n_trials"] = 0
    elif case == "baseline_shape":
        study["baseline"][0]["value"] = [0, 1]
    elif case == "typo_section":
        study["objectivs"] = study.pop("objectives")
    elif case == "default_not_last":
        study["search_space"] = {"default": {"anchors": 1}, "mlp": {"anchors": 5}}
    return study


CASES = {
    "typo_key": ["study.n_trails", "did you mean 'n_trials'"],
    "wrong_type": ["study.n_trials"],
    "low_gt_high": ["search_space.self_attn", "low (0.8) must not exceed high (0.2)"],
    "k_below_one": ["search_space.mlp.anchors"],
    "unknown_sampler": ["study.sampler", "tpe"],
    "unknown_task": ["toy_c"],
    "missing_model": ["absent_model"],
    "shapes_differ": ["hidden_size differs"],
    "bad_storage": ["storage"],
    "n_trials_zero": ["study.n_trials", "greater than 0"],
    "baseline_shape": ["baseline", "2 anchors", "search_space.self_attn.anchors is 5"],
    "typo_section": ["objectivs", "did you mean 'objectives'"],
    "default_not_last": ["search_space", "last"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_study_file(study_parts, tmp_path, case):
    path = write_study(tmp_path / "study.yaml", broken(study_parts, tmp_path, case))
    result = run_cli("start", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in CASES[case]:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "toy.db").exists(), "a refused study must not create its storage"


def test_malformed_study_yaml(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  name: [unclosed\n")
    result = run_cli("start", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "malformed YAML at line" in result.stderr


def test_cli_flags_checked(study_parts, tmp_path):
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path))
    for args, needle in ((["--n-trials", "0"], "--n-trials"), (["--sampler", "annealing"], "--sampler"),
                         (["--device", "cuda:7"], "--device"), (["--storage", "nonsense"], "--storage")):
        result = run_cli("start", str(path), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert not (tmp_path / "toy.db").exists()


def test_status_of_missing_study(study_parts, tmp_path):
    path = write_study(tmp_path / "study.yaml", study_dict(study_parts, tmp_path))
    result = run_cli("status", str(path), "--json")
    assert result.returncode == 2 and "run `search start` first" in result.stderr
    assert not (tmp_path / "toy.db").exists()
    study = study_dict(study_parts, tmp_path)
    del study["study"]["storage"]  # the default, ./runs/toy.db: a read-only command does not make runs/
    path = write_study(tmp_path / "default.yaml", study)
    for command in ("status", "export", "report"):
        result = run_cli(command, str(path), cwd=tmp_path)
        assert result.returncode == 2 and "no study storage at runs/toy.db" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_loads_nothing(study_parts, tmp_path):
    study = study_dict(study_parts, tmp_path)
    study["merge"]["models"] = ["org/not-downloaded", str(study_parts["b"])]
    study["merge"]["base_model"] = "org/not-downloaded"
    path = write_study(tmp_path / "study.yaml", study)
    result = run_cli("start", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "org/not-downloaded" in result.stdout and "t.self_attn.4" in result.stdout
    assert "each trial: one in-memory merge + 60 items" in result.stdout
    assert not (tmp_path / "toy.db").exists()

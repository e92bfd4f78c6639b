"""Paths in a study file resolve against its folder; parents are fingerprinted; demo refs."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest

from search.study_config import DEMO_MODELS, model_path, storage_path
from tests.conftest import build_tiny_model, run_cli
from tests.search.conftest import study_dict, write_study


def test_model_reference_rule(tmp_path):
    (tmp_path / "local").mkdir()
    assert model_path("org/name", tmp_path) == "org/name"  # a Hub id stays as written
    assert model_path("org/name@v1.0", tmp_path) == "org/name@v1.0"
    assert model_path("gpt2", tmp_path) == "gpt2"
    assert model_path("local", tmp_path) == str(tmp_path / "local")  # exists next to the study file
    assert model_path("./missing", tmp_path) == str(tmp_path / "missing")
    assert model_path("runs/models/a", tmp_path) == str(tmp_path / "runs" / "models" / "a")
    assert model_path("/abs/x", tmp_path) == "/abs/x"
    assert model_path("demo:parent_a", tmp_path) == str((DEMO_MODELS / "parent_a").resolve())
    # a model with a LoRA adapter: each side of the `+` by the same rule
    assert model_path("local+org/adapter", tmp_path) == f"{tmp_path / 'local'}+org/adapter"
    assert model_path("org/name@v1+./adapters/a", tmp_path) == f"org/name@v1+{tmp_path / 'adapters' / 'a'}"
    assert storage_path("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    assert storage_path("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert storage_path("runs/x.journal", tmp_path) == str(tmp_path / "runs" / "x.journal")
    assert storage_path("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def relative_study(study_parts, project: Path, **overrides) -> Path:
    """A study in `project` whose parents, tasks, storage and export dir are written relative to it."""
    for key in ("a", "b", "tasks"):
        shutil.copytree(study_parts[key], project / study_parts[key].name)
    (project / "runs").mkdir()
    study = study_dict({"a": Path("parent_a"), "b": Path("parent_b"), "tasks": Path("tasks")}, Path("runs"),
                       study={"n_trials": 2, "storage": "sqlite:///runs/toy.db"}, **overrides)
    return write_study(project / "study.yaml", study)


def test_study_paths_resolve_against_the_study_file(study_parts, tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    # the tasks' data_files are absolute here; demo.yaml's relative ones are covered by test_demo_study
    path = relative_study(study_parts, project)
    result = run_cli("start", str(path), cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (project / "runs" / "toy.db").is_file()
    assert not list(elsewhere.iterdir())
    exported = run_cli("export", str(path), cwd=elsewhere)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert list((project / "runs" / "export").glob("*.yml"))


def test_a_rewritten_parent_is_refused_by_name(study_parts, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    path = relative_study(study_parts, project)
    assert run_cli("start", str(path)).returncode == 0
    url = f"sqlite:///{project / 'runs' / 'toy.db'}"
    trials_before = len(optuna.load_study(study_name="toy", storage=url).trials)

    shutil.rmtree(project / "parent_b")
    build_tiny_model(project / "parent_b", "phi", seed=13)  # same shapes and sizes, other weights
    result = run_cli("start", str(path), "--n-trials", "3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(project / "parent_b") in lines[0] and "--allow-changed-parents" in lines[0]
    assert len(optuna.load_study(study_name="toy", storage=url).trials) == trials_before  # nothing written

    result = run_cli("start", str(path), "--n-trials", "3", "--allow-changed-parents")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("key", ["models", "include_path"])
def test_missing_relative_path_names_the_study_folder(study_parts, tmp_path, key):
    project = tmp_path / "project"
    project.mkdir()
    path = relative_study(study_parts, project)
    text = path.read_text().replace("parent_b", "./nowhere/parent_b") if key == "models" else \
        path.read_text().replace("- tasks", "- nowhere")
    path.write_text(text)
    result = run_cli("start", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert str(project / "nowhere") in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_model_references_in_mapping_form_resolve_too(tmp_path):
    """mergekit's `{model: {path, revision}}` and `{path}` forms of a parent, in `models`, `base_model` and
    slice sources, resolve against the study file like plain strings; Hub ids stay as written."""
    from search.study_config import resolve_paths

    (tmp_path / "a").mkdir()
    data = {"merge": {"models": [{"model": {"path": "a", "revision": "main"}}, "org/name"],
                      "base_model": {"path": "./a"},
                      "slices": [{"sources": [{"model": {"model": {"path": "a"}}, "layer_range": [0, 2]},
                                              {"model": "org/other@v1", "layer_range": [0, 2]}]}]}}
    merge = resolve_paths(data, tmp_path)["merge"]
    local = str(tmp_path / "a")
    assert merge["models"] == [{"model": {"path": local, "revision": "main"}}, "org/name"]
    assert merge["base_model"] == {"path": local}
    assert merge["slices"][0]["sources"][0]["model"] == {"model": {"path": local}}
    assert merge["slices"][0]["sources"][1]["model"] == "org/other@v1"

"""Multi-stage studies: the whole chain searched as one, every candidate built in memory, exported for
mergekit-multi."""

from __future__ import annotations

import optuna
import yaml

from tests.conftest import REPO, run_cli
from tests.merge_core.test_chain import SEED, mergekit_multi, three_stages, write_docs
from tests.merge_core.test_methods_oracle import ulp_report
from tests.merge_core.test_oracle import load_folder
from tests.search.conftest import write_task


def chain_study(families, tmp_path) -> dict:
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    write_task(tasks, "toy_a", 1)
    write_docs(tmp_path / "chain.yml", three_stages(families["phi"]))
    return {
        "study": {"name": "chain", "storage": f"sqlite:///{tmp_path / 'chain.db'}", "sampler": "tpe",
                  "n_trials": 3, "seed": 0},
        "merge": {"config": "chain.yml", "random_seed": SEED},
        "search_space": [
            {"stage": "first", "parameter": "t", "filter": "self_attn", "anchors": 3, "low": 0, "high": 1},
            {"stage": "second", "parameter": "weight", "models": ["first"], "anchors": 1, "low": 0, "high": 1},
            {"stage": "final", "parameter": "t", "anchors": 2, "low": 0, "high": 1},
        ],
        "objectives": {"include_path": [str(tasks)], "batch_size": 8, "tasks": [
            {"name": "toy_a", "metric": "acc", "search_items": 20, "holdout_items": 10}]},
        "pruner": {"type": "none"},
        "export": {"top_k": 1, "dir": str(tmp_path / "export")},
    }


def test_chain_study_end_to_end(families, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(chain_study(families, tmp_path)))
    dry = run_cli("start", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "stage first" in dry.stdout and "stage final" in dry.stdout and "second.weight.first.default.0" in dry.stdout
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="chain", storage=f"sqlite:///{tmp_path / 'chain.db'}")
    baseline = next(t for t in study.trials if t.user_attrs.get("baseline"))
    assert baseline.params["first.t.self_attn.1"] == 0.5 and baseline.params["final.t.default.1"] == 0.7
    assert run_cli("export", str(path)).returncode == 0
    best = sorted((tmp_path / "export").glob("*.yml"))[0]
    assert "--random-seed" in best.read_text() and best.read_text().count("---") == 2
    ours = run_cli("merge", str(best), str(tmp_path / "ours"), "--random-seed", str(SEED))
    assert ours.returncode == 0, ours.stderr
    theirs = load_folder(mergekit_multi(best, tmp_path / "mk", tmp_path / "inter"))
    off = {n: r for n, r in ulp_report(load_folder(tmp_path / "ours"), theirs).items() if r[0]}
    assert not off, off  # within 1 ulp of mergekit-multi (SLERP's angle is summed in another order)


def test_chain_study_errors(families, tmp_path):
    data = chain_study(families, tmp_path)
    data["search_space"][0].pop("stage")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("start", str(path), "--dry-run")
    assert result.returncode == 2 and "search_space.0.stage: required in a chain study" in result.stderr


def test_dkers_dry_run_offline():
    result = run_cli("start", str(REPO / "studies" / "dkers.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr
    for stage in ("stage dpo_hermes", "stage hermes_again", "stage psy", "stage final"):
        assert stage in result.stdout

"""The second demo (studies/demo3.yaml): three fine-tunes, a hand-written dare_ties baseline.

From an empty folder `search demo --study studies/demo3.yaml` builds the base and its three
children, searches, and exports; the exported best built by mergekit in-process (run_merge with
the study's random_seed) equals `search merge ... --random-seed` of it tensor for tensor. The
full-size run (slow) shows the claim of the README table: best held-out >= baseline + 0.05 and
above each child scored alone on the same held-out items.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

STUDY = REPO / "studies" / "demo3.yaml"
CHILDREN = ("shift", "double", "mirror")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder whose ./runs/demo3-models the first test run builds and later ones reuse."""
    return tmp_path_factory.mktemp("demo3")


def _status(cwd: Path, *args: str) -> dict:
    result = run_cli("status", str(STUDY), "--json", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_demo3_runs_and_its_export_builds_the_same_through_mergekit(workdir: Path, monkeypatch) -> None:
    storage = "sqlite:///runs/demo3-small.db"
    # `--study demo3` names the study shipped with the package (studies/demo3.yaml in a checkout)
    result = run_cli("demo", "--study", "demo3", "--n-trials", "4", "--storage", storage,
                     "--study-name", "demo3-small", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--random-seed 0" in result.stdout
    for name in ("base", *CHILDREN):
        assert (workdir / "runs" / "demo3-models" / name / "model.safetensors").is_file()
    status = _status(workdir, "--storage", storage, "--study-name", "demo3-small")
    assert status["n_complete"] + status["n_pruned"] == 4
    # held-out items judge the final pick (made on validation items) and the baseline, nothing else
    assert status["baseline"]["holdout"] is not None and status["final_pick"]["holdout"] is not None
    assert status["selection"]["picked_on"] == "validation"

    _export_builds_the_same(workdir, "demo3-small", monkeypatch)


def _export_builds_the_same(workdir: Path, study_name: str, monkeypatch) -> None:
    """The exported best through mergekit's run_merge (the study's seed) equals `search merge` of it."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = study_name
    best = sorted((workdir / "runs" / study_name / "export").glob("01-*.yml"))[0]
    config = yaml.safe_load(best.read_text())
    assert config["merge_method"] == "dare_ties" and len(config["models"]) == 3
    seed = yaml.safe_load(STUDY.read_text())["merge"]["random_seed"]
    assert f"--random-seed {seed}" in best.read_text()  # the export says how to rebuild its masks
    ours = run_cli("merge", str(best), f"{out}-ours", "--random-seed", str(seed), cwd=workdir)
    assert ours.returncode == 0, ours.stderr[-2000:]
    monkeypatch.chdir(workdir)  # the exported model paths are relative to the folder the demo ran in
    run_merge(MergeConfiguration.model_validate(config), f"{out}-mergekit",
              MergeOptions(quiet=True, write_model_card=False, random_seed=seed))
    mine, theirs = _tensors(workdir / f"{out}-ours"), _tensors(workdir / f"{out}-mergekit")
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name


def holdout_scores(model_dir: Path) -> dict[str, float]:
    """A model folder scored on the study's held-out items (the same Suite the runner builds)."""
    from objectives.loading import load_model, load_tokenizer
    from objectives.suite import Suite
    from objectives.tasks import TaskSpec
    from search.study_config import load_study_file

    study = load_study_file(STUDY)
    tokenizer, _ = load_tokenizer(model_dir)
    specs = [TaskSpec(**t.model_dump()) for t in study.objectives.tasks]
    suite = Suite.build(specs, tokenizer, [str(p) for p in study.objectives.include_path],
                        max_length=study.objectives.max_length)
    held = suite.evaluate(load_model(model_dir, dtype="float32"), "holdout", study.objectives.batch_size)
    return {"weighted": held.score, **held.task_scores}


@pytest.mark.slow
def test_demo3_full_run_beats_its_baseline_and_every_child_held_out(workdir: Path, monkeypatch) -> None:
    result = run_cli("demo", "--study", str(STUDY), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    status = _status(workdir)
    baseline, best = status["baseline"]["holdout"], status["final_pick"]["holdout"]
    children = {name: holdout_scores(workdir / "runs" / "demo3-models" / name)["weighted"] for name in CHILDREN}
    print(json.dumps({"baseline": baseline, "best": best, "children": children}))
    assert best >= baseline + 0.05
    assert all(best > score for score in children.values()), children
    _export_builds_the_same(workdir, "demo3", monkeypatch)

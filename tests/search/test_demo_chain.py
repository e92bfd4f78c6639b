"""The chain demo (studies/demo-chain.yaml): three stages (slerp, ties, linear) searched jointly.

From an empty folder `search demo --study demo-chain` builds the second demo's models, searches a
small budget and exports its top chains as mergekit-multi files. Each parses with mergekit-multi's
own loader (stages, names, dependencies), `search merge` of it equals bit for bit the in-memory
candidate the study scored, and for the searched (non-baseline) ones mergekit run stage by stage
(what mergekit-multi does) gives the same tensors within 1 ulp (SLERP's angle is summed in another
order).
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from search.runner import Candidates
from search.study_config import load_study_file
from tests.conftest import REPO, run_cli
from tests.merge_core.test_methods_oracle import ulp_report
from tests.merge_core.test_oracle import load_folder

STUDY = REPO / "studies" / "demo-chain.yaml"
STAGES = ("letters_digits", "three_skills", None)


@pytest.mark.slow
def test_demo_chain_export_rebuilds_the_scored_candidate(tmp_path: Path, monkeypatch) -> None:
    storage, name = "sqlite:///runs/dc-small.db", "dc-small"
    result = run_cli("demo", "--study", "demo-chain", "--n-trials", "4", "--storage", storage,
                     "--study-name", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mergekit-multi" in result.stdout
    status = run_cli("status", str(STUDY), "--json", "--storage", storage, "--study-name", name, cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-2000:]
    summary = json.loads(status.stdout)
    assert summary["n_complete"] + summary["n_pruned"] == 4
    assert summary["baseline"]["holdout"] is not None and summary["best"]["holdout"] is not None

    exported = sorted((tmp_path / "runs" / name / "export").glob("*.yml"))  # top 3 of the unpruned trials
    assert len(exported) >= 2  # the baseline and at least one searched chain
    monkeypatch.chdir(tmp_path)  # the chain's model paths are relative to the folder the demo ran in
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / f'{name}.db'}")
    candidates = Candidates(load_study_file(STUDY), "cpu")
    searched = 0
    for path in exported:
        text = path.read_text()
        trial = study.trials[int(path.stem.split("-trial")[1])]  # NN-trial<N>.yml
        inter = tmp_path / f"inter-{trial.number}"
        configs, uses = _mergekit_multi_parse(text, inter)
        assert set(configs) == set(STAGES)
        assert uses["three_skills"] == {"letters_digits"} and uses[None] == {"three_skills", "letters_digits"}
        assert [configs[s].merge_method for s in STAGES] == ["slerp", "ties", "linear"]
        assert text.endswith(trial.user_attrs["mergekit_yaml"])  # the export is the trial's own chain
        out = tmp_path / f"ours-{trial.number}"
        ours = run_cli("merge", str(path), str(out), cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr[-2000:]
        written = load_folder(out)
        candidates.build(trial.user_attrs["recipe"])  # the candidate as the study built and scored it
        live = {n: p.detach() for n, p in candidates.model.state_dict().items() if n in written}
        assert sorted(live) == sorted(written)
        for tensor_name, tensor in written.items():
            assert live[tensor_name].dtype == tensor.dtype and torch.equal(live[tensor_name], tensor), tensor_name
        if trial.user_attrs.get("baseline"):
            continue
        theirs = _mergekit_stage_by_stage(configs, uses, inter, tmp_path / f"mergekit-{trial.number}")
        off = {n: r for n, r in ulp_report(written, theirs).items() if r[0]}
        assert not off, (path.name, off)
        searched += 1
    assert searched >= 1


def _mergekit_multi_parse(text: str, intermediate: Path) -> tuple[dict, dict]:
    """mergekit-multi's own reading of a multi-document file: configs and dependencies by stage name."""
    from mergekit.scripts.multimerge import load_config

    return load_config(text, str(intermediate))


def _mergekit_stage_by_stage(configs: dict, uses: dict, intermediate: Path, out: Path) -> dict[str, torch.Tensor]:
    """What mergekit-multi writes: each stage merged by mergekit in dependency order."""
    from mergekit.merge import MergeOptions, run_merge

    for stage in STAGES:  # already in dependency order: each uses only stages before it
        assert uses[stage] <= {s for s in STAGES[:STAGES.index(stage)]}
        run_merge(configs[stage], str(out if stage is None else intermediate / stage),
                  MergeOptions(quiet=True, write_model_card=False))
    return load_folder(out)


def test_demo_chain_dry_run_shows_every_stage_searched() -> None:
    result = run_cli("start", str(STUDY), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("stage letters_digits: slerp", "stage three_skills: ties", "stage final: linear",
                 "letters_digits.t.mlp.1", "three_skills.density.mirror.default.0",
                 "final.weight.letters_digits.default.1"):
        assert line in result.stdout, line

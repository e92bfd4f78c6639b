"""Per-block values (mergekit-evolve's layer_granularity): `blocks: B` in a study over a mergekit config.

mergekit is the oracle: the baseline (trial 0) exported through mergekit-yaml equals the input config,
and a sampled point exported and built by mergekit equals the candidate built in memory.
"""

from __future__ import annotations

import random

import pytest
import yaml

from merge_core.merger import MergePlan, Merger
from search.config_space import ConfigSpace
from search.errors import StudyError
from search.study_config import SpaceItem
from tests.conftest import run_cli
from tests.merge_core.test_methods_oracle import mergekit_merge
from tests.merge_core.test_oracle import load_folder
from tests.search.test_config_study import same_weights


def family_configs(f) -> dict[str, dict]:
    """Configs over the 4-layer family: `models:` form, and slices already cut into blocks (as evolve writes)."""
    child = [str(f[f"child_{i}"]) for i in (1, 2, 3)]
    base = str(f["base"])
    evolve_slices = [{"sources": [{"model": m, "layer_range": [a, b], "parameters": {"weight": w + i / 10}}
                                  for i, m in enumerate(child)] + [{"model": base, "layer_range": [a, b]}]}
                     for (a, b), w in (((0, 2), 0.3), ((2, 4), 0.5))]
    return {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": m, "parameters": {"weight": w}}
                              for m, w in zip(child, [0.5, 0.3, 1.2], strict=True)]},
        # float32: in half types mergekit's choice among magnitudes tied at the threshold is arbitrary
        # (tests/merge_core/test_methods_oracle.py), and this file compares bit for bit.
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"lambda": 0.9},
                 "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.6}} for m in child]},
        "evolve": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                   "parameters": {"normalize": False}, "slices": evolve_slices},
    }


CASES = {  # config, search_space items
    "linear": ("linear", [{"parameter": "weight", "models": "all", "blocks": 4, "low": 0.0, "high": 2.0}]),
    "ties-filters": ("ties", [
        {"parameter": "weight", "models": "all", "filter": "mlp", "blocks": 2},
        {"parameter": "density", "models": ["child_2"], "blocks": 3},  # uneven: layers 0 | 1 | 2-3
        {"parameter": "lambda", "blocks": 2, "low": 0.5, "high": 1.0}]),
    "evolve": ("evolve", [{"parameter": "weight", "models": "all", "blocks": 2}]),
}


def space_for(families, case: str) -> tuple[ConfigSpace, dict]:
    name, items = CASES[case]
    config = family_configs(families["phi"])[name]
    from merge_core.config import parse_config

    return ConfigSpace(parse_config(config), [SpaceItem(**i) for i in items]), config


@pytest.mark.parametrize("case", list(CASES))
def test_trial0_export_is_the_input_config(families, tmp_path, case):
    space, config = space_for(families, case)
    trial0 = space.config_of(space.recipe(space.params_of(space.baseline)))  # the baseline as Optuna values
    assert trial0.slices is not None and len(trial0.slices) >= 2  # exported as slices, one run of layers each
    expected = load_folder(mergekit_merge(config, tmp_path / "input", seed=0))
    got = load_folder(mergekit_merge(yaml.safe_load(trial0.to_yaml()), tmp_path / "trial0", seed=0))
    same_weights(got, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_point_in_memory_equals_mergekit(families, tmp_path, case):
    space, _ = space_for(families, case)
    rng = random.Random(case)
    params = {n: rng.uniform(d.low, d.high) for n, d in space.distributions().items()}
    candidate = space.config_of(space.recipe(params))
    merger = Merger(MergePlan(space.config_of(space.baseline)))  # what Candidates builds once per study
    model = merger.new_model()
    merger.build_into(model, candidate)
    expected = load_folder(mergekit_merge(yaml.safe_load(candidate.to_yaml()), tmp_path / "mk", seed=0))
    live = {n: p.detach() for n, p in model.state_dict().items() if n in expected}
    same_weights(live, expected)
    assert space.params_of(space.recipe(params)) == pytest.approx(params)  # a point maps back to itself


def test_names_say_the_block(families):
    space, _ = space_for(families, "ties-filters")
    names = list(space.distributions())
    assert "weight.child_1.mlp.b0" in names and "weight.child_3.mlp.b1" in names
    assert [n for n in names if n.startswith("density.")] == [f"density.child_2.default.b{i}" for i in range(3)]
    assert "lambda.default.b1" in names


def test_evolve_slices_are_read_per_block(families):
    space, _ = space_for(families, "evolve")
    params = space.params_of(space.baseline)
    assert params["weight.child_1.default.b0"] == 0.3 and params["weight.child_3.default.b1"] == pytest.approx(0.7)


@pytest.mark.parametrize("items,message", [
    ([{"parameter": "weight", "models": "all", "blocks": 5}], "5 blocks but the merge has 4 layers; use at most 4"),
    ([{"parameter": "weight", "models": "all", "blocks": 2}, {"parameter": "density", "models": "all", "anchors": 2}],
     "search_space.1.anchors"),
])
def test_bad_blocks_are_one_line(families, items, message):
    from merge_core.config import parse_config

    config = parse_config(family_configs(families["phi"])["ties"])
    with pytest.raises(StudyError, match=message) as caught:
        ConfigSpace(config, [SpaceItem(**i) for i in items])
    assert "\n" not in str(caught.value)


def test_gradient_the_blocks_would_restart_is_refused(families):
    from merge_core.config import parse_config

    config = family_configs(families["phi"])["ties"]
    config["models"][0]["parameters"]["density"] = [0.3, 0.6]
    with pytest.raises(StudyError, match="restarts the gradient of density of .*child_1"):
        ConfigSpace(parse_config(config), [SpaceItem(parameter="weight", models="all", blocks=2)])


def test_evolve_blocks_not_matching_the_slices(families):
    space, _ = space_for(families, "evolve")
    from merge_core.config import parse_config

    one = ConfigSpace(parse_config(family_configs(families["phi"])["evolve"]),
                      [SpaceItem(parameter="weight", models="all", blocks=1)])
    with pytest.raises(StudyError, match=r"differs inside block 0 \(layers 0-3\): 0.3 and 0.5"):
        one.params_of(one.baseline)
    assert space.pieces == [(0, 2), (2, 4)]


def test_too_many_blocks_in_a_study_file_is_one_line(families, tmp_path):
    from tests.search.test_config_study import study

    data = study(families, tmp_path, "tpe", space=[{"parameter": "weight", "models": "all", "blocks": 9}])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("start", str(path), "--dry-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "search_space.0.blocks: 9 blocks but the merge has 4 layers" in lines[0]


def test_blocks_study_end_to_end(families, tmp_path):
    """`search start` on a blocks study: trial 0's stored mergekit YAML merges to the input config's model."""
    import optuna

    from search.trial_record import TrialRecord
    from tests.search.test_config_study import study

    config = family_configs(families["phi"])["evolve"]
    data = study(families, tmp_path, "tpe", space=[{"parameter": "weight", "models": "all", "blocks": 4}])
    data["merge"]["config"] = config
    data["study"]["n_trials"] = 2
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    dry = run_cli("start", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "weight.child_2.default.b3" in dry.stdout
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = optuna.load_study(study_name=data["study"]["name"], storage=data["study"]["storage"])
    trial0 = TrialRecord.of(loaded.trials[0])
    assert trial0.baseline and trial0.params["weight.child_1.default.b1"] == 0.3
    expected = load_folder(mergekit_merge(config, tmp_path / "input", seed=0))
    exported = yaml.safe_load(trial0.mergekit_yaml)
    assert len(exported["slices"]) == 4
    same_weights(load_folder(mergekit_merge(exported, tmp_path / "trial0", seed=0)), expected)

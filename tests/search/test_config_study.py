"""Studies over any mergekit config: `search init`, trial 0 is the input config, end to end with export."""

from __future__ import annotations

import pytest
import torch
import yaml

from search.space import space_of
from search.study_config import load_study_file
from tests.conftest import WORDS, build_tiny_model, run_cli
from tests.merge_core.test_methods_oracle import mergekit_merge
from tests.merge_core.test_oracle import load_folder
from tests.search.conftest import write_task


def configs(f) -> dict[str, dict]:
    """Hand-written configs of five methods over a family (gradients, filters, per-model values)."""
    child = [str(f[f"child_{i}"]) for i in (1, 2, 3)]
    base = str(f["base"])
    return {
        "slerp_slices": {"merge_method": "slerp", "base_model": base, "dtype": "float16", "slices": [
            {"sources": [{"model": base, "layer_range": [0, 4]}, {"model": child[0], "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": m, "parameters": {"weight": w}}
                              for m, w in zip(child, [0.5, 0.3, 1.2], strict=True)]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "parameters": {"lambda": 0.9},
                 "models": [{"model": m, "parameters": {"weight": 0.5, "density": [0.3, 0.6]}} for m in child]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "dtype": "float16",
                      "parameters": {"int8_mask": True},
                      "models": [{"model": child[0], "parameters": {
                          "weight": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}],
                          "density": [{"filter": "self_attn", "value": 0.4}, {"value": [0.5, 0.7, 0.9]}]}},
                          {"model": child[1], "parameters": {"weight": 0.4, "density": 0.6}}]},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float16",
                        "parameters": {"filter_wise": False}, "models": [{"model": m} for m in child]},
    }


def same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["slerp_slices", "linear", "ties", "dare_ties", "model_stock"])
def test_init_gives_a_study_whose_trial0_is_the_config(families, tmp_path, method):
    config = configs(families["phi"])[method]
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(config))
    made = run_cli("init", str(path), "--tasks", "toy_a")
    assert made.returncode == 0, made.stderr
    study_path = tmp_path / f"{method}.study.yaml"
    dry = run_cli("start", str(study_path), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert ("weight." in dry.stdout) == (method in ("linear", "ties", "dare_ties"))

    space = space_of(load_study_file(study_path))
    trial0 = space.config_of(space.baseline)  # what the runner builds for the enqueued baseline
    sampled = space.config_of(space.recipe(space.params_of(space.baseline)))  # the same point as parameters
    expected = load_folder(mergekit_merge(config, tmp_path / "input", seed=0))
    for name, candidate in (("trial0", trial0), ("sampled", sampled)):
        data = yaml.safe_load(candidate.to_yaml())
        same_weights(load_folder(mergekit_merge(data, tmp_path / name, seed=0)), expected)


def _bad_for_init(f, case: str) -> tuple[dict, str]:
    base, c1, c2, c3 = str(f["base"]), str(f["child_1"]), str(f["child_2"]), str(f["child_3"])
    ties = {"merge_method": "ties", "base_model": base,
            "models": [{"model": c, "parameters": {"weight": 0.5, "density": 0.5}} for c in (c1, c2)]}
    if case == "missing folder":
        return ties | {"base_model": base + "-gone"}, "-gone: no such folder"
    if case == "misspelt parameter":
        ties["models"][0]["parameters"] = {"weight": 0.5, "densty": 0.5}
        return ties, "did you mean 'density'"
    if case == "slerp of three":
        return {"merge_method": "slerp", "base_model": c1, "parameters": {"t": 0.5},
                "models": [{"model": c} for c in (c1, c2, c3)]}, "exactly 2 models"
    if case == "della epsilon":
        return ties | {"merge_method": "della", "parameters": {"epsilon": 0.6}}, "+/- epsilon 0.6 must stay inside"
    if case == "nothing to search":
        return {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": c1}]}, \
            "arcee_fusion has no parameters, so there is nothing to search"
    return {"merge_method": "slerp", "base_model": base, "slices": [  # slice-level parameters
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": c1, "layer_range": [0, 2]}],
         "parameters": {"t": 0.3}},
        {"sources": [{"model": base, "layer_range": [2, 4]}, {"model": c1, "layer_range": [2, 4]}],
         "parameters": {"t": 0.7}}]}, "its numbers are in slices.0.parameters, which a study keeps as written"


@pytest.mark.parametrize("case", ["missing folder", "misspelt parameter", "slerp of three", "della epsilon",
                                  "nothing to search", "slice parameters"])
def test_init_refuses_what_start_would(families, tmp_path, case):
    """A config search start would refuse (or could never search) is refused by init: one line, exit 2, no file."""
    config, needle = _bad_for_init(families["phi"], case)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    made = run_cli("init", str(path), "--tasks", "toy_a")
    lines = made.stderr.strip().splitlines()
    assert made.returncode == 2 and len(lines) == 1 and needle in lines[0], made.stderr
    assert not (tmp_path / "c.study.yaml").exists()


def test_init_keeps_slice_level_parameters_as_written(families, tmp_path):
    """A blocks export's shape: per-source numbers are searched, the slice's own parameters kept as written."""
    f = families["phi"]
    sources = [{"model": str(f[c]), "layer_range": [0, 4], "parameters": {"weight": w}}
               for c, w in (("child_1", 0.6), ("child_2", 0.4))]
    config = {"merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
              "slices": [{"sources": [{"model": str(f["base"]), "layer_range": [0, 4]}, *sources],
                          "parameters": {"lambda": 0.9}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    made = run_cli("init", str(path), "--tasks", "toy_a")
    assert made.returncode == 0, made.stderr
    items = yaml.safe_load((tmp_path / "c.study.yaml").read_text())["search_space"]
    assert [i["parameter"] for i in items] == ["weight", "weight"]
    dry = run_cli("start", str(tmp_path / "c.study.yaml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    space = space_of(load_study_file(tmp_path / "c.study.yaml"))
    assert space.config_of(space.baseline).slices[0].parameters["lambda"] == 0.9


def test_dry_run_checks_the_merge_when_the_parents_are_on_disk(families, tmp_path):
    """--dry-run loads no weights, but the config and every range end are checked against the method."""
    doc = _della_study(families, tmp_path, [
        {"parameter": "epsilon", "models": ["child_1"], "anchors": 1, "low": 0.05, "high": 0.7}])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    dry = run_cli("start", str(path), "--dry-run")
    lines = dry.stderr.strip().splitlines()
    assert dry.returncode == 2 and len(lines) == 1 and "epsilon 0.7 must stay inside (0, 1)" in lines[0], dry.stderr
    doc["merge"]["config"]["base_model"] += "-gone"
    path.write_text(yaml.safe_dump(doc))
    dry = run_cli("start", str(path), "--dry-run")
    assert dry.returncode == 2 and "-gone: no such folder" in dry.stderr, dry.stderr


@pytest.mark.parametrize("method,parameter,value,expected", [
    ("nearswap", "t", 0.001, (1e-5, 0.1)), ("ram", "epsilon", 1e-5, (1e-7, 0.01)), ("nearswap", "t", 0.5, (1e-5, 0.5))])
def test_init_searches_delta_thresholds_on_a_log_scale(families, tmp_path, method, parameter, value, expected):
    """nearswap's t and ram's epsilon compare with delta sizes: a log range over those sizes that holds the
    config's own value (a t above every |delta| gives the other model unchanged)."""
    f = families["phi"]
    config = {"merge_method": method, "base_model": str(f["base"]), "parameters": {parameter: value},
              "models": [{"model": str(f["base"])}, {"model": str(f["child_1"])}]
              + ([{"model": str(f["child_2"])}] if method == "ram" else [])}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    made = run_cli("init", str(path), "--tasks", "toy_a")
    assert made.returncode == 0, made.stderr
    (item,) = yaml.safe_load((tmp_path / "c.study.yaml").read_text())["search_space"]
    assert item["parameter"] == parameter and item["log"] is True
    assert (item["low"], item["high"]) == expected


def test_init_refuses_to_overwrite(families, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(configs(families["phi"])["linear"]))
    assert run_cli("init", str(path)).returncode == 0
    again = run_cli("init", str(path))
    assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def study(families, tmp_path, sampler: str, multi: bool = False, **space_overrides) -> dict:
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    write_task(tasks, "toy_a", 1)
    write_task(tasks, "toy_b", 2)
    config = configs(families["phi"])["dare_ties"]
    space = [
        {"parameter": "weight", "models": "all", "filter": "mlp", "anchors": 2, "low": 0.0, "high": 1.0},
        {"parameter": "weight", "models": "all", "anchors": 1, "low": 0.0, "high": 1.0},
        {"parameter": "density", "models": ["child_2"], "anchors": 1, "low": 0.2, "high": 1.0},
        {"parameter": "int8_mask", "choices": [True, False]},
    ]
    return {
        "study": {"name": f"cfg-{sampler}", "storage": f"sqlite:///{tmp_path / 'cfg.db'}", "sampler": sampler,
                  "n_trials": 4, "seed": 0} | ({"objective": "per_task"} if multi else {}),
        "merge": {"config": config, "random_seed": 3},
        "search_space": space_overrides.get("space", space),
        "objectives": {"include_path": [str(tasks)], "batch_size": 8, "tasks": [
            {"name": "toy_a", "metric": "acc", "search_items": 20, "holdout_items": 10},
            {"name": "toy_b", "metric": "acc", "search_items": 20, "holdout_items": 10}]},
        "pruner": {"type": "none"},
        "export": {"top_k": 1, "dir": str(tmp_path / "export")},
    }


def test_config_study_end_to_end(families, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(families, tmp_path, "tpe")))
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    exported = run_cli("export", str(path))
    assert exported.returncode == 0, exported.stderr
    best = sorted((tmp_path / "export").glob("*.yml"))[0]
    text = best.read_text()
    assert "--random-seed 3" in text  # randomised method: the export says which masks were scored
    ours = run_cli("merge", str(best), str(tmp_path / "ours"), "--random-seed", "3")
    assert ours.returncode == 0, ours.stderr
    theirs = mergekit_merge(yaml.safe_load(text), tmp_path / "mk", seed=3)
    same = load_folder(tmp_path / "ours")
    for name, tensor in load_folder(theirs).items():
        assert torch.equal(same[name], tensor), name


def test_baseline_outside_the_space(families, tmp_path):
    space = [{"parameter": "weight", "models": ["child_2"], "anchors": 1, "low": 0.5, "high": 1.0}]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(families, tmp_path, "tpe", space=space)))
    result = run_cli("start", str(path), "--dry-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "weight of" in lines[0] and "0.4 is outside the searched range [0.5, 1]" in lines[0]


def test_from_evolve(families, tmp_path):
    """mergekit-evolve's documented example (its Hub models replaced by a local family of the same shape)."""
    f = families["phi"]
    genome = {"genome": {"models": [str(f["child_1"]), str(f["child_2"]), str(f["child_3"])],
                         "merge_method": "task_arithmetic", "base_model": str(f["base"]),
                         "layer_granularity": 2, "allow_negative_weights": True, "filters": ["self_attn", "mlp"]},
              "tasks": [{"name": "toy_a", "weight": 1.0, "metric": "acc,none"}, {"name": "toy_b", "weight": 2.0}],
              "limit": 50, "shuffle": True}
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(genome))
    made = run_cli("init", "--from-evolve", str(path), "--out", str(tmp_path / "study.yaml"))
    assert made.returncode == 0, made.stderr
    # What could not be carried over is said in one line.
    notes = [line for line in made.stdout.splitlines() if line.startswith("changed from mergekit-evolve")]
    assert len(notes) == 1 and "layer_granularity" not in notes[0] and "shuffle" in notes[0]
    assert run_cli("start", str(tmp_path / "study.yaml"), "--dry-run").returncode == 0
    study_file = load_study_file(tmp_path / "study.yaml")
    space = space_of(study_file)
    # models -> per-model weight over every child; filters + the default -> one entry each; one value per
    # block of layer_granularity layers (blocks: num_layers / layer_granularity); allow_negative_weights ->
    # low -1; tasks keep weight and metric; limit -> search_items; normalize unset -> off for
    # task_arithmetic (mergekit-evolve's rule).
    names = list(space.distributions())
    assert len(names) == 3 * 3 * 2 and "weight.child_1.self_attn.b0" in names and "weight.child_3.default.b1" in names
    assert all(d.low == -1.0 and d.high == 1.0 for d in space.distributions().values())
    assert space.config.merge_method == "task_arithmetic" and space.config.base_model == str(f["base"])
    assert space.config.parameters["normalize"] is False
    tasks = {t.name: t for t in study_file.objectives.tasks}
    assert tasks["toy_a"].metric == "acc" and tasks["toy_b"].weight == 2.0 and tasks["toy_a"].search_items == 50
    space.params_of(space.baseline)  # the uniform baseline lies inside the space


@pytest.mark.parametrize("sampler,per_task", [("gp", False), ("cmaes", False), ("random", False), ("tpe", True),
                                              ("nsga2", True)])
def test_samplers_with_a_three_model_method(families, tmp_path, sampler, per_task):
    data = study(families, tmp_path, sampler, multi=per_task)
    data["study"]["n_trials"] = 3
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    import optuna

    loaded = optuna.load_study(study_name=data["study"]["name"], storage=data["study"]["storage"])
    assert len(loaded.directions) == (2 if per_task else 1)
    finished = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3 and all("weight.child_1.mlp.0" in t.params for t in finished)


def test_study_over_a_padded_vocabulary(families, tmp_path):
    """tokenizer_source on embeddings with spare rows (phi-2's case): the study's candidates are cut to the
    tokenizer like `search merge` and mergekit, score with that tokenizer, and the export rebuilds the best."""
    rows = len(WORDS) + 2 + 7
    models = [build_tiny_model(tmp_path / name, "phi", seed=seed, vocab_rows=rows)
              for name, seed in (("base", 1), ("child", 2))]
    config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base", "base_model": str(models[0]),
              "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}
    doc = study(families, tmp_path, "random", space=[
        {"parameter": "weight", "models": "all", "anchors": 1, "low": 0.1, "high": 1.0}])
    doc["merge"] = {"config": config}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    exported = run_cli("export", str(path))
    assert exported.returncode == 0, exported.stderr
    best = sorted((tmp_path / "export").glob("*.yml"))[0]
    ours = run_cli("merge", str(best), str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stderr
    merged = load_folder(tmp_path / "ours")
    assert merged["model.embed_tokens.weight"].shape[0] == len(WORDS) + 2
    theirs = load_folder(mergekit_merge(yaml.safe_load(best.read_text()), tmp_path / "mk", seed=0))
    same_weights(merged, theirs)


def _della_study(families, tmp_path, space, sampler_seed=0, n_trials=4) -> dict:
    f = families["phi"]
    doc = study(families, tmp_path, "random", space=space)
    doc["study"].update(seed=sampler_seed, n_trials=n_trials)
    doc["merge"]["config"] = {"merge_method": "della", "base_model": str(f["base"]), "dtype": "float32",
                              "models": [{"model": str(f[c]), "parameters": {"weight": 0.5, "density": 0.5,
                                                                              "epsilon": 0.1}}
                                         for c in ("child_1", "child_2")]}
    return doc


def test_a_range_whose_end_the_method_refuses_is_refused_before_the_study(families, tmp_path):
    """epsilon up to 0.7 at density 0.5 is not a della merge: refused in one line at start, no storage."""
    doc = _della_study(families, tmp_path, [
        {"parameter": "epsilon", "models": ["child_1"], "anchors": 1, "low": 0.05, "high": 0.7}])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run_cli("start", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "= 0.7 (the high end of its range)" in lines[0] and "epsilon 0.7 must stay inside (0, 1)" in lines[0]
    assert "narrow the range" in lines[0] and not (tmp_path / "cfg.db").exists()


def test_a_sampled_point_the_method_refuses_fails_its_trial_in_one_line(families, tmp_path):
    """Every range end is a della merge, but a low density with a high epsilon is not: that trial fails
    with its reason (no traceback) and the study fills its budget with valid trials."""
    import optuna

    # with sampler seed 7, trial 1 draws density 0.13, epsilon 0.14 (checked when this test was written)
    doc = _della_study(families, tmp_path, [
        {"parameter": "density", "models": ["child_1"], "anchors": 1, "low": 0.1, "high": 0.5},
        {"parameter": "epsilon", "models": ["child_1"], "anchors": 1, "low": 0.01, "high": 0.18}],
        sampler_seed=7, n_trials=4)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    trials = optuna.load_study(study_name="cfg-random", storage=doc["study"]["storage"]).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, "the sampler no longer draws an invalid point: pick another seed"
    for trial in failed:
        density, epsilon = trial.params["density.child_1.default.0"], trial.params["epsilon.child_1.default.0"]
        assert density - epsilon <= 0 or density + epsilon >= 1
        assert trial.user_attrs["fail_reason"].startswith("invalid point: ")
        assert f"Trial {trial.number} is not a valid merge" in result.stderr
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 4


@pytest.mark.parametrize("item,needle", [
    ({"parameter": "weight", "anchors": 1, "low": 0.8, "high": 0.2}, "low (0.8) must not exceed high (0.2)"),
    ({"parameter": "weight", "anchors": 0}, "search_space.0.anchors: Input should be greater than or equal to 1"),
    ({"parameter": "weight", "anchors": 1, "low": 0, "high": 1, "log": True}, "log: needs low > 0"),
])
def test_a_bad_search_space_item_is_named(families, tmp_path, item, needle):
    """The list form's own error, not the mapping form's ("Input should be a valid dictionary")."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(families, tmp_path, "random", space=[item])))
    result = run_cli("start", str(path), "--dry-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert needle in lines[0] and "valid dictionary" not in lines[0], lines[0]

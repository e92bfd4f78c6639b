"""WilcoxonPruner stops clearly bad candidates early; pruned trials still carry a value."""

from __future__ import annotations

import json
import random

import optuna
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import WORDS, build_tiny_model, run_cli
from tests.search.conftest import TASK_YAML, study_dict, write_study

TOKEN = {w: i + 2 for i, w in enumerate(WORDS)}  # ids of the tests' word-level tokenizer


def biased_parent(folder, seed: int, word: str):
    """A tiny phi whose lm_head bias makes it answer `word` whatever the context."""
    build_tiny_model(folder, "phi", seed=seed)
    tensors = load_file(folder / "model.safetensors")
    bias = torch.zeros_like(tensors["lm_head.bias"])
    bias[TOKEN[word]] = 20.0
    tensors["lm_head.bias"] = bias
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("pruner", ["wilcoxon", "racing"])
def test_pruner_stops_bad_candidates(tmp_path, pruner):
    # parent_a answers "mat" (always right), parent_b answers "dog" (always a wrong choice):
    # lm_head takes the `default` t, so candidates with t.default.0 well above 0.5 are clearly bad.
    parts = {"a": biased_parent(tmp_path / "a", 1, "mat"), "b": biased_parent(tmp_path / "b", 2, "dog")}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rng = random.Random(0)
    rows = []
    for _ in range(80):
        others = rng.sample([w for w in WORDS if w not in ("mat", "dog")], 2)
        choices = rng.sample(["mat", "dog", *others], 4)
        rows.append({"context": " ".join(rng.sample(WORDS, 4)), "choices": choices, "label": choices.index("mat")})
    (tasks / "mat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "toy_mat.yaml").write_text(TASK_YAML.format(name="toy_mat", data=tasks / "mat.jsonl"))
    parts["tasks"] = tasks

    study = study_dict(parts, tmp_path, study={"sampler": "random", "n_trials": 12, "seed": 3},
                       pruner={"type": pruner, "p_threshold": 0.1, "n_startup_steps": 5},
                       selection={"top_k": 1},
                       search_space={"self_attn": {"value": 0.5}, "mlp": {"value": 0.5},
                                     "default": {"anchors": 1}})
    study["baseline"] = [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.5}, {"value": 0.1}]
    study["objectives"]["tasks"] = [{"name": "toy_mat", "metric": "acc", "search_items": 60, "holdout_items": 10}]
    path = write_study(tmp_path / "study.yaml", study)
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]

    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'toy.db'}").trials
    assert trials[0].user_attrs["baseline"] and trials[0].value == 1.0
    pruned = [t for t in trials if t.user_attrs.get("pruned")]
    bad = [t for t in trials if t.params["t.default.0"] > 0.7]
    assert bad, "the seed should sample some clearly bad candidates"
    assert {t.number for t in bad} <= {t.number for t in pruned}
    for trial in pruned:
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None
        assert trial.user_attrs["items_scored"] < 60 / 2, "a clearly bad candidate stops within half the items"
        assert 0 <= trial.value <= 1
    status = json.loads(run_cli("status", str(path), "--json").stdout)
    assert status["n_pruned"] == len(pruned) and status["n_complete"] == 12 - len(pruned)
    # the sampler is told a paired estimate, not the running mean: the best's score plus the mean
    # difference on the items both scored (the baseline, trial 0, is the best: it answers every item)
    best = trials[0].user_attrs["item_values"]
    assert len(best) == 60
    for trial in pruned:
        mine = trial.user_attrs["item_values"]
        assert len(mine) == trial.user_attrs["items_scored"]
        expected = trials[0].value + sum(a - b for a, b in zip(mine, best, strict=False)) / len(mine)
        assert trial.value == trial.user_attrs["estimate"]
        assert abs(trial.value - expected) < 1e-9
        # racing decides in the worker: no per-item storage writes
        assert bool(trial.intermediate_values) == (pruner == "wilcoxon")


def _race(differences, n_items=100):
    from search.pruners import Race

    race = Race(n_items=n_items, p_threshold=0.1, n_startup_steps=10)
    for d in differences:
        race.add(d)
    return race


def test_race_uses_the_items_left():
    assert not _race([0.0] * 10).lost()  # level so far
    assert _race([-1.0, 0.0] * 10).lost()  # 10 of 20 items lost, none won
    # one item lost in 20: too little evidence early, decisive when almost every item is scored
    behind_by_one = [-1.0] + [0.0] * 99
    assert not _race(behind_by_one[:20]).lost()
    assert _race(behind_by_one[:99]).lost()
    assert not _race(behind_by_one[:9]).lost()  # before n_startup_steps


def test_race_estimate_is_the_paired_mean_with_a_finite_population_error():
    import statistics

    diffs = [0.5, -1.0, 0.0, -0.5, 1.0, -1.0, -1.0, 0.0, 0.25, -0.75, -1.0, 0.0]
    race = _race(diffs, n_items=40)
    assert abs(race.mean() - statistics.mean(diffs)) < 1e-12
    fpc = (40 - len(diffs)) / (40 - 1)
    n = len(diffs)
    # the spread counts one extra whole-item difference (item_scale 1): (sum of squares + 1) / n
    spread = (statistics.variance(diffs) * (n - 1) + 1.0) / n
    assert abs(race.stderr() - (spread / n * fpc) ** 0.5) < 1e-12


def test_a_margin_stops_a_level_candidate_only_once_the_items_say_so():
    from search.pruners import Race

    def race(differences, margin, item_scale=1.0):
        r = Race(n_items=300, p_threshold=0.5, n_startup_steps=20, anytime=True, margin=margin,
                 item_scale=item_scale)
        for d in differences:
            r.add(d)
        return r

    # level on the first 20 items: no evidence yet that it cannot win by more than the margin
    assert not race([0.0] * 20, margin=0.005).lost()
    # level on 250 of 300 items: it cannot win by more than 0.005 on the whole set
    assert race([0.0] * 250, margin=0.005).lost()
    assert not race([0.0] * 250, margin=0.0).lost()  # without a margin a level candidate runs to the end
    # the prior scales with how much one item can move the score
    assert not race([0.0] * 250, margin=0.005, item_scale=4.0).lost()
    # ahead by one item on its last items: below the margin, but it is about to become the new best
    assert not race([1.0] + [0.0] * 298, margin=0.01).lost()
    assert race([-1.0] + [0.0] * 298, margin=0.01).lost()
    # every item scored: stopping now saves nothing and would only drop it from the ranking
    assert not race([-1.0] + [0.0] * 299, margin=0.01).lost()


def _stops(population, margin=0.0, anytime=True, p_threshold=0.5, races=400, seed=2):
    """How often a race over these paired differences (shuffled per race) stops, checking every 5 items."""
    import random

    from search.pruners import Race

    rng = random.Random(seed)
    stopped = 0
    for _ in range(races):
        rng.shuffle(population)
        race = Race(len(population), p_threshold=p_threshold, n_startup_steps=20, anytime=anytime, margin=margin)
        for i, d in enumerate(population, 1):
            race.add(d)
            if i % 5 == 0 and race.lost():
                stopped += 1
                break
    return stopped / races


def test_a_candidate_better_by_the_margin_is_stopped_at_most_p_threshold_of_the_time():
    # paired differences with mean +0.01 over 300 items: better than the incumbent by the margin
    better = [-1.0] * 60 + [1.0] * 63 + [0.0] * 177
    assert _stops(better, margin=0.01) <= 0.5
    # a candidate level with the incumbent, disagreeing on 40% of the items: stopped more often with a
    # margin than without, but a margin does not stop candidates clearly better than it
    level = [-1.0] * 60 + [1.0] * 60 + [0.0] * 180
    assert _stops(level, margin=0.01) > _stops(level, margin=0.0)
    clearly_better = [-1.0] * 50 + [1.0] * 80 + [0.0] * 170
    assert _stops(clearly_better, margin=0.01) < 0.05


def _false_stops(anytime: bool, p_threshold: float, n_items: int = 300) -> float:
    """How often a candidate exactly as good as the one it races is stopped, checking every 5 items."""
    population = [-1.0] * 60 + [1.0] * 60 + [0.0] * (n_items - 120)  # paired differences, mean 0
    return _stops(population, anytime=anytime, p_threshold=p_threshold, seed=1)


@pytest.mark.parametrize("p_threshold", [0.1, 0.5])
def test_anytime_boundary_keeps_p_threshold_over_the_whole_race(p_threshold):
    # per look, p_threshold holds at each check only: over a race of 56 checks an equal candidate is
    # stopped far more often; the anytime boundary holds over all checks at once
    assert _false_stops(anytime=False, p_threshold=p_threshold) > min(0.9, 4 * p_threshold)
    assert _false_stops(anytime=True, p_threshold=p_threshold) <= p_threshold

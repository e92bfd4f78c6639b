"""Suite behaviour: item stream order and steps, early stopping, weights, subsets, live weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from objectives import ItemScore, Suite, SuiteResult, TaskSpec
from objectives.tasks import LoadedTask, select_docs


@pytest.fixture(scope="module")
def suite(tokenizer, task_dir) -> Suite:
    """Three weighted tasks (one a group) with search and held-out items."""
    specs = [
        TaskSpec("tiny_mc", weight=2.0, metric="acc_norm", search_items=16, holdout_items=8, seed=1),
        TaskSpec("tiny_gen", weight=1.0, search_items=10, holdout_items=5, subset="first"),
        TaskSpec("tiny_group", weight=0.5, search_items=12, holdout_items=6, seed=2),
    ]
    return Suite.build(specs, tokenizer, [task_dir], max_length=512)


def test_sizes_and_disjoint_splits(suite):
    assert suite.n_items("search") == 16 + 10 + 12
    assert suite.n_items("holdout") == 8 + 5 + 6
    search, holdout = suite.doc_ids("search"), suite.doc_ids("holdout")
    for leaf in search:
        assert not set(search[leaf]) & set(holdout.get(leaf, []))
    # 'first' keeps lm-eval's limit semantics; its held-out items are the task's last ones
    assert search["tiny_gen"] == list(range(10)) and holdout["tiny_gen"] == list(range(55, 60))


def test_stream_is_seeded_interleaved_and_stable(suite, model):
    first = list(suite.run(model, batch_size=4))
    second = list(suite.run(model, batch_size=16))
    assert [s.step for s in first] == list(range(suite.n_items()))
    assert [(s.step, s.task) for s in first] == [(s.step, s.task) for s in second]
    assert [s.value for s in first] == pytest.approx([s.value for s in second], abs=1e-6)
    tasks = [s.task for s in first]
    assert len({t for t in tasks[:10]}) > 1  # interleaved, not task by task
    assert all(isinstance(s, ItemScore) for s in first)


def test_weighted_score_and_metric_choice(suite, model):
    result = suite.evaluate(model)
    assert isinstance(result, SuiteResult) and result.complete
    assert set(result.task_scores) == {"tiny_mc", "tiny_gen", "tiny_group"}
    assert result.task_scores["tiny_mc"] == result.metrics["tiny_mc"]["acc_norm,none"]
    assert result.task_scores["tiny_gen"] == result.metrics["tiny_gen"]["exact_match,strict-match"]
    assert result.task_scores["tiny_group"] == result.metrics["tiny_group"]["acc,none"]
    s = result.task_scores
    assert result.score == pytest.approx((2 * s["tiny_mc"] + s["tiny_gen"] + 0.5 * s["tiny_group"]) / 3.5)


def test_early_stop_aggregates_items_so_far(suite, model):
    run = suite.run(model, batch_size=8)
    taken = list(itertools.islice(run, 7))
    result = run.result()
    assert result.items_scored == 7 and not result.complete
    per_doc = run.item_metrics()
    assert sum(len(v) for v in per_doc.values()) == 7
    if "tiny_mc" in per_doc:
        values = [m["acc_norm,none"] for m in per_doc["tiny_mc"].values()]
        assert result.metrics["tiny_mc"]["acc_norm,none"] == pytest.approx(sum(values) / len(values))
    assert {s.task for s in taken} >= set(result.task_scores)


def test_holdout_split_scores_other_items(suite, model):
    held = suite.evaluate(model, split="holdout")
    assert held.items_scored == suite.n_items("holdout") and held.complete


def test_weights_changed_in_place_are_seen(suite, model):
    """Nothing that depends on weights is cached across runs: the merge engine overwrites them."""
    live = copy.deepcopy(model)
    before = suite.evaluate(live)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = suite.evaluate(live)
    with torch.no_grad():
        for p, q in zip(live.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    again = suite.evaluate(live)
    assert after.metrics != before.metrics
    assert again.metrics == before.metrics


def test_random_subset_is_seeded(tokenizer, task_dir):
    a = Suite.build([TaskSpec("tiny_mc", search_items=10, seed=3)], tokenizer, [task_dir])
    b = Suite.build([TaskSpec("tiny_mc", search_items=10, seed=3)], tokenizer, [task_dir])
    c = Suite.build([TaskSpec("tiny_mc", search_items=10, seed=4)], tokenizer, [task_dir])
    assert a.doc_ids() == b.doc_ids() != c.doc_ids()


def test_holdout_does_not_move_when_search_grows(tokenizer, task_dir):
    from lm_eval.tasks import TaskManager

    from objectives.tasks import load_task

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    small = load_task(TaskSpec("tiny_mc", search_items=5, holdout_items=6, seed=9), manager)
    large = LoadedTask(TaskSpec("tiny_mc", search_items=20, holdout_items=6, seed=9), small.tasks, None)
    assert select_docs(small)["holdout"] == select_docs(large)["holdout"]
    assert set(select_docs(small)["search"]["tiny_mc"]) < set(select_docs(large)["search"]["tiny_mc"])


def test_a_run_scores_once(suite, model):
    run = suite.run(model)
    next(iter(run))
    with pytest.raises(RuntimeError):
        iter(run)


@pytest.mark.parametrize("subset", ["random", "first"])
def test_validation_split_is_disjoint_and_stable(tokenizer, task_dir, subset):
    from lm_eval.tasks import TaskManager

    from objectives.tasks import load_task

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    spec = TaskSpec("tiny_mc", search_items=10, holdout_items=6, validation_items=7, subset=subset, seed=9)
    loaded = load_task(spec, manager)
    chosen = select_docs(loaded)

    def ids(split):
        picked = chosen[split]["tiny_mc"]
        return set(range(picked)) if isinstance(picked, int) else set(picked)

    search, val, hold = ids("search"), ids("validation"), ids("holdout")
    assert (len(search), len(val), len(hold)) == (10, 7, 6)
    assert not (search & val or search & hold or val & hold)
    bigger = LoadedTask(TaskSpec("tiny_mc", search_items=20, holdout_items=6, validation_items=7, subset=subset,
                                 seed=9), loaded.tasks, None)
    assert select_docs(bigger)["validation"] == chosen["validation"]
    assert select_docs(bigger)["holdout"] == chosen["holdout"]


def test_item_values_pair_across_passes(suite, model):
    a = suite.evaluate(model, split="holdout")
    b = suite.evaluate(model, split="holdout")
    assert a.items == b.items and len(a.items.values) == suite.n_items("holdout")
    assert sum(c * v for c, v in zip(a.items.coefs, a.items.values, strict=True)) == pytest.approx(a.score)
    assert a.items.tasks.count("tiny_gen") == 5

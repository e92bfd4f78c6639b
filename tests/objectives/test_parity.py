"""Our metrics equal lm_eval.simple_evaluate with its HF backend on the same model and items."""

from __future__ import annotations

import math

import pytest

from objectives import Suite, TaskSpec

TASKS = ["tiny_mc", "tiny_mc2", "tiny_wino", "tiny_gen", "tiny_group"]
MAX_LENGTH = 512  # the fixture model's max_position_embeddings: HFLM's default max_length
# mc2 is a continuous function of the log-likelihoods. Ours come from a differently shaped
# computation (a context run once for all its choices), so float32 rounding differs in the last
# bits: a few 1e-6 per item, far less on the task mean. Discrete metrics must be exactly equal.
CONTINUOUS = {"tiny_mc2"}


def simple_evaluate(model_dir, task_dir, tasks, max_length=MAX_LENGTH, **kwargs) -> dict:
    """lm-eval's reference run: model="hf" loaded from the folder, float32 on CPU."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,max_length={max_length}",
        tasks=tasks,
        device="cpu",
        batch_size=8,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        **kwargs,
    )


def lm_eval_metrics(results: dict, task: str) -> dict[str, float]:
    """lm-eval's metric values of a task (its stderr entries left out)."""
    return {k: float(v) for k, v in results["results"][task].items() if "," in k and "_stderr" not in k}


def assert_same(ours: dict[str, float], ref: dict[str, float], task: str) -> None:
    assert set(ours) == set(ref), task
    for key, value in ref.items():
        if task in CONTINUOUS:
            assert ours[key] == pytest.approx(value, abs=1e-6), (task, key)
        else:
            assert ours[key] == value, (task, key)


@pytest.fixture(scope="module")
def reference(model_dir, task_dir):
    """All fixture tasks, every item, with per-sample logs."""
    return simple_evaluate(model_dir, task_dir, TASKS, log_samples=True)


@pytest.fixture(scope="module")
def ours(model, tokenizer, task_dir):
    """Our suite over the same tasks and items ('first' subset, no limit = every item)."""
    suite = Suite.build([TaskSpec(t, subset="first") for t in TASKS], tokenizer, [task_dir], MAX_LENGTH)
    run = suite.run(model, batch_size=8)
    scores = list(run)
    return suite, run, scores


@pytest.mark.parametrize("task", [*TASKS, "tiny_grp_a", "tiny_grp_b"])
def test_task_metrics_identical(reference, ours, task):
    _, run, _ = ours
    assert_same(run.result().metrics[task], lm_eval_metrics(reference, task), task)


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_mc2", "tiny_wino", "tiny_gen", "tiny_grp_a"])
def test_per_item_metrics_identical(reference, ours, task):
    _, run, _ = ours
    mine = run.item_metrics()[task]
    samples = reference["samples"][task]
    assert len(mine) == len({s["doc_id"] for s in samples})
    for sample in samples:
        for metric in sample["metrics"]:
            key = f"{metric},{sample['filter']}"
            value = mine[sample["doc_id"]][key]
            if task in CONTINUOUS:
                assert value == pytest.approx(float(sample[metric]), abs=1e-5)
            else:
                assert value == sample[metric], (task, sample["doc_id"], key)


def test_item_stream_aggregates_to_task_metric(ours):
    suite, run, scores = ours
    result = run.result()
    assert result.complete and result.items_scored == len(scores) == suite.n_items()
    for spec in suite.specs:
        values = [s.value for s in scores if s.task == spec.name]
        share = spec.weight / sum(s.weight for s in suite.specs)
        # each value is scaled by n_items * share / n_task_items, so their mean is the suite-level share
        mean = sum(values) / len(values) * len(values) / len(scores) / share
        assert mean == pytest.approx(result.task_scores[spec.name], abs=1e-9)
    assert sum(s.value for s in scores) / len(scores) == pytest.approx(result.score, abs=1e-9)


def test_left_truncation_matches(model, tokenizer, model_dir, task_dir):
    """Contexts longer than max_length are cut from the left exactly as HFLM cuts them."""
    tasks = ["tiny_mc", "tiny_wino", "tiny_gen"]
    ref = simple_evaluate(model_dir, task_dir, tasks, max_length=64, limit=12, log_samples=False)
    specs = [TaskSpec(t, subset="first", search_items=12) for t in tasks]
    result = Suite.build(specs, tokenizer, [task_dir], max_length=64).evaluate(model, batch_size=5)
    for task in tasks:
        assert_same(result.metrics[task], lm_eval_metrics(ref, task), task)


def test_random_subset_and_holdout_match_lm_eval_samples(model, tokenizer, model_dir, task_dir):
    """A seeded random subset equals lm-eval run with `samples=` those doc indices; holdout likewise."""
    spec = TaskSpec("tiny_mc", subset="random", search_items=10, holdout_items=8, seed=7, num_fewshot=2)
    suite = Suite.build([spec], tokenizer, [task_dir], MAX_LENGTH)
    search, holdout = suite.doc_ids("search")["tiny_mc"], suite.doc_ids("holdout")["tiny_mc"]
    assert len(search) == 10 and len(holdout) == 8 and not set(search) & set(holdout)
    for split, ids in (("search", search), ("holdout", holdout)):
        ref = simple_evaluate(
            model_dir, task_dir, ["tiny_mc"], num_fewshot=2, samples={"tiny_mc": ids}, log_samples=False
        )
        assert_same(
            suite.evaluate(model, split=split).metrics["tiny_mc"], lm_eval_metrics(ref, "tiny_mc"), "tiny_mc"
        )


def test_scores_are_real_numbers(ours):
    _, run, _ = ours
    result = run.result()
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in result.task_scores.values())
    # the fixture model is trained: the tasks are neither all right nor all wrong
    assert 0.0 < result.task_scores["tiny_mc"] < 1.0
    assert result.metrics["tiny_gen"]["exact_match,strict-match"] > 0.0

"""The Open LLM Leaderboard v1 tasks resolve in lm-eval's registry; missing offline data is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from objectives import Suite, TaskInputError, TaskSpec
from objectives.tasks import load_task, task_manager

LEADERBOARD = {
    "arc_challenge": "allenai/ai2_arc",
    "hellaswag": "Rowan/hellaswag",
    "mmlu": "cais/mmlu",
    "truthfulqa_mc2": "truthfulqa/truthful_qa",
    "winogrande": "allenai/winogrande",
    "gsm8k": "openai/gsm8k",
}


@pytest.fixture(scope="module")
def registry():
    """lm-eval's full task index (about 10 s to scan)."""
    return task_manager(list(LEADERBOARD), [])


@pytest.mark.parametrize("name", list(LEADERBOARD))
def test_leaderboard_task_config_found(registry, name):
    entry = registry.task_index[name]
    assert entry.yaml_path and Path(entry.yaml_path).is_file()


@pytest.mark.parametrize(("name", "dataset"), list(LEADERBOARD.items()))
def test_uncached_dataset_offline_is_one_line(registry, name, dataset):
    try:
        loaded = load_task(TaskSpec(name), registry)
    except TaskInputError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message == (
            f"task '{name}': dataset {dataset} is not in the local cache and HF_DATASETS_OFFLINE=1; "
            "download it once with network access, or use a task folder with local data"
        )
    else:  # this machine has the data cached: then the task must have loaded
        assert loaded.tasks


def test_suite_build_unknown_task_suggests_a_name(tokenizer):
    with pytest.raises(TaskInputError) as info:
        Suite.build([TaskSpec("arc_challange")], tokenizer)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown task 'arc_challange'") and "did you mean 'arc_challenge'" in message

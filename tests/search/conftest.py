"""Fixtures for study tests: tiny parents, two offline multiple-choice tasks, study files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import WORDS, build_tiny_model

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, name: str, seed: int, n: int = 60) -> None:
    """A multiple-choice task over the tiny vocabulary, with its JSONL data."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        choices = rng.sample(WORDS, 4)
        rows.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))


@pytest.fixture(scope="session")
def study_parts(tmp_path_factory) -> dict[str, Path]:
    """Parents a and b (tiny phi) and a task folder with toy_a and toy_b."""
    root = tmp_path_factory.mktemp("study_parts")
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, "toy_a", 1)
    write_task(tasks, "toy_b", 2)
    return {"a": build_tiny_model(root / "parent_a", "phi", seed=11),
            "b": build_tiny_model(root / "parent_b", "phi", seed=12), "tasks": tasks}


def study_dict(parts: dict[str, Path], tmp: Path, **overrides) -> dict:
    """A valid study over the tiny parents; keyword overrides replace whole sections' keys."""
    study = {
        "study": {"name": "toy", "storage": f"sqlite:///{tmp / 'toy.db'}", "sampler": "tpe", "seed": 0,
                  "n_trials": 10},
        "merge": {"models": [str(parts["a"]), str(parts["b"])], "base_model": str(parts["a"]),
                  "layer_range": [0, 4], "dtype": "float32"},
        "search_space": {"self_attn": {"anchors": 5}, "mlp": {"anchors": 5}, "default": {"anchors": 1}},
        "baseline": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                     {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}],
        "objectives": {"include_path": [str(parts["tasks"])], "batch_size": 8,
                       "tasks": [{"name": "toy_a", "metric": "acc", "search_items": 30, "holdout_items": 20},
                                 {"name": "toy_b", "metric": "acc_norm", "weight": 2, "search_items": 30,
                                  "holdout_items": 20}]},
        "pruner": {"type": "none"},
        "export": {"top_k": 3, "dir": str(tmp / "export")},
    }
    for section, values in overrides.items():
        study[section] = (study.get(section) or {}) | values if isinstance(values, dict) else values
    return study


def write_study(path: Path, study: dict) -> Path:
    """Write a study dict as YAML."""
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path

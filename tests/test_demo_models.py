"""The demo models build deterministically and load offline; the demo tasks load through lm-eval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from demos.models import VOCAB, VOCAB3, DemoRecipe, ThreeRecipe, build_demo_models, task_items, write_task_data

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "studies" / "demo" / "tasks"
DATA_DIR = REPO / "studies" / "demo" / "data"
SMALL = DemoRecipe(hidden=32, layers=4, batch=16, base_steps=6, parent_steps=4)
SEARCH_ROWS, HELD_OUT_ROWS = range(0, 200), range(200, 400)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    calls: list[tuple[str, int, int]] = []
    paths = build_demo_models(tmp_path_factory.mktemp("demo"), progress=lambda *a: calls.append(a), recipe=SMALL)
    total = SMALL.base_steps + 2 * SMALL.parent_steps
    assert len(calls) == total and calls[-1][1:] == (total, total)
    return paths


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic(small_build: dict[str, Path], tmp_path: Path) -> None:
    again = build_demo_models(tmp_path, recipe=SMALL)
    for name, path in small_build.items():
        first, second = _tensors(path), _tensors(again[name])
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}:{key}"


def test_finished_build_is_reused(small_build: dict[str, Path]) -> None:
    out_dir = small_build["base"].parent
    stamp = (small_build["parent_b"] / "model.safetensors").stat().st_mtime_ns
    calls: list[tuple] = []
    assert build_demo_models(out_dir, progress=lambda *a: calls.append(a), recipe=SMALL) == small_build
    assert calls == []
    assert (small_build["parent_b"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_recipe_rebuilds(small_build: dict[str, Path], tmp_path: Path) -> None:
    build_demo_models(tmp_path, recipe=SMALL)
    calls: list[tuple] = []
    changed = replace(SMALL, parent_steps=SMALL.parent_steps + 1)
    build_demo_models(tmp_path, progress=lambda *a: calls.append(a), recipe=changed)
    assert calls


def test_parents_change_only_their_own_modules(small_build: dict[str, Path]) -> None:
    base = _tensors(small_build["base"])
    half = SMALL.layers // 2
    own = {
        "parent_a": lambda layer, kind: (kind == "mlp") == (layer < half),
        "parent_b": lambda layer, kind: (kind == "self_attn") == (layer < half),
    }
    for parent, owns in own.items():
        tensors = _tensors(small_build[parent])
        for key, value in tensors.items():
            parts = key.split(".")
            trained = parts[1] == "layers" and parts[3] in ("mlp", "self_attn") and owns(int(parts[2]), parts[3])
            assert torch.equal(value, base[key]) != trained, f"{parent}:{key}"


def test_folders_load_offline(small_build: dict[str, Path]) -> None:
    for path in small_build.values():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert type(model).__name__ == "PhiForCausalLM"
        item = task_items("demo_letters")[0]
        text = f"{item['query']} {item['choices'][0]}"
        assert tokenizer(text)["input_ids"] == [VOCAB.index(w) for w in text.split()]
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits
        assert logits.shape == (1, len(text.split()), len(VOCAB))


def test_committed_task_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    for task, path in write_task_data(tmp_path).items():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), task


def test_tasks_load_through_lm_eval(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from objectives import TaskSpec
    from objectives.tasks import load_task, task_manager

    # the YAML data_files are relative to the YAML's folder, so any working directory will do
    monkeypatch.chdir(tmp_path)
    names = ["demo_letters", "demo_digits", "demo_capitals"]
    manager = task_manager(names, [TASK_DIR])
    tasks = {}
    for name in names:
        tasks.update(load_task(TaskSpec(name=name), manager).tasks)
    assert set(tasks) == set(names)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == len(SEARCH_ROWS) + len(HELD_OUT_ROWS) == 400
        assert task.OUTPUT_TYPE == "multiple_choice"
        queries = [task.doc_to_text(doc) for doc in docs]
        assert not {queries[i] for i in SEARCH_ROWS} & {queries[i] for i in HELD_OUT_ROWS}, name
        for doc in docs:
            choices = task.doc_to_choice(doc)
            assert len(set(choices)) == 4 and 0 <= task.doc_to_target(doc) < 4


def test_two_processes_building_at_once_share_one_build(tmp_path: Path) -> None:
    """Two commands building the demo parents at once: one builds, the other waits and reuses it."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from tests.test_demo_models import SMALL; "
            "from demos.models import build_demo_models; n = []; "
            "build_demo_models(Path(sys.argv[1]), progress=lambda *a: n.append(a), recipe=SMALL); print(len(n))")
    out = tmp_path / "demo-models"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    steps = sorted(int(stdout.split()[-1]) for stdout, _ in results)
    assert steps == [0, SMALL.base_steps + 2 * SMALL.parent_steps]  # exactly one of them trained
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-models.lock", "demo-models"]  # no staging left
    assert (out / "BUILD").read_text().strip() == SMALL.digest()


def test_the_first_demo_recipe_is_unchanged() -> None:
    # the README's measured demo table is for these weights: a new field or default rebuilds them
    assert DemoRecipe().digest() == "70d137da2485db0c"


def test_second_demo_children_train_every_module_and_share_one_base(tmp_path: Path) -> None:
    small = ThreeRecipe(hidden=32, layers=4, batch=16, base_steps=6, parent_steps=4)
    calls: list[tuple] = []
    paths = build_demo_models(tmp_path, progress=lambda *a: calls.append(a), recipe=small)
    assert sorted(paths) == ["base", "double", "mirror", "shift"]
    assert calls[-1][1:] == (6 + 3 * 4,) * 2
    base = _tensors(paths["base"])
    assert base["model.embed_tokens.weight"].shape[0] == len(VOCAB3)
    for child in ("shift", "double", "mirror"):
        tensors = _tensors(paths[child])
        changed = {k.split(".")[3] for k, v in tensors.items() if k.startswith("model.layers.")
                   and not torch.equal(v, base[k])}
        assert {"mlp", "self_attn"} <= changed, child  # fine-tuned on all modules, not a chosen few
    tokenizer = AutoTokenizer.from_pretrained(paths["mirror"], local_files_only=True)
    item = task_items("demo_capitals")[0]
    text = f"{item['query']} {item['choices'][0]}"
    assert tokenizer(text)["input_ids"] == [VOCAB3.index(w) for w in text.split()]

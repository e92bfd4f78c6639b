"""User errors in Suite.build end in one clear TaskInputError line."""

from __future__ import annotations

import shutil

import pytest

from objectives import Suite, TaskInputError, TaskSpec


def build_error(*args, **kwargs) -> str:
    with pytest.raises(TaskInputError) as info:
        Suite.build(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_folder_without_task_yaml(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no lm-eval task YAML" in build_error([TaskSpec("tiny_mc")], tokenizer, [empty])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.yaml").write_text("just: data\n")
    assert str(other) in build_error([TaskSpec("tiny_mc")], tokenizer, [other])


def test_include_path_not_a_folder(tmp_path, tokenizer):
    assert "is not a folder" in build_error([TaskSpec("tiny_mc")], tokenizer, [tmp_path / "missing"])


def test_missing_tokenizer(task_dir):
    assert "tokenizer" in build_error([TaskSpec("tiny_mc")], None, [task_dir])


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (TaskSpec("tiny_mc", search_items=0), "positive"),
        (TaskSpec("tiny_mc", holdout_items=-1), "holdout_items"),
        (TaskSpec("tiny_mc", weight=0), "weight"),
        (TaskSpec("tiny_mc", subset="last"), "subset"),
        (TaskSpec("tiny_mc", metric="f1"), "reports acc, acc_norm"),
        (TaskSpec("tiny_gen", metric="exact_match,loose"), "strict-match, flexible-extract"),
        (TaskSpec("tiny_mc", holdout_items=100), "leaves none"),
        (TaskSpec("tiny_mc", holdout_items=100, subset="first"), "leaves none"),
    ],
)
def test_bad_spec_fields(tokenizer, task_dir, spec, needle):
    assert needle in build_error([spec], tokenizer, [task_dir])


def test_task_listed_twice_or_inside_a_listed_group(tokenizer, task_dir):
    assert "twice" in build_error([TaskSpec("tiny_mc"), TaskSpec("tiny_mc")], tokenizer, [task_dir])
    assert "part of both" in build_error(
        [TaskSpec("tiny_group"), TaskSpec("tiny_grp_a")], tokenizer, [task_dir]
    )


def test_sampling_generation_task_is_refused(tmp_path, tokenizer, task_dir):
    folder = tmp_path / "sampling"
    folder.mkdir()
    text = (task_dir / "tiny_gen.yaml").read_text()
    text = text.replace("task: tiny_gen", "task: tiny_gen_sampled").replace(
        "do_sample: false", "do_sample: true"
    )
    (folder / "tiny_gen_sampled.yaml").write_text(text)
    shutil.copy(task_dir / "utils.py", folder / "utils.py")
    assert "only greedy" in build_error([TaskSpec("tiny_gen_sampled")], tokenizer, [folder])


def test_local_data_file_missing(tmp_path, tokenizer, task_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    text = (task_dir / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: tiny_broken")
    (folder / "tiny_broken.yaml").write_text(text.replace("mc_eval.json", "does_not_exist.json"))
    message = build_error([TaskSpec("tiny_broken")], tokenizer, [folder])
    assert "tiny_broken" in message and "does_not_exist.json" in message

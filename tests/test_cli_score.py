"""`search score`: JSON results as lm-eval names them; bad input exits 2 with one line on stderr."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli
from tests.objectives.conftest import model_dir, synthetic_data, task_dir  # noqa: F401  (fixtures)


def assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("search score: error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_json_results_match_lm_eval(model_dir, task_dir):  # noqa: F811
    from tests.objectives.test_parity import lm_eval_metrics, simple_evaluate

    proc = run_cli(
        "score",
        "--model",
        str(model_dir),
        "--tasks",
        "tiny_mc,tiny_gen",
        "--include-path",
        str(task_dir),
        "--limit",
        "6",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"results"} and set(out["results"]) == {"tiny_mc", "tiny_gen"}
    ref = simple_evaluate(model_dir, task_dir, ["tiny_mc", "tiny_gen"], limit=6, log_samples=False)
    for task in ("tiny_mc", "tiny_gen"):
        assert out["results"][task] == lm_eval_metrics(ref, task)


def test_table_without_json(model_dir, task_dir, capsys):  # noqa: F811
    from search.cli import main

    code = main(
        [
            "score",
            "--model",
            str(model_dir),
            "--tasks",
            "tiny_group",
            "--include-path",
            str(task_dir),
            "--limit",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for text in ("tiny_group", "tiny_grp_a", "acc,none", "weighted score"):
        assert text in out


def test_unknown_task(model_dir):  # noqa: F811
    proc = run_cli("score", "--model", str(model_dir), "--tasks", "hellaswagg")
    assert_one_line_error(proc, "unknown task 'hellaswagg'")
    assert "did you mean 'hellaswag'" in proc.stderr


def test_folder_without_task_yaml(model_dir, tmp_path):  # noqa: F811
    proc = run_cli("score", "--model", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(tmp_path))
    assert_one_line_error(proc, f"include path {tmp_path} holds no lm-eval task YAML")


def test_model_folder_without_tokenizer(model_dir, task_dir, tmp_path):  # noqa: F811
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    proc = run_cli("score", "--model", str(bare), "--tasks", "tiny_mc", "--include-path", str(task_dir))
    assert_one_line_error(proc, f"model folder {bare} has no tokenizer")


def test_limit_zero(model_dir, task_dir):  # noqa: F811
    proc = run_cli(
        "score",
        "--model",
        str(model_dir),
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(task_dir),
        "--limit",
        "0",
    )
    assert_one_line_error(proc, "--limit must be at least 1, got 0")


@pytest.mark.parametrize("allow", [False, True])
def test_pickled_weights_need_opt_in(model_dir, task_dir, tmp_path, allow):  # noqa: F811
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = [
        "score",
        "--model",
        str(pickled),
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(task_dir),
        "--limit",
        "2",
        "--json",
    ]
    proc = run_cli(*args, *(["--allow-pickle"] if allow else []))
    if allow:
        assert proc.returncode == 0, proc.stderr
        assert "acc,none" in json.loads(proc.stdout)["results"]["tiny_mc"]
    else:
        assert_one_line_error(proc, "pass --allow-pickle")


def test_missing_model():
    proc = run_cli("score", "--model", "no-such-org/no-such-model", "--tasks", "tiny_mc")
    assert_one_line_error(proc, "neither a folder nor a Hub model in the local cache")


def test_hub_id_from_the_offline_cache(model_dir, task_dir, tmp_path):  # noqa: F811
    """A Hub id resolves to its snapshot in the local cache, with no network."""
    repo = tmp_path / "hub" / "models--local--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    proc = run_cli(
        "score",
        "--model",
        "local/tiny",
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(task_dir),
        "--limit",
        "2",
        "--json",
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["results"]["tiny_mc"]) == {"acc,none", "acc_norm,none"}

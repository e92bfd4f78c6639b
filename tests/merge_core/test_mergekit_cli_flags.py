"""mergekit-yaml's flags that change what is written: --trust-remote-code (and the repository code
files a remote-code model's output needs), --unsafe-truncate-embeddings, and -v; each against
mergekit-yaml with the same flag where mergekit has it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from tests.conftest import build_tiny_model, run_cli
from tests.merge_core.test_merge_bad_input import assert_refused
from tests.merge_core.test_merge_output_files import mergekit_yaml
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

CONFIG_CODE = """from transformers import LlamaConfig

from .helpers_custom import DEFAULT_NOTE


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom_llama"

    def __init__(self, note=DEFAULT_NOTE, **kwargs):
        self.note = note
        super().__init__(**kwargs)
"""
HELPERS_CODE = 'DEFAULT_NOTE = "remote"\n'
MODELING_CODE = """from transformers import LlamaForCausalLM

from .configuration_custom import CustomLlamaConfig


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
"""
TOKENIZER_CODE = """from transformers import PreTrainedTokenizerFast


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""
CODE_FILES = {"configuration_custom.py": CONFIG_CODE, "helpers_custom.py": HELPERS_CODE,
              "modeling_custom.py": MODELING_CODE, "tokenization_custom.py": TOKENIZER_CODE}


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def remote_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny llama models that declare repository code for their config, model and tokenizer
    (what a `trust_remote_code` checkpoint on the Hub looks like)."""
    root = tmp_path_factory.mktemp("remote_code")
    pair = []
    for seed in (1, 2):
        folder = build_tiny_model(root / f"m{seed}", "llama", seed=seed)
        for name, text in CODE_FILES.items():
            (folder / name).write_text(text)
        _edit_json(folder / "config.json", lambda c: c.update(
            model_type="custom_llama", architectures=["CustomLlamaForCausalLM"],
            auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig",
                      "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"}))
        _edit_json(folder / "tokenizer_config.json", lambda c: c.update(
            tokenizer_class="CustomTokenizer",
            auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}))
        pair.append(folder)
    return pair[0], pair[1]


def _linear(tmp_path: Path, models, extra: str = "") -> Path:
    config = tmp_path / "config.yml"
    config.write_text("merge_method: linear\n" + extra + "models:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models))
    return config


def test_a_remote_code_model_merges_without_running_code_and_its_output_carries_the_code(tmp_path, remote_pair):
    """No flag needed: the merge reads tensors and config.json only. The output gets every code file
    that auto_map names (and the file they import), so it loads with trust_remote_code as its parents
    do; mergekit-yaml needs --trust-remote-code and writes only the configuration's files."""
    config = _linear(tmp_path, remote_pair)
    mk, us = tmp_path / "mk", tmp_path / "us"
    assert mergekit_yaml(config, mk, "--trust-remote-code").returncode == 0
    done = run_cli("merge", str(config), str(us))
    assert done.returncode == 0, done.stderr
    assert_within_one_ulp(load_folder(us), load_folder(mk))
    assert {p.name for p in mk.iterdir()} <= {p.name for p in us.iterdir()}
    for name, text in CODE_FILES.items():
        assert (us / name).read_text() == text, name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((us / name).read_text()) == json.loads((mk / name).read_text()), name
    # without the flag the config class is not run: the parents' values, less what its code adds
    ours, theirs = json.loads((us / "config.json").read_text()), json.loads((mk / "config.json").read_text())
    assert ours == {key: value for key, value in theirs.items() if key != "note"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(us, trust_remote_code=True)
    assert type(loaded).__name__ == "CustomLlamaForCausalLM" and loaded.config.note == "remote"
    assert type(transformers.AutoTokenizer.from_pretrained(us, trust_remote_code=True)).__name__ == "CustomTokenizer"


def test_a_remote_code_tokenizer_loads_only_with_trust_remote_code(tmp_path, remote_pair):
    """tokenizer_source makes the tokenizers load, which runs their code: refused in one line that
    names the flag; with --trust-remote-code the tokenizer and its files are mergekit-yaml's."""
    config = _linear(tmp_path, remote_pair, "tokenizer_source: union\n")
    refused = tmp_path / "refused"
    assert_refused(run_cli("merge", str(config), str(refused)), "--trust-remote-code", "tokenizer", out=refused)
    mk, us = tmp_path / "mk", tmp_path / "us"
    assert mergekit_yaml(config, mk, "--trust-remote-code").returncode == 0
    done = run_cli("merge", str(config), str(us), "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    assert_within_one_ulp(load_folder(us), load_folder(mk))
    assert (us / "tokenizer.json").read_bytes() == (mk / "tokenizer.json").read_bytes()
    assert (us / "config.json").read_bytes() == (mk / "config.json").read_bytes()  # saved through its class
    assert json.loads((us / "tokenizer_config.json").read_text()) == json.loads(
        (mk / "tokenizer_config.json").read_text())
    assert (us / "tokenization_custom.py").read_text() == TOKENIZER_CODE


@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two llama models whose embeddings differ in rows (17 and 20: a fine-tune that grew its vocabulary)."""
    root = tmp_path_factory.mktemp("vocab_rows")
    return (build_tiny_model(root / "small", "llama", seed=1),
            build_tiny_model(root / "large", "llama", seed=2, vocab_rows=20))


@pytest.mark.parametrize("order", ["small_first", "large_first"])
def test_unsafe_truncate_embeddings_cuts_to_the_fewest_rows_like_mergekit(tmp_path, vocab_pair, order):
    """Every token-indexed tensor (embeddings, head) is cut to the smaller model's rows, as
    mergekit-yaml --unsafe-truncate-embeddings cuts them; config.json's vocab_size follows the rows
    (mergekit leaves the reference's, so its output does not load when that is the larger model)."""
    small, large = vocab_pair
    models = [small, large] if order == "small_first" else [large, small]
    config = _linear(tmp_path, models, f"base_model: {models[0]}\n")
    refused = tmp_path / "refused"
    assert_refused(run_cli("merge", str(config), str(refused)), "vocab_size differs", out=refused)
    mk, us = tmp_path / "mk", tmp_path / "us"
    assert mergekit_yaml(config, mk, "--unsafe-truncate-embeddings").returncode == 0
    done = run_cli("merge", str(config), str(us), "--unsafe-truncate-embeddings")
    assert done.returncode == 0, done.stderr
    assert "--unsafe-truncate-embeddings" in done.stderr and "first 17" in done.stderr
    ours, theirs = load_folder(us), load_folder(mk)
    assert ours["model.embed_tokens.weight"].shape[0] == 17 and ours["lm_head.weight"].shape[0] == 17
    assert_within_one_ulp(ours, theirs)
    assert json.loads((us / "config.json").read_text())["vocab_size"] == 17
    model = transformers.AutoModelForCausalLM.from_pretrained(us)
    assert model.get_input_embeddings().weight.shape[0] == 17


def test_verbose_says_what_is_merged(tmp_path, vocab_pair):
    small, _ = vocab_pair
    config = _linear(tmp_path, [small])
    done = run_cli("merge", str(config), str(tmp_path / "out"), "-vv")
    assert done.returncode == 0, done.stderr
    assert f"linear of 1 models: {small}" in done.stderr
    assert "tensors to write (4 layers, float32" in done.stderr
    assert f"tokenizer: files copied from {small}" in done.stderr


def test_a_study_over_remote_code_parents_runs_their_code_only_when_told(tmp_path, remote_pair):
    """A study builds and scores a live model, which for a remote-code architecture is the repository's
    own class: refused in one line without `merge: {trust_remote_code: true}`, run with it."""
    from tests.search.conftest import study_dict, write_study, write_task

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "toy_a", 1)
    write_task(tasks, "toy_b", 2)
    parts = {"a": remote_pair[0], "b": remote_pair[1], "tasks": tasks}
    study = study_dict(parts, tmp_path, study={"n_trials": 2})
    refused = write_study(tmp_path / "refused.yaml", study)
    result = run_cli("start", str(refused), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "trust_remote_code: true" in lines[-1], result.stderr[-2000:]
    study["merge"]["trust_remote_code"] = True
    trusted = write_study(tmp_path / "trusted.yaml", study | {"study": study["study"] | {"name": "trusted"}})
    done = run_cli("start", str(trusted), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "study trusted: 2 complete, 0 pruned, 0 failed" in done.stdout, done.stdout[-2000:]


def test_allow_crimes_merges_models_of_different_types_whose_tensors_line_up(tmp_path):
    """A llama and a mistral model of one shape: refused without --allow-crimes (mergekit-yaml refuses
    too), merged with it as mergekit-yaml merges them. mergekit takes config.json from a model picked
    by set order, so only the tensors are compared."""
    llama = build_tiny_model(tmp_path / "llama", "llama", seed=1)
    mistral = build_tiny_model(tmp_path / "mistral", "mistral", seed=2)
    config = tmp_path / "crimes.yml"
    config.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                      f"  - {{model: {llama}, parameters: {{weight: 0.3}}}}\n"
                      f"  - {{model: {mistral}, parameters: {{weight: 0.7}}}}\n")
    assert mergekit_yaml(config, tmp_path / "mk_refused").returncode != 0
    assert_refused(run_cli("merge", str(config), str(tmp_path / "refused")), "model_type differs", "--allow-crimes",
                   out=tmp_path / "refused")
    assert mergekit_yaml(config, tmp_path / "mk", "--allow-crimes").returncode == 0
    result = run_cli("merge", str(config), str(tmp_path / "ours"), "--allow-crimes")
    assert result.returncode == 0, result.stderr
    assert_within_one_ulp(load_folder(tmp_path / "ours"), load_folder(tmp_path / "mk"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "llama"  # the first listed
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")

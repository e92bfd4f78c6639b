"""mergekit's own tokenizer test cases (its tests/test_tokenizer.py: a base, a model with two chat tokens
and rows for them, a model whose tokenizer has four unused tokens past its rows; BPE tokenizers with
added tokens) through `search merge` and `mergekit-yaml`: the same tokenizer files and tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_tiny_model, run_cli
from tests.merge_core.test_merge_bad_input import assert_refused
from tests.merge_core.test_merge_output_files import mergekit_yaml
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

CHAT = ["<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(folder: Path, vocab_size: int, added: list[str]) -> None:
    """A BPE tokenizer of `vocab_size` plain tokens (the first three special), plus `added` tokens."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size), strict=True)),
                                        "merges": []}, "added_tokens": []}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(added)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def mk_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit_tokenizer_cases")
    out = {}
    for i, (name, rows, added) in enumerate([("base", 64, []), ("chatml", 66, CHAT),
                                             ("padded", 64, [f"<UNUSED_{k}>" for k in range(4)])]):
        out[name] = build_tiny_model(root / name, "llama", seed=i + 1, vocab_rows=rows)
        bpe_tokenizer(out[name], 64, added)
    return out


def config(f, names: list[str], method: str = "linear", **extra) -> dict:
    cfg = {"merge_method": method, "base_model": str(f["base"]), "dtype": "float32",
           "models": [{"model": str(f[n]), "parameters": {"weight": 1.0}} for n in names]}
    return cfg | extra


CASES = {
    "source_base": lambda f: config(f, ["base", "padded", "chatml"], tokenizer_source="base"),
    "source_union": lambda f: config(f, ["base", "padded", "chatml"], tokenizer_source="union"),
    "source_model": lambda f: config(f, ["base", "padded", "chatml"], tokenizer_source=str(f["chatml"])),
    # as in mergekit's case, each model keeps `weight: 1.0`, which slerp ignores (both tools)
    "slerp_union": lambda f: config(f, ["base", "chatml"], "slerp", tokenizer_source="union", parameters={"t": 0.5}),
    "force_token": lambda f: config(f, ["base", "chatml"], tokenizer={"source": "union", "tokens": {
        "_tok_10": {"source": str(f["chatml"]), "force": True}, "_tok_11": {"source": str(f["base"]), "force": True}}}),
    "model_token_id": lambda f: config(f, ["base", "chatml"], tokenizer={"source": "base", "tokens": {
        "_tok_20": {"source": {"kind": "model_token", "model": str(f["chatml"]), "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": str(f["base"]), "token": "<s>"}, "force": True}}}),
    "pad_to_multiple_of": lambda f: dict(config(f, ["chatml"], tokenizer={"source": "base", "pad_to_multiple_of": 16}),
                                         base_model=str(f["chatml"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_tokenizer_case(mk_models, tmp_path, case):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(CASES[case](mk_models)))
    mk, us = tmp_path / "mk", tmp_path / "us"
    done = mergekit_yaml(path, mk)
    assert done.returncode == 0, done.stderr[-3000:]
    result = run_cli("merge", str(path), str(us))
    assert result.returncode == 0, result.stderr
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (us / f).read_text() == (mk / f).read_text(), f
    assert_within_one_ulp(load_folder(us), load_folder(mk))


def test_legacy_mode_is_refused_like_mergekit(mk_models, tmp_path):
    """No tokenizer source over models with other row counts: mergekit 0.1.5 fails on the size mismatch;
    we say how to line the vocabularies up."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config(mk_models, ["base", "padded", "chatml"])))
    assert mergekit_yaml(path, tmp_path / "mk").returncode != 0
    out = tmp_path / "us"
    assert_refused(run_cli("merge", str(path), str(out)), "vocab_size differs", "tokenizer_source: union", out=out)

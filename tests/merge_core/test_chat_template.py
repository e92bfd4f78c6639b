"""`chat_template:`: the merged tokenizer carries the template mergekit-yaml sets (`auto`, a shipped
name, Jinja text), and merge-search's shipped templates render mergekit's prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from merge_core.chat_templates import SHIPPED
from tests.conftest import run_cli
from tests.merge_core.test_merge_output_files import _pair_with_config, both
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

CONVERSATIONS = [
    [{"role": "user", "content": "the cat sat"}],
    [{"role": "system", "content": " be brief "}, {"role": "user", "content": "a dog ran\n"},
     {"role": "assistant", "content": "home"}, {"role": "user", "content": "is it big?"}],
]
TEMPLATE_A = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny llama models with the word-level test tokenizer and no chat template."""
    return _pair_with_config(tmp_path_factory.mktemp("chat_template"), "llama", lambda config: None)


def mergekit_template(name: str) -> str:
    import mergekit._data.chat_templates as shipped

    return (Path(shipped.__file__).parent / f"{name}.jinja").read_text()


def rendered(tokenizer, template: str) -> list[str]:
    return [tokenizer.apply_chat_template(c, chat_template=template, tokenize=False, add_generation_prompt=g)
            for c in CONVERSATIONS for g in (False, True)]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_templates_render_mergekits_prompts(pair, name):
    tokenizer = transformers.AutoTokenizer.from_pretrained(pair[0])
    tokenizer.bos_token = "<s>"
    assert rendered(tokenizer, SHIPPED[name]) == rendered(tokenizer, mergekit_template(name))


def _with_template(root: Path, model: Path, template: str | None) -> Path:
    copy = root / f"{model.name}_{abs(hash(template)) % 1000}"
    shutil.copytree(model, copy)
    if template is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(copy)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(copy)
    return copy


def _config(models: list[Path], template: str, source: str | None = None) -> str:
    text = f"merge_method: linear\nbase_model: {models[0]}\nparameters: {{weight: 0.5}}\nmodels:\n"
    text += "".join(f"  - model: {m}\n" for m in models)
    text += f"chat_template: {json.dumps(template)}\n"
    return text + (f"tokenizer_source: {source}\n" if source else "")


@pytest.mark.parametrize("source", [None, "base"])
@pytest.mark.parametrize("template", ["auto", "jinja", "auto_none"])
def test_chat_template_files_like_mergekit(tmp_path, pair, template, source):
    """`auto` takes the template most models carry; Jinja text is set as given: the tokenizer files are
    mergekit's, with or without tokenizer_source; `auto` with no template among the models sets none."""
    a, b = pair[0], pair[1]
    if template == "auto_none":
        models, value = [a, b], "auto"
    elif template == "auto":
        models = [_with_template(tmp_path, a, TEMPLATE_B), _with_template(tmp_path, b, TEMPLATE_A),
                  _with_template(tmp_path, a, TEMPLATE_A)]
        value = "auto"
    else:
        models, value = [a, b], TEMPLATE_B
    mk, us = both(tmp_path, _config(models, value, source))
    files = sorted(p.name for p in mk.iterdir())
    assert sorted(p.name for p in us.iterdir()) == files
    for f in files:
        if f != "README.md" and not f.endswith(".safetensors"):
            assert (us / f).read_text() == (mk / f).read_text(), f
    saved = transformers.AutoTokenizer.from_pretrained(us).chat_template
    assert saved == {"auto": TEMPLATE_A, "jinja": TEMPLATE_B, "auto_none": None}[template]
    assert_within_one_ulp(load_folder(us), load_folder(mk))


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_template_saved_like_mergekit(tmp_path, pair, name):
    """A shipped name: the saved tokenizer renders mergekit's prompts; every other file is mergekit's."""
    mk, us = both(tmp_path, _config([pair[0], pair[1]], name))
    ours, theirs = (transformers.AutoTokenizer.from_pretrained(d) for d in (us, mk))
    ours.bos_token = theirs.bos_token = "<s>"  # llama3's template starts with it
    assert rendered(ours, ours.chat_template) == rendered(theirs, theirs.chat_template)
    assert sorted(p.name for p in us.iterdir()) == sorted(p.name for p in mk.iterdir())
    assert (us / "tokenizer.json").read_text() == (mk / "tokenizer.json").read_text()


def test_chat_template_of_a_stage_reaches_the_chain_output(tmp_path, pair):
    """mergekit-multi: a stage saves its tokenizer with its template; the final stage copies it."""
    import yaml

    a, b = pair[0], pair[1]
    docs = [{"name": "first", "merge_method": "linear", "base_model": str(a), "chat_template": TEMPLATE_B,
             "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]},
            {"merge_method": "slerp", "base_model": "first", "parameters": {"t": 0.5},
             "models": [{"model": "first"}, {"model": str(b)}]}]
    path = tmp_path / "chain.yml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = run_cli("merge", str(path), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == TEMPLATE_B

"""Models whose tokenizers differ (added chat tokens, new words that move later ids): `tokenizer_source:
union`, `base`, a model, and `tokenizer:` with tokens and padding, against mergekit-yaml and
mergekit-multi; the in-memory candidate against `search merge`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from merge_core.chain import ChainMerger, ChainPlan, parse_chain
from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from tests.conftest import WORDS, build_tiny_model, run_cli
from tests.merge_core.test_chain import SEED, mergekit_multi, write_docs
from tests.merge_core.test_methods_oracle import mergekit_merge, ulp_report
from tests.merge_core.test_oracle import load_folder

CHAT = ["<|im_start|>", "<|im_end|>"]
FISH = WORDS[:5] + ["fish"] + WORDS[5:]  # one new word: every later word moves one id up


def save_tokenizer(folder: Path, words: list[str], special: list[str] = ()) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.save_pretrained(folder)
    return len(fast)


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi"])
def vocab_family(request, tmp_path_factory) -> dict[str, Path]:
    return build_vocab_family(tmp_path_factory.mktemp(f"vocab_{request.param}"), request.param)


def build_vocab_family(root: Path, arch: str) -> dict[str, Path]:
    """base (17 tokens); chat (+2 special tokens, 19 rows); fish (a new word at id 7, 18 rows); tied
    embeddings for qwen2, an lm_head bias for phi. Each child is the base's weights plus a delta, rows
    moved with its tokenizer."""
    from safetensors.torch import load_file, save_file

    base = build_tiny_model(root / "base", arch, seed=1)
    weights = load_file(base / "model.safetensors")
    out = {"base": base}
    for i, (name, words, special) in enumerate([("chat", WORDS, CHAT), ("fish", FISH, [])], start=2):
        rows = len(WORDS) + 2 + len(special) + len(words) - len(WORDS)
        folder = build_tiny_model(root / name, arch, seed=i, vocab_rows=rows)
        save_tokenizer(folder, words, special)
        generator = torch.Generator().manual_seed(i)
        child = {}
        for tensor_name, t in weights.items():
            if t.shape[0] == len(WORDS) + 2 and ("embed" in tensor_name or "lm_head" in tensor_name):
                old_ids = [0, 1] + [2 + WORDS.index(w) if w in WORDS else -1 for w in words]
                t = torch.stack([t[j] if j >= 0 else torch.randn(t.shape[1:], generator=generator)
                                 for j in old_ids + [-1] * len(special)])
            child[tensor_name] = (t + torch.randn(t.shape, generator=generator) * 0.02).contiguous()
        save_file(child, folder / "model.safetensors", metadata={"format": "pt"})
        out[name] = folder
    return out


def models_of(f, weights: dict[str, float | None]) -> list[dict]:
    return [{"model": str(f[n])} | ({"parameters": {"weight": w}} if w is not None else {}) for n, w in weights.items()]


CASES = {
    "union_linear": lambda f: {"merge_method": "linear", "dtype": "float32", "base_model": str(f["base"]),
                               "models": models_of(f, {"base": 0.5, "chat": 0.3, "fish": 0.2}),
                               "tokenizer_source": "union"},
    "union_ties_float16": lambda f: {
        "merge_method": "ties", "dtype": "float16", "base_model": str(f["base"]),
        "models": models_of(f, {"base": None, "chat": 0.6, "fish": 0.4}),
        "parameters": {"density": 0.6}, "tokenizer_source": "union"},
    "union_dare_ties_seeded": lambda f: {
        "merge_method": "dare_ties", "dtype": "float32", "base_model": str(f["base"]),
        "models": models_of(f, {"base": None, "chat": 0.6, "fish": 0.4}),
        "parameters": {"density": 0.7}, "tokenizer_source": "union"},
    "base_task_arithmetic": lambda f: {
        "merge_method": "task_arithmetic", "base_model": str(f["base"]),
        "models": models_of(f, {"chat": 0.6, "fish": 0.5}), "tokenizer_source": "base"},
    "chat_slerp": lambda f: {
        "merge_method": "slerp", "base_model": str(f["fish"]), "dtype": "bfloat16",
        "models": models_of(f, {"chat": None, "fish": None}), "parameters": {"t": [0, 0.3, 1]},
        "tokenizer_source": str(f["chat"])},
    "tokens_and_padding": lambda f: {
        "merge_method": "linear", "base_model": str(f["chat"]),
        "slices": [{"sources": [{"model": str(f[n]), "layer_range": [0, 4], "parameters": {"weight": w}}
                                for n, w in (("chat", 0.5), ("fish", 0.3), ("base", 0.2))]}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<|im_start|>": {"source": {"kind": "zero"}},
            "<|im_end|>": {"source": str(f["chat"]), "force": True},
            "cat": {"source": {"kind": "model_token", "model": str(f["fish"]), "token": "dog"}, "force": True},
            "<think>": {"source": {"kind": "model_token", "model": str(f["base"]), "token_id": 3}}}}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_vocabularies_merge_like_mergekit(vocab_family, tmp_path, case):
    config = CASES[case](vocab_family)
    mk = mergekit_merge(config, tmp_path / "mk", seed=SEED)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"), "--random-seed", str(SEED))
    assert result.returncode == 0, result.stderr
    us = tmp_path / "ours"
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (us / f).read_text() == (mk / f).read_text(), f
    written = load_folder(us)
    off = {n: r for n, r in ulp_report(written, load_folder(mk)).items() if r[0]}
    if case == "union_ties_float16":  # half precision ties magnitudes at the threshold (README)
        assert all(bad <= max(4, 0.02 * n) for bad, n in off.values()), off
    else:
        assert not off, off
    rows = {"union": 20, "base": 17, "chat": 19}
    if case != "tokens_and_padding":
        assert written["model.embed_tokens.weight"].shape[0] == rows[case.split("_")[0]]
    else:
        assert written["model.embed_tokens.weight"].shape[0] == 24  # 21 tokens padded to 8

    merger = Merger(MergePlan(parse_config(config)), seed=SEED)
    live = merger.new_model()
    merger.build_into(live)
    state = {n: p.detach() for n, p in live.state_dict().items() if n in written}
    assert sorted(state) == sorted(written)
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), f"{name}: in-memory candidate differs from search merge"


def test_union_rows_are_each_models_own(vocab_family, tmp_path):
    """What the merge reads for each token: a model's own row of it where it has one, the base's where the
    base has it, the only model's that has it otherwise (chat tokens, fish)."""
    f = vocab_family
    plan = MergePlan(parse_config(CASES["union_linear"](f)))
    vocab = plan.tokenizer.get_vocab()
    assert list(vocab) and sorted(vocab.values()) == list(range(20))
    assert vocab["fish"] == 17 and [vocab[t] for t in CHAT] == [18, 19]  # new words first, special ones last
    embed = next(o for o in plan.outputs if o.name == "model.embed_tokens.weight")
    base, chat, fish = plan.inputs(embed).tensors
    own = {name: load_folder(f[name])["model.embed_tokens.weight"] for name in ("base", "chat", "fish")}
    assert torch.equal(fish[vocab["mat"]], own["fish"][FISH.index("mat") + 2])
    assert torch.equal(base[vocab["fish"]], own["fish"][7]) and torch.equal(chat[vocab["fish"]], own["fish"][7])
    assert torch.equal(base[18], own["chat"][17]) and torch.equal(fish[19], own["chat"][18])
    assert torch.equal(chat[:17], own["chat"][:17])


def test_gpt_neox_vocabulary_tensors_are_lined_up(tmp_path):
    """gpt-neox names its vocabulary tensors embed_in and embed_out (mergekit 0.1.5 cannot read this
    transformers' gpt-neox checkpoints, so no oracle here): both take each token's own row."""
    f = build_vocab_family(tmp_path / "models", "gpt_neox")
    plan = MergePlan(parse_config(CASES["union_linear"](f)))
    vocab = plan.tokenizer.get_vocab()
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        out = next(o for o in plan.outputs if o.name == name)
        assert out.aligned and plan.shape(out)[0] == 20
        base, chat, fish = plan.inputs(out).tensors
        own = {n: load_folder(f[n])[name] for n in ("base", "chat", "fish")}
        assert torch.equal(fish[vocab["mat"]], own["fish"][FISH.index("mat") + 2])
        assert torch.equal(base[vocab["fish"]], own["fish"][7]) and torch.equal(chat[18], own["chat"][17])
    result = run_cli("merge", str(_written(tmp_path, CASES["union_linear"](f))), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    merger = Merger(plan)
    live = merger.new_model()
    merger.build_into(live)
    written = load_folder(tmp_path / "ours")
    state = live.state_dict()
    for name, tensor in written.items():  # transformers 5 loads embed_out as lm_head
        live_name = "lm_head.weight" if name == "embed_out.weight" and name not in state else name
        assert torch.equal(state[live_name], tensor), name


def _written(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _chain_against_mergekit_multi(tmp_path: Path, docs: list[dict]) -> tuple[Path, Path]:
    """`search merge` and mergekit-multi on the same chain; their tokenizer.json must be equal.
    Returns (ours, mergekit's) output folders."""
    path = write_docs(tmp_path / "chain.yml", docs)
    mk = mergekit_multi(path, tmp_path / "mk", tmp_path / "inter")
    result = run_cli("merge", str(path), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    us = tmp_path / "ours"
    assert (us / "tokenizer.json").read_text() == (mk / "tokenizer.json").read_text()
    return us, mk


def test_chain_stage_with_a_union_like_mergekit_multi(vocab_family, tmp_path):
    """A stage that builds a union tokenizer: a later stage reads its rows, and the chain writes its tokenizer."""
    f = vocab_family
    docs = [{"name": "chatty", "merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
             "models": models_of(f, {"base": 0.5, "chat": 0.5}), "tokenizer_source": "union"},
            {"merge_method": "slerp", "base_model": "chatty", "dtype": "float32", "parameters": {"t": 0.3},
             "models": [{"model": "chatty"}, {"model": str(f["chat"])}]}]
    us, mk = _chain_against_mergekit_multi(tmp_path, docs)
    written = load_folder(us)
    assert not {n: r for n, r in ulp_report(written, load_folder(mk)).items() if r[0]}
    merger = ChainMerger(ChainPlan(parse_chain(docs)))
    live = merger.new_model()
    merger.build_into(live)
    assert all(torch.equal(p.detach(), written[n]) for n, p in live.state_dict().items() if n in written)


def test_a_stage_named_as_tokenizer_source_like_mergekit_multi(vocab_family, tmp_path):
    """`tokenizer_source: <stage>` (mergekit-multi reads that stage's written folder): the final stage
    takes the union stage's tokenizer, and the base it merges with gets rows for the union's tokens;
    a `model_token` source never needed (every model has the token, no force) is not checked, as in
    mergekit."""
    f = vocab_family
    docs = [{"name": "chatty", "merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
             "models": models_of(f, {"base": 0.5, "chat": 0.5}), "tokenizer_source": "union"},
            {"merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
             "models": models_of(f, {"base": 0.4}) + [{"model": "chatty", "parameters": {"weight": 0.6}}],
             "tokenizer": {"source": "chatty", "tokens": {"cat": {"source": {
                 "kind": "model_token", "model": str(f["base"]), "token": "no-such-word"}}}}}]
    us, mk = _chain_against_mergekit_multi(tmp_path, docs)
    assert all(token in AutoTokenizer.from_pretrained(us).get_vocab() for token in CHAT)
    written, expected = load_folder(us), load_folder(mk)
    assert {n: t.shape for n, t in written.items()} == {n: t.shape for n, t in expected.items()}
    assert not {n: r for n, r in ulp_report(written, expected).items() if r[0]}


def test_a_chains_new_tokens_take_mergekit_multis_sorted_order(vocab_family, tmp_path):
    """mergekit-multi rewrites each stage with sorted keys, so `tokens:` written as zebra, apple get
    their ids as apple, zebra there (mergekit-yaml keeps the written order for one document)."""
    f = vocab_family
    docs = [{"name": "first", "merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
             "models": models_of(f, {"base": 0.5, "chat": 0.5}), "tokenizer_source": "base"},
            {"merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
             "models": models_of(f, {"base": 0.5}) + [{"model": "first", "parameters": {"weight": 0.5}}],
             "tokenizer": {"source": str(f["chat"]), "tokens": {"zebra": {"source": {"kind": "zero"}},
                                                                 "apple": {"source": {"kind": "zero"}}}}}]
    us, mk = _chain_against_mergekit_multi(tmp_path, docs)
    vocab = AutoTokenizer.from_pretrained(us).get_vocab()
    assert vocab["apple"] < vocab["zebra"]
    assert not {n: r for n, r in ulp_report(load_folder(us), load_folder(mk)).items() if r[0]}


def test_study_over_a_union_vocabulary(families, tmp_path):
    """A study over models with different vocabularies: candidates are built on the union's rows and scored
    with the union tokenizer, and the exported best merges like mergekit. (llama: transformers loads the
    test's word-level tokenizer in a qwen2 folder as Qwen2Tokenizer, which cannot tokenise the tasks.)"""
    from tests.search.test_config_study import study

    vocab_family = build_vocab_family(tmp_path / "models", "llama")

    doc = study(families, tmp_path, "random", space=[
        {"parameter": "weight", "models": "all", "anchors": 1, "low": 0.1, "high": 1.0}])
    doc["merge"] = {"config": CASES["tokens_and_padding"](vocab_family)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = run_cli("start", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli("export", str(path)).returncode == 0
    best = sorted((tmp_path / "export").glob("*.yml"))[0]
    assert run_cli("merge", str(best), str(tmp_path / "ours")).returncode == 0
    merged = load_folder(tmp_path / "ours")
    assert merged["model.embed_tokens.weight"].shape[0] == 24
    theirs = load_folder(mergekit_merge(yaml.safe_load(best.read_text()), tmp_path / "mk", seed=0))
    assert not {n: r for n, r in ulp_report(merged, theirs).items() if r[0]}


def test_tokens_added_to_the_base_tokenizer_take_their_source(vocab_family, tmp_path):
    """`tokenizer: {source: base, tokens: {new: ...}}`: the base's tokenizer plus the new tokens, each row
    from its source. (mergekit 0.1.5 fails here with a KeyError: it adds the tokens to the base's own
    tokenizer object, so the base seems to hold them past its rows.) The base's tokens merge as with
    `tokenizer_source: base`, which mergekit does run."""
    f = vocab_family
    config = {"merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32",
              "models": models_of(f, {"base": 0.5, "chat": 0.5}),
              "tokenizer": {"source": "base", "tokens": {"<|im_start|>": {"source": str(f["chat"])},
                                                          "<think>": {"source": {"kind": "zero"}}}}}
    result = run_cli("merge", str(_written(tmp_path, config)), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    plain = {k: v for k, v in config.items() if k != "tokenizer"} | {"tokenizer_source": "base"}
    theirs = load_folder(mergekit_merge(plain, tmp_path / "mk", seed=None))
    ours = load_folder(tmp_path / "ours")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    start, think = vocab["<|im_start|>"], vocab["<think>"]
    assert {start, think} == {17, 18}  # in the config's order (yaml.safe_dump sorted it)
    chat_row = load_folder(f["chat"])["model.embed_tokens.weight"][17]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in ours:
            continue
        assert ours[name].shape[0] == 19 and torch.equal(ours[name][:17], theirs[name])
        assert not ours[name][think].any()
    assert torch.equal(ours["model.embed_tokens.weight"][start], chat_row)
    assert all(torch.equal(t, theirs[n]) for n, t in ours.items() if t.shape == theirs[n].shape)


def test_model_token_by_text_needs_a_tokenizer_that_loads(tmp_path):
    """A model whose tokenizer does not load shares the base's for its rows (as in mergekit), but a
    `model_token` given by text cannot be looked up in it: one line, exit 2, nothing written. (llama:
    transformers 5 builds an empty qwen2 tokenizer for a qwen2 folder without tokenizer files.)"""
    import shutil

    f = build_vocab_family(tmp_path / "models", "llama")
    bare = tmp_path / "bare"
    shutil.copytree(f["fish"], bare)
    for file in bare.glob("tokenizer*"):
        file.unlink()
    f["bare"] = bare
    config = {"merge_method": "linear", "base_model": str(f["base"]),
              "models": models_of(f, {"base": 0.5, "bare": 0.5}),
              "tokenizer": {"source": "base", "tokens": {"cat": {
                  "source": {"kind": "model_token", "model": str(bare), "token": "dog"}, "force": True}}}}
    result = run_cli("merge", str(_written(tmp_path, config)), str(tmp_path / "ours"))
    assert result.returncode == 2 and "give its row as token_id" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "ours").exists()
    by_id = {"source": {"kind": "model_token", "model": str(bare), "token_id": 3}, "force": True}
    config["tokenizer"]["tokens"]["cat"] = by_id
    result = run_cli("merge", str(_written(tmp_path, config)), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    cat = AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()["cat"]
    merged = load_folder(tmp_path / "ours")["model.embed_tokens.weight"]
    assert torch.equal(merged[cat], load_folder(bare)["model.embed_tokens.weight"][3])  # 0.5 r + 0.5 r


@pytest.mark.parametrize("kind", ["model outside the slice", "id past the rows"])
def test_a_token_row_that_cannot_be_read_is_refused_before_writing(tmp_path, kind):
    """A `tokenizer.tokens` source the embedding cannot read (a model its slice leaves out, or a
    `token_id` past that model's rows) fails at planning: one line, exit 2, no progress line, nothing
    written (mergekit-yaml fails on both too, half way through its merge)."""
    f = build_vocab_family(tmp_path / "models", "llama")
    first = [{"model": str(f["base"]), "layer_range": [0, 2]}, {"model": str(f["chat"]), "layer_range": [0, 2]}]
    second = [{"model": str(f["base"]), "layer_range": [2, 4]}, {"model": str(f["fish"]), "layer_range": [2, 4]}]
    source = ({"kind": "model_token", "model": str(f["fish"]), "token": "dog"} if kind == "model outside the slice"
              else {"kind": "model_token", "model": str(f["chat"]), "token_id": 19})
    config = {"merge_method": "linear", "base_model": str(f["base"]), "parameters": {"weight": 0.5},
              "slices": [{"sources": first}, {"sources": second}],
              "tokenizer": {"source": "union", "tokens": {"cat": {"source": source, "force": True}}}}
    result = run_cli("merge", str(_written(tmp_path, config)), str(tmp_path / "ours"))
    needle = "model.embed_tokens.weight is not merged from" if kind == "model outside the slice" else \
        "model_token id 19 is outside that model's 19 rows of model.embed_tokens.weight"
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "ours").exists()
    with pytest.raises(Exception):  # noqa: B017 - mergekit's own error, whatever its type
        mergekit_merge(config, tmp_path / "theirs")


def test_a_vocabulary_size_kept_in_two_places_is_written_to_both():
    """A vision-language config.json saved by transformers 4 can keep `vocab_size` at the top level and
    in `text_config`; transformers 5 reads the latter: both get the output's size, and the rows are
    read from `text_config`."""
    from merge_core.vocabulary import set_vocab_rows, vocab_rows

    both = {"vocab_size": 30, "text_config": {"vocab_size": 32}}
    assert vocab_rows(both) == 32
    set_vocab_rows(both, 18)
    assert both == {"vocab_size": 18, "text_config": {"vocab_size": 18}}
    text_only, top_only = {"text_config": {"vocab_size": 32}}, {"vocab_size": 32}
    set_vocab_rows(text_only, 18)
    set_vocab_rows(top_only, 18)
    assert text_only == {"text_config": {"vocab_size": 18}} and top_only == {"vocab_size": 18}

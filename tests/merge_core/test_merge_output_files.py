"""What `search merge` writes next to the tensors, compared with what `mergekit-yaml` writes.

config.json (saved by transformers, per-layer lists following the layers), the tokenizer files
(copied, or saved by transformers when tokenizer_source is set), mergekit_config.yml (the config
file's own text) and README.md (mergekit's card).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from merge_core.config import load_config
from merge_core.merger import MergePlan, Merger
from tests.conftest import WORDS, build_tiny_model, run_cli
from tests.merge_core.test_merge_bad_input import assert_refused
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def mergekit_yaml(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """mergekit's own CLI on a config file, offline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(out), "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def both(tmp_path: Path, text: str, *args: str) -> tuple[Path, Path]:
    """Run mergekit-yaml and search merge on one config text (with the same extra arguments); both
    outputs are folders named `merged`."""
    config = tmp_path / "config.yml"
    config.write_text(text)
    mk, us = tmp_path / "mk" / "merged", tmp_path / "us" / "merged"
    done = mergekit_yaml(config, mk, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = run_cli("merge", str(config), str(us), *args)
    assert result.returncode == 0, result.stderr
    return mk, us


def _pair_with_config(root: Path, arch: str, change) -> tuple[Path, Path]:
    """Two tiny models (seeds 1, 2) whose config.json `change(config)` edits in place."""
    pair = []
    for seed in (1, 2):
        folder = build_tiny_model(root / f"m{seed}", arch, seed=seed)
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        pair.append(folder)
    return pair[0], pair[1]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny qwen2 models whose config.json lists mixed `layer_types`."""
    return _pair_with_config(tmp_path_factory.mktemp("qwen_layer_types"), "qwen2",
                             lambda config: config.update(layer_types=LAYER_TYPES))


@pytest.fixture(scope="module")
def transformers4(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny llama models with a transformers-4 config.json (`torch_dtype`, an old version)."""

    def old_style(config):
        config.pop("dtype", None)
        config.update(torch_dtype="float32", transformers_version="4.44.0")

    return _pair_with_config(tmp_path_factory.mktemp("transformers4"), "llama", old_style)


@pytest.mark.parametrize("ranges", [[(0, 0, 3), (1, 1, 4)], [(0, 0, 2)], [(1, 3, 4), (0, 0, 4)]],
                         ids=["stack6", "cut2", "reorder5"])
def test_passthrough_layer_types_follow_the_layers(tmp_path, qwen, ranges):
    """mergekit writes the parents' layer_types (transformers then refuses the config); ours follow the layers."""
    slices = [{"sources": [{"model": str(qwen[m]), "layer_range": [a, b]}]} for m, a, b in ranges]
    config = tmp_path / "config.yml"
    config.write_text(json.dumps({"merge_method": "passthrough", "dtype": "float16", "slices": slices}))
    out = tmp_path / "out"
    result = run_cli("merge", str(config), str(out))
    assert result.returncode == 0, result.stderr
    loaded = transformers.AutoConfig.from_pretrained(out)
    expected = [LAYER_TYPES[i] for _, a, b in ranges for i in range(a, b)]
    assert loaded.num_hidden_layers == len(expected)
    assert loaded.layer_types == expected
    written = transformers.AutoModelForCausalLM.from_pretrained(out)  # the whole model loads
    # a study's live model is built from the same config, and the candidate is the written model
    merger = Merger(MergePlan(load_config(config)))
    live = merger.new_model()
    assert live.config.layer_types == expected
    merger.build_into(live)
    for name, tensor in written.state_dict().items():
        assert torch.equal(live.state_dict()[name].to(tensor.dtype), tensor), name


def test_plain_merge_keeps_layer_types_and_config_like_mergekit(tmp_path, qwen):
    text = (f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {qwen[0]}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {qwen[1]}\n    parameters: {{weight: 0.7}}\n")
    mk, us = both(tmp_path, text)
    assert json.loads((us / "config.json").read_text())["layer_types"] == LAYER_TYPES
    assert (us / "config.json").read_text() == (mk / "config.json").read_text()
    assert_within_one_ulp(load_folder(us), load_folder(mk))


def test_transformers4_config_written_as_mergekit_writes_it(tmp_path, transformers4):
    """`torch_dtype` parents: config.json says `dtype` (the merge's) and this transformers' version, like mergekit."""
    text = (f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {transformers4[0]}\n"
            f"    parameters: {{weight: 0.5}}\n  - model: {transformers4[1]}\n    parameters: {{weight: 0.5}}\n")
    mk, us = both(tmp_path, text)
    written = json.loads((us / "config.json").read_text())
    assert "torch_dtype" not in written and written["dtype"] == "bfloat16"
    assert written["transformers_version"] == transformers.__version__
    assert (us / "config.json").read_text() == (mk / "config.json").read_text()


def test_no_dtype_keeps_the_reference_dtype_like_mergekit(tmp_path, transformers4):
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {transformers4[1]}\n"
            "        layer_range: [0, 4]\n")
    mk, us = both(tmp_path, text)
    assert (us / "config.json").read_text() == (mk / "config.json").read_text()


@pytest.mark.parametrize("source", ["base", "other"])
def test_tokenizer_source_files_like_mergekit(tmp_path, transformers4, source):
    """tokenizer_source: the tokenizer saved by transformers (is_local, local_files_only), no generation_config."""
    name = "base" if source == "base" else str(transformers4[1])
    text = (f"merge_method: linear\ndtype: float32\nbase_model: {transformers4[0]}\nmodels:\n"
            f"  - model: {transformers4[0]}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {transformers4[1]}\n    parameters: {{weight: 0.4}}\ntokenizer_source: {name}\n")
    mk, us = both(tmp_path, text)
    files = sorted(p.name for p in mk.iterdir())
    assert sorted(p.name for p in us.iterdir()) == files
    assert "generation_config.json" not in files
    for f in files:
        if f != "README.md" and not f.endswith(".safetensors"):
            assert (us / f).read_text() == (mk / f).read_text(), f
    assert "local_files_only" in json.loads((us / "tokenizer_config.json").read_text())
    assert_within_one_ulp(load_folder(us), load_folder(mk))


def test_without_tokenizer_source_files_like_mergekit(tmp_path, transformers4):
    """No tokenizer_source: the donor's files are copied, generation_config.json included."""
    text = (f"merge_method: slerp\ndtype: float16\nbase_model: {transformers4[1]}\nmodels:\n"
            f"  - model: {transformers4[0]}\n  - model: {transformers4[1]}\nparameters: {{t: 0.3}}\n")
    mk, us = both(tmp_path, text)
    files = sorted(p.name for p in mk.iterdir())
    assert sorted(p.name for p in us.iterdir()) == files
    assert "generation_config.json" in files
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (us / f).read_text() == (mk / f).read_text(), f


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> dict[str, Path]:
    """Three tiny phi models (lm_head has a bias) whose embeddings have more rows than the tokenizer has
    tokens, as phi-2's 51,200 rows for 50,295 tokens; `short` has one row per token."""
    root = tmp_path_factory.mktemp("padded_vocabulary")
    rows = len(WORDS) + 2 + 7
    return {"base": build_tiny_model(root / "base", "phi", seed=1, vocab_rows=rows),
            "child": build_tiny_model(root / "child", "phi", seed=2, vocab_rows=rows),
            "other": build_tiny_model(root / "other", "phi", seed=3, vocab_rows=rows),
            "short": build_tiny_model(root / "short", "phi", seed=4)}


PADDED_MERGES = {
    # ties elects over whole tensors (a cut after the merge would give other bits; in float32, as half
    # precision ties magnitudes, see README), model_stock takes angles between whole tensors, slerp norms
    "ties": "merge_method: ties\ndtype: float32\nbase_model: {base}\nparameters: {{density: 0.5, weight: 0.6}}\n"
            "models:\n  - model: {base}\n  - model: {child}\n  - model: {other}\n",
    "model_stock": "merge_method: model_stock\ndtype: float16\nbase_model: {base}\n"
                   "models:\n  - model: {base}\n  - model: {child}\n  - model: {other}\n",
    "slerp": "merge_method: slerp\ndtype: float16\nbase_model: {base}\nparameters: {{t: [0, 0.3, 1]}}\n"
             "models:\n  - model: {base}\n  - model: {child}\n",
    "rows_differ": "merge_method: linear\ndtype: bfloat16\nparameters: {{weight: 0.5}}\nbase_model: {base}\n"
                   "models:\n  - model: {base}\n  - model: {short}\n",
}


@pytest.mark.parametrize("source", ["base", "child"])
@pytest.mark.parametrize("merge", list(PADDED_MERGES))
def test_padded_vocabulary_is_cut_to_the_tokenizer_like_mergekit(tmp_path, padded, merge, source):
    """tokenizer_source on embeddings with spare rows: mergekit merges the first rows, one per token, and
    sets vocab_size to the tokenizer's length; so do search merge and a study's in-memory candidate."""
    text = PADDED_MERGES[merge].format(**padded) + "tokenizer_source: " + (
        "base" if source == "base" else str(padded[source])) + "\n"
    mk, us = both(tmp_path, text)
    ours = load_folder(us)
    assert ours["model.embed_tokens.weight"].shape[0] == len(WORDS) + 2
    assert ours["lm_head.bias"].shape == (len(WORDS) + 2,)
    assert_within_one_ulp(ours, load_folder(mk))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (us / f).read_text() == (mk / f).read_text(), f
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")))
    live = merger.new_model()
    merger.build_into(live)
    for name, tensor in ours.items():
        assert torch.equal(live.state_dict()[name].to(tensor.dtype), tensor), name


def _with_tokenizer(root: Path, model: Path, change) -> Path:
    """A copy of `model` whose tokenizer.json's vocabulary `change(vocab)` edits in place."""
    copy = root / f"{model.name}_retokenized"
    shutil.copytree(model, copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    change(tokenizer["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    return copy


def _swap_two(vocab: dict) -> None:
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]


@pytest.mark.parametrize("case", ["moved_ids", "more_tokens_than_rows"])
def test_tokenizer_that_rebuilds_embeddings_merges_like_mergekit(tmp_path, padded, case):
    """Tokens at other ids, a tokenizer longer than a model's embedding: mergekit moves rows, and fills the
    rows of tokens no model has with zeros; so do search merge and the in-memory candidate."""
    base = padded["base"]
    if case == "moved_ids":
        models, source = [base, _with_tokenizer(tmp_path, padded["child"], _swap_two)], "base"
    else:
        longer = _with_tokenizer(tmp_path, padded["short"], lambda v: v.update({f"w{i}": 17 + i for i in range(9)}))
        models, source = [padded["short"], base], str(longer)
    text = (f"merge_method: linear\nparameters: {{weight: 0.5}}\nbase_model: {models[0]}\nmodels:\n"
            f"  - model: {models[0]}\n  - model: {models[1]}\ntokenizer_source: {source}\n")
    mk, us = both(tmp_path, text)
    ours = load_folder(us)
    assert_within_one_ulp(ours, load_folder(mk))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (us / f).read_text() == (mk / f).read_text(), f
    if case == "more_tokens_than_rows":  # rows 17..25: tokens neither model has
        assert ours["model.embed_tokens.weight"].shape[0] == 26
        assert not ours["model.embed_tokens.weight"][17:].any()
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")))
    live = merger.new_model()
    merger.build_into(live)
    for name, tensor in ours.items():
        assert torch.equal(live.state_dict()[name].to(tensor.dtype), tensor), name


def test_tokenizer_with_a_gap_in_its_ids_is_refused(tmp_path, padded):
    """Ids that skip a row: mergekit fails indexing its rebuilt embedding; we say so in one line."""
    gap = _with_tokenizer(tmp_path, padded["base"], lambda v: v.update({"mat": 20}))
    config = tmp_path / "config.yml"
    config.write_text(f"merge_method: linear\nparameters: {{weight: 0.5}}\nmodels:\n  - model: {padded['base']}\n"
                      f"  - model: {padded['child']}\ntokenizer_source: {gap}\n")
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(config), str(out)), f"tokenizer_source: {gap}", "not 0..16", out=out)


def test_config_text_and_card_like_mergekit(tmp_path, transformers4):
    """mergekit_config.yml is the file's own text (comments, flow style); README.md is mergekit's card."""
    text = (f"# my merge, v3: m1 heavier\nmerge_method: slerp\nbase_model: {transformers4[0]}\nmodels:\n"
            f"  - model: {transformers4[0]}\n  - model: {transformers4[1]}\nparameters:\n"
            "  t: [0, 0.5, 1]   # V-shaped\ndtype: bfloat16\n")
    mk, us = both(tmp_path, text)
    assert (us / "mergekit_config.yml").read_text() == text == (mk / "mergekit_config.yml").read_text()
    ours, theirs = (us / "README.md").read_text(), (mk / "README.md").read_text()
    # mergekit lists the models in a Python set's order, which changes from run to run
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
    assert [line for line in ours.splitlines() if not line.startswith("* ")] == \
           [line for line in theirs.splitlines() if not line.startswith("* ")]
    assert "# merged\n" in ours and "base_model: []" in ours and text in ours


def test_card_with_base_names_it_like_mergekit(tmp_path, transformers4):
    text = (f"merge_method: task_arithmetic\nbase_model: {transformers4[0]}\nmodels:\n"
            f"  - model: {transformers4[1]}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    mk, us = both(tmp_path, text)
    assert (us / "README.md").read_text() == (mk / "README.md").read_text()


@pytest.mark.parametrize("args", [
    ("--out-shard-size", "30K", "--no-write-model-card", "--no-copy-tokenizer"),
    ("--out-shard-size", "0", "--lazy-unpickle", "--allow-crimes", "--clone-tensors", "--low-cpu-memory",
     "--write-threads", "2", "--async-write", "--no-cuda"),
    ("--out-shard-size", "25000", "--copy-tokenizer", "--write-model-card", "--safe-serialization"),
])
def test_mergekit_yaml_flags_write_what_mergekit_writes(tmp_path, transformers4, args):
    """mergekit-yaml's command-line flags: the same files, shards (names, tensors per shard, index)
    and tensors; the flags that only tune how mergekit runs are accepted and change nothing."""
    from safetensors import safe_open

    text = (f"merge_method: linear\nmodels:\n  - model: {transformers4[0]}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {transformers4[1]}\n    parameters: {{weight: 0.7}}\ndtype: float32\n")
    mk, us = both(tmp_path, text, *args)
    names = sorted(p.name for p in us.iterdir())
    assert names == sorted(p.name for p in mk.iterdir())
    shards = sorted(p.name for p in us.glob("*.safetensors"))
    assert (len(shards) > 1) == (args[1] != "0")
    for shard in shards:
        with safe_open(us / shard, "pt") as ours, safe_open(mk / shard, "pt") as theirs:
            assert sorted(ours.keys()) == sorted(theirs.keys()), shard
    if len(shards) > 1:
        index = json.loads((us / "model.safetensors.index.json").read_text())["weight_map"]
        assert index == json.loads((mk / "model.safetensors.index.json").read_text())["weight_map"]
    assert_within_one_ulp(load_folder(us), load_folder(mk))


@pytest.mark.parametrize("args,words", [
    (("--out-shard-size", "5GB"), ["--out-shard-size", "5B, 500M"]),
    (("--no-safe-serialization",), ["safetensors only"]),
])
def test_mergekit_yaml_flags_we_cannot_honour_are_refused(tmp_path, transformers4, args, words):
    config = tmp_path / "config.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {transformers4[0]}\n    parameters: "
                      f"{{weight: 1.0}}\n")
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(config), str(out), *args), *words, out=out)


def test_models_without_a_tokenizer_merge_like_mergekit(tmp_path):
    """No tokenizer files (a checkpoint shipped as weights and config only): mergekit logs that it
    has none to copy and writes the model; so do we, with the same tensors and files."""
    models = []
    for seed in (1, 2):
        folder = build_tiny_model(tmp_path / f"m{seed}", "llama", seed=seed)
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                f.unlink()
        models.append(folder)
    text = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models[0]}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {models[1]}\n    parameters: {{weight: 0.7}}\n")
    mk, us = both(tmp_path, text)
    assert sorted(p.name for p in us.iterdir()) == sorted(p.name for p in mk.iterdir())
    assert not list(us.glob("tokenizer*"))
    ours, theirs = load_folder(us), load_folder(mk)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def _neox_models(root: Path, count: int, bool_masks: bool = False) -> list[Path]:
    """Tiny gpt-neox checkpoints as older transformers saved them: the head as `embed_out` (which
    transformers 5 loads as `lm_head`), with the buffers mergekit's gpt-neox definition expects (the
    attention masks as bool, as pythia's checkpoints hold them, with `bool_masks`)."""
    from safetensors.torch import save_file

    models = []
    for seed in range(1, count + 1):
        folder = build_tiny_model(root / f"neox{seed}", "gpt_neox", seed=seed)
        tensors = load_folder(folder)
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight", tensors.get("embed_out.weight"))
        for i in range(4):
            mask = torch.ones(1, 1, 64, 64, dtype=torch.bool if bool_masks else torch.float32).tril()
            tensors[f"gpt_neox.layers.{i}.attention.bias"] = mask
            tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        models.append(folder)
    return models


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_gpt_neox_live_model_is_the_merged_folder_as_transformers_loads_it(tmp_path, method):
    """A study's live model of a checkpoint whose names transformers changes on load (embed_out ->
    lm_head) and whose stale buffers it drops: the renamed tensors are written, the dropped ones are
    not (a randomised method still draws their masks, so later masks stay those of search merge)."""
    base, *children = _neox_models(tmp_path, 3)
    density = ", density: 0.7" if method == "dare_ties" else ""
    models = "".join(f"  - model: {c}\n    parameters: {{weight: 0.5{density}}}\n" for c in children)
    text = f"merge_method: {method}\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {base}\n{models}"
    (tmp_path / "config.yml").write_text(text)
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "us"), "--random-seed", "7")
    assert result.returncode == 0, result.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "us", dtype=torch.float32)
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")), seed=7)
    live = merger.new_model()
    merger.build_into(live)
    expected = loaded.state_dict()
    assert sorted(live.state_dict()) == sorted(expected)
    for name, tensor in live.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(live.lm_head.weight, load_folder(tmp_path / "us")["embed_out.weight"])


def test_gpt_neox_output_head_comes_from_the_last_slice_like_mergekit(tmp_path):
    """gpt-neox's head is `embed_out`: an output-side tensor (mergekit's post_weights), taken from
    the last slice of a passthrough like the final norm, not from the first like `embed_in`."""
    models = _neox_models(tmp_path, 2)
    text = (f"merge_method: passthrough\ndtype: float32\nslices:\n"
            f"  - sources:\n      - model: {models[0]}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {models[1]}\n        layer_range: [1, 4]\n")
    mk, us = both(tmp_path, text)
    ours, theirs = load_folder(us), load_folder(mk)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(ours["embed_out.weight"], load_folder(models[1])["embed_out.weight"])


def _qwen2_family(root: Path, tied: list[bool]) -> list[Path]:
    """Tiny qwen2 models of one shape, each with tied embeddings (no lm_head.weight stored) or its own head."""
    from safetensors.torch import save_file

    models = []
    for seed, tie in enumerate(tied, start=1):
        folder = build_tiny_model(root / f"qwen{seed}", "qwen2", seed=seed)
        if not tie:
            tensors = load_folder(folder)
            generator = torch.Generator().manual_seed(seed)
            embeddings = tensors["model.embed_tokens.weight"]
            tensors["lm_head.weight"] = embeddings + torch.randn(embeddings.shape, generator=generator) * 0.02
            for f in folder.glob("model*.safetensors*"):
                f.unlink()
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            config = json.loads((folder / "config.json").read_text())
            config["tie_word_embeddings"] = False
            (folder / "config.json").write_text(json.dumps(config, indent=2))
        models.append(folder)
    return models


@pytest.mark.parametrize("tied, key_written", [([False, True, False], True), ([True, False, False], True),
                                               ([True, False, False], False)],
                         ids=["untied_base", "tied_base", "tied_base_without_the_key"])
def test_tied_and_untied_heads_merge_like_mergekit(tmp_path, tied, key_written):
    """A model with tied embeddings stores no lm_head.weight: where another model has its own head,
    mergekit merges the heads with the tied models' embeddings in their place (its `tied_names`), and
    so do we. A tied reference keeps `tie_word_embeddings: true` in mergekit's config.json, so
    transformers would discard the merged head it wrote; ours says false, so the head is used."""
    base, *children = _qwen2_family(tmp_path, tied)
    if not key_written:  # transformers leaves out keys equal to the config class's default
        config = json.loads((base / "config.json").read_text())
        del config["tie_word_embeddings"]
        (base / "config.json").write_text(json.dumps(config, indent=2))
    text = (f"merge_method: task_arithmetic\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {base}\n"
            f"  - model: {children[0]}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {children[1]}\n    parameters: {{weight: [0.2, 0.8]}}\n")
    mk, us = both(tmp_path, text)
    ours, theirs = load_folder(us), load_folder(mk)
    assert "lm_head.weight" in theirs
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    ours_config, their_config = (json.loads((d / "config.json").read_text()) for d in (us, mk))
    assert ours_config["tie_word_embeddings"] is False
    assert their_config.get("tie_word_embeddings", False) is (tied[0] and key_written)
    # the study's live model is untied too, and holds the same head
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")))
    live = merger.new_model()
    merger.build_into(live)
    assert torch.equal(live.lm_head.weight.detach(), ours["lm_head.weight"])
    assert not torch.equal(live.lm_head.weight.detach(), live.model.embed_tokens.weight.detach())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(us)
    assert torch.equal(loaded.lm_head.weight.detach(), ours["lm_head.weight"])


@pytest.mark.parametrize("method, args", [("task_arithmetic", ()), ("dare_ties", ("--random-seed", "3"))])
@pytest.mark.parametrize("filtered", ["lm_head", "embed_tokens"])
def test_a_tied_models_stand_in_head_takes_the_heads_filter_entries(tmp_path, method, args, filtered):
    """A tied model's input embeddings stand in for its output head, and mergekit plans that input as
    the head: filter entries match it by `lm_head`, not by `embed_tokens` (they used to, so a child's
    `lm_head` weight went unused and its `embed_tokens` weight was applied to the head too)."""
    base, untied, tied = _qwen2_family(tmp_path, [True, False, True])
    dare = method == "dare_ties"
    text = (f"merge_method: {method}\ndtype: float32\nbase_model: {base}\nmodels:\n"
            f"  - model: {untied}\n    parameters: {{{'density: 0.6, ' if dare else ''}weight: 1.0}}\n"
            f"  - model: {tied}\n    parameters:\n"
            + (f"      density: [{{filter: {filtered}, value: 0.3}}, {{value: 0.9}}]\n" if dare else "")
            + f"      weight: [{{filter: {filtered}, value: -0.5}}, {{value: 0.5}}]\n")
    mk, us = both(tmp_path, text, *args)
    ours, theirs = load_folder(us), load_folder(mk)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")), seed=3)
    live = merger.new_model()
    merger.build_into(live)
    assert torch.equal(live.lm_head.weight.detach(), ours["lm_head.weight"])
    assert torch.equal(live.model.embed_tokens.weight.detach(), ours["model.embed_tokens.weight"])


@pytest.mark.parametrize("method, args", [("task_arithmetic", ()), ("dare_ties", ("--random-seed", "7")),
                                          ("slerp", ())])
def test_old_checkpoint_buffers_merge_like_mergekit(tmp_path, method, args):
    """With a config dtype, mergekit casts bool and integer tensors (pythia's attention masks) to it
    and merges them like the others, drawing DARE masks for them too; merges of infinite tensors
    (masked_bias -1e9 in float16) are NaN, SLERP's included. search merge writes the same tensors."""
    base, *children = _neox_models(tmp_path, 3, bool_masks=True)
    if method == "slerp":
        body = f"base_model: {base}\nmodels:\n  - model: {base}\n  - model: {children[0]}\nparameters: {{t: 0.3}}\n"
    else:
        density = ", density: 0.7" if method == "dare_ties" else ""
        body = f"base_model: {base}\nmodels:\n  - model: {base}\n" + "".join(
            f"  - model: {c}\n    parameters: {{weight: 0.5{density}}}\n" for c in children)
    mk, us = both(tmp_path, f"merge_method: {method}\ndtype: float16\n{body}", *args)
    ours, theirs = load_folder(us), load_folder(mk)
    assert sorted(ours) == sorted(theirs)
    assert ours["gpt_neox.layers.0.attention.bias"].dtype == torch.float16
    finite = {n: t for n, t in theirs.items() if not t.isnan().any()}
    assert all(ours[n].isnan().all() for n in theirs.keys() - finite.keys())
    assert_within_one_ulp({n: ours[n] for n in finite}, finite)
    if method != "slerp":  # SLERP is within one ulp of mergekit's; the others bit for bit
        for name, tensor in finite.items():
            assert torch.equal(ours[name], tensor), name


def test_an_integer_live_buffer_takes_the_merged_floats_as_a_load_would(families):
    """A live model's integer buffer (where a checkpoint's integer tensor is merged as floats under a
    config dtype) gets the merged values cast to its dtype, as copying the merged folder's tensor in
    at load time would."""
    from merge_core.merger import _merge_one

    f = families["llama"]
    config = load_config_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {f['child_1']}\n"
                              f"    parameters: {{weight: 70.0}}\n  - model: {f['child_2']}\n"
                              f"    parameters: {{weight: 30.0}}\nparameters: {{normalize: false}}\n")
    plan = MergePlan(config)
    out = next(o for o in plan.outputs if o.name.endswith("input_layernorm.weight"))
    values = plan.values()[plan.outputs.index(out)]
    inputs = plan.inputs(out)
    floats = torch.empty(plan.shape(out), dtype=plan.output_dtype(out))
    _merge_one(plan, out, inputs, None, values, None, floats)
    integers = torch.empty(plan.shape(out), dtype=torch.int64)
    _merge_one(plan, out, inputs, None, values, None, integers)
    assert torch.equal(integers, floats.to(torch.int64))
    assert integers.abs().sum() > 0


def load_config_text(text: str):
    from merge_core.config import parse_config

    return parse_config(yaml.safe_load(text))


def test_a_tied_config_that_stores_its_head_stays_tied(tmp_path):
    """tie_word_embeddings: true with an lm_head.weight stored anyway (transformers ignores it): the
    merged config stays tied, as the models are, and as mergekit writes it."""
    from safetensors.torch import save_file

    models = _qwen2_family(tmp_path, [True, True])
    for folder in models:
        tensors = load_folder(folder)
        tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape)
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    text = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models[0]}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {models[1]}\n    parameters: {{weight: 0.5}}\n")
    mk, us = both(tmp_path, text)
    assert json.loads((us / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((mk / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("first", ["float32", "bfloat16"])
def test_parents_of_several_dtypes_merged_without_dtype(tmp_path, first):
    """Without `dtype`, each tensor keeps its source's dtype, as mergekit writes it, and config.json
    names the reference model's; transformers loads the output in that dtype. The study's live model
    is built in it too (it took the dtype most tensors had: bfloat16 where config.json says float32)."""
    other = "bfloat16" if first == "float32" else "float32"
    a = build_tiny_model(tmp_path / "a", "phi", seed=1, dtype=first)
    b = build_tiny_model(tmp_path / "b", "phi", seed=2, dtype=other)
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n"
            f"  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n")
    mk, us = both(tmp_path, text)
    written = load_folder(us)
    assert_within_one_ulp(written, load_folder(mk))
    assert {t.dtype for t in written.values()} == {torch.float32, torch.bfloat16}
    assert json.loads((us / "config.json").read_text())["dtype"] == first
    loaded = transformers.AutoModelForCausalLM.from_pretrained(us).state_dict()
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")))
    model = merger.new_model()
    merger.build_into(model)
    live = model.state_dict()
    assert {t.dtype for t in live.values() if t.is_floating_point()} == {getattr(torch, first)}
    for name, tensor in loaded.items():
        assert torch.equal(live[name], tensor), name
    for name, tensor in written.items():
        assert torch.equal(live[name], tensor.to(live[name].dtype)), name

"""Mixture-of-experts checkpoints: merged in transformers' model layout (stacked experts), as mergekit does.

A Mixtral or Qwen-MoE checkpoint stores one tensor per expert; transformers 5 and mergekit 0.1.5
work on one stacked tensor per layer (`mlp.experts.gate_up_proj`), so TIES' threshold or SLERP's
angle covers all experts at once, and the merged model is written under model-layout names.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from merge_core.config import load_config
from merge_core.merger import MergePlan, Merger
from merge_core.weights import ModelWeights
from tests.conftest import build_tiny_model, run_cli
from tests.merge_core.test_merge_output_files import both
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

MOE = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, list]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: [build_tiny_model(root / f"{arch}_{seed}", arch, seed=seed, layers=3) for seed in (1, 2, 3)]
            for arch in MOE}


@pytest.mark.parametrize("arch", MOE)
def test_names_and_tensors_are_what_transformers_loads(moe, arch):
    """Every tensor we read is the model's own: names, shapes and values of from_pretrained's state dict."""
    folder = moe[arch][0]
    weights = ModelWeights(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert sorted(weights.names()) == sorted(loaded)
    assert any(".experts.gate_up_proj" in n for n in weights.names())
    for name, tensor in loaded.items():
        assert tuple(weights.index[name].shape) == tuple(tensor.shape), name
        assert torch.equal(weights.get(name), tensor), name


TINY = dict(vocab_size=17, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64, num_experts=3,
            num_local_experts=3, n_routed_experts=3, num_experts_per_tok=2, n_group=1, topk_group=1,
            shared_expert_intermediate_size=16, first_k_dense_replace=0)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "deepseek_v3", "phimoe", "glm4_moe", "minimax"])
def test_other_moe_families_read_as_transformers_loads_them(tmp_path, model_type):
    """Other families' conversion tables (renamings, stacked experts with and without concatenation)."""
    defaults = transformers.AutoConfig.for_model(model_type)
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in TINY.items() if hasattr(defaults, k)})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = ModelWeights(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert any(".experts." in n and "_proj" in n and n.count(".") <= 5 for n in weights.names())
    assert sorted(weights.names()) == sorted(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(weights.get(name), tensor), name


def test_an_unsupported_conversion_is_one_line():
    """A table entry built another way than stacking and concatenating (ernie4_5_vl_moe splits text and
    vision experts) is refused by name, with what to do instead."""
    from merge_core.errors import MergeInputError
    from merge_core.layout import model_layout

    names = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(2) for p in ("gate", "up", "down")]
    with pytest.raises(MergeInputError, match="ErnieFuseAndSplitTextVisionExperts, which merge-search does not "
                                              "reproduce; merge a checkpoint saved in model layout"):
        model_layout("ernie4_5_vl_moe", names)


MERGES = {
    # ties' magnitude threshold and slerp's angle reduce over a whole (stacked) tensor
    "ties": "merge_method: ties\ndtype: float32\nbase_model: {a}\nparameters: {{density: 0.5, weight: 0.6}}\n"
            "models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "slerp": "merge_method: slerp\ndtype: float16\nbase_model: {a}\nparameters: {{t: [0, 0.4, 1]}}\n"
             "models:\n  - model: {a}\n  - model: {b}\n",
    "model_stock": "merge_method: model_stock\ndtype: bfloat16\nbase_model: {a}\n"
                   "models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
}


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("merge", list(MERGES))
def test_moe_merges_like_mergekit(tmp_path, moe, arch, merge):
    """search merge and a study's in-memory candidate against mergekit-yaml: names, shapes, dtypes, values
    within 1 ulp; the written model loads in transformers."""
    a, b, c = moe[arch]
    mk, us = both(tmp_path, MERGES[merge].format(a=a, b=b, c=c))
    ours = load_folder(us)
    assert_within_one_ulp(ours, load_folder(mk))
    merger = Merger(MergePlan(load_config(tmp_path / "config.yml")))
    live = merger.new_model()
    merger.build_into(live)
    state = live.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name
    written = transformers.AutoModelForCausalLM.from_pretrained(us).state_dict()
    for name, tensor in written.items():
        assert torch.equal(tensor, ours[name]), name


def test_moe_passthrough_stacks_layers(tmp_path, moe):
    """A frankenmerge of MoE models: layers renumbered, experts kept stacked, the model loads."""
    a, b, _ = moe["mixtral"]
    config = tmp_path / "config.yml"
    config.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n    - model: {a}\n      layer_range: [0, 2]\n"
                      f"  - sources:\n    - model: {b}\n      layer_range: [1, 3]\n")
    result = run_cli("merge", str(config), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4
    source = transformers.AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert torch.equal(model.state_dict()["model.layers.3.mlp.experts.gate_up_proj"],
                       source["model.layers.2.mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_moe_randomised_merges_build_and_load(tmp_path, moe, method):
    """DELLA ranks along dim 1 of a stacked (experts, rows, columns) tensor as mergekit does; search
    merge and the in-memory candidate draw the same masks. mergekit draws the stacked tensors first,
    in an order its task graph sets (README), so whole-model masks are not compared with its own."""
    a, b, c = moe["mixtral"]
    config = tmp_path / "config.yml"
    epsilon = ", epsilon: 0.1" if method == "della" else ""
    config.write_text(f"merge_method: {method}\ndtype: bfloat16\nbase_model: {a}\n"
                      f"parameters: {{density: 0.5, weight: 0.6{epsilon}}}\n"
                      f"models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n")
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--random-seed", "7")
    assert result.returncode == 0, result.stderr
    assert "expert tensors are stacked" in " ".join(result.stderr.split())  # says the masks are not mergekit's
    written = load_folder(tmp_path / "out")
    merger = Merger(MergePlan(load_config(config)), seed=7)
    live = merger.new_model()
    merger.build_into(live)
    state = live.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert torch.equal(loaded["model.layers.1.mlp.experts.down_proj"], written["model.layers.1.mlp.experts.down_proj"])


@pytest.mark.parametrize("shape", [(3, 32, 64), (2, 5, 7, 3), (40,), (8, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_della_prunes_stacked_tensors_as_mergekit(shape, dtype):
    """DELLA's magnitude ranks of a tensor with more than two dims: bit for bit mergekit's, same draws."""
    from mergekit.sparsify import RescaleNorm
    from mergekit.sparsify import della_magprune as theirs

    from merge_core.methods.sparsify import della_magprune as ours

    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for rescale in (False, True):
        torch.manual_seed(3)
        expected = theirs(delta, 0.5, 0.1, RescaleNorm.l1 if rescale else None)
        got = ours(delta, 0.5, 0.1, rescale, torch.Generator().manual_seed(3))
        assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def mixed_layers(tmp_path_factory) -> list:
    """Qwen2-MoE models whose layer 0 is dense (`mlp_only_layers`), the others mixture-of-experts."""
    root = tmp_path_factory.mktemp("mixed")
    return [build_tiny_model(root / f"m{seed}", "qwen2_moe", seed=seed, layers=3, extra={"mlp_only_layers": [0]})
            for seed in (1, 2, 3)]


def test_layers_of_different_kinds_merge_each_as_they_are(tmp_path, mixed_layers):
    """Each output layer holds the tensors of the layers it is made from (a dense MLP at layer 0, stacked
    experts after): every tensor is mergekit's linear arithmetic on the three models' tensors, the written
    model loads, and the in-memory candidate equals it. (mergekit 0.1.5 has no oracle here: its
    architecture templates give every layer the same tensors.)"""
    a, b, c = mixed_layers
    config = tmp_path / "config.yml"
    models = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in ((a, 0.5), (b, 0.3), (c, 0.2)))
    config.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}")
    result = run_cli("merge", str(config), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    states = [transformers.AutoModelForCausalLM.from_pretrained(m).state_dict() for m in mixed_layers]
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert sorted(written) == sorted(states[0])
    assert "model.layers.0.mlp.gate_proj.weight" in written and "model.layers.1.mlp.experts.gate_up_proj" in written
    weights = torch.tensor([0.5, 0.3, 0.2])
    for name, tensor in written.items():
        expected = torch.zeros_like(tensor)  # mergekit 0.1.5's linear: adds in model order, one division
        for state, weight in zip(states, weights, strict=True):
            expected.addcmul_(state[name], weight)
        expected.div_(weights.sum())
        assert torch.equal(tensor, expected), name
    merger = Merger(MergePlan(load_config(config)))
    live = merger.new_model()
    merger.build_into(live)
    assert all(torch.equal(t, written[n]) for n, t in live.state_dict().items())


def test_layers_of_different_kinds_stay_at_their_index(tmp_path, mixed_layers):
    """A passthrough that keeps each layer at its index works; one that moves the dense layer to an
    expert layer's index (which config.json could not describe) is refused in one line, nothing written;
    a slerp that pairs a dense layer with an expert layer too."""
    a, b, _ = mixed_layers
    config = tmp_path / "config.yml"
    kept = (f"merge_method: passthrough\nslices:\n  - sources:\n    - model: {a}\n      layer_range: [0, 2]\n"
            f"  - sources:\n    - model: {b}\n      layer_range: [2, 3]\n")
    config.write_text(kept)
    result = run_cli("merge", str(config), str(tmp_path / "kept"))
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "kept")
    source = transformers.AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert torch.equal(model.state_dict()["model.layers.2.mlp.experts.gate_up_proj"],
                       source["model.layers.2.mlp.experts.gate_up_proj"])
    for name, text in {
        "moved": kept.replace("[2, 3]", "[0, 1]"),
        "paired": f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
                  f"    - model: {a}\n      layer_range: [0, 2]\n    - model: {b}\n      layer_range: [1, 3]\n",
    }.items():
        config.write_text(text)
        result = run_cli("merge", str(config), str(tmp_path / name))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "differ" in result.stderr, result.stderr
        assert not (tmp_path / name).exists()

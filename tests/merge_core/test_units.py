"""Gradient rule, filters, layer names and model references."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from merge_core.config import parse_config, t_setting
from merge_core.errors import MergeInputError
from merge_core.gradient import FilterValue, evaluate, interpolate, position
from merge_core.layers import layer_count, layer_index, with_layer
from merge_core.refs import ModelRef, resolve


@pytest.mark.parametrize("anchors", [[0.3], [0, 1], [0, 0.5, 0.3, 0.7, 1], [1, 0.2, 0.9, 0.1, 0.5, 0.4, 0.8]])
def test_gradient_equals_numpy_interp(anchors):
    for count in (1, 2, 5, 32):
        for i in range(count):
            p = position(i, count)
            expected = np.interp(p, np.linspace(0, 1, len(anchors)), anchors)
            assert interpolate(anchors, p) == pytest.approx(expected, abs=1e-12)


def test_position_single_layer_is_one():
    assert position(0, 1) == 1.0
    assert position(31, 32) == 1.0 and position(0, 32) == 0.0


def test_first_matching_filter_wins():
    setting = [FilterValue(0.9, "q_proj"), FilterValue((0.0, 1.0), "self_attn"), FilterValue(0.5)]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.9
    assert evaluate(setting, "model.layers.3.self_attn.k_proj.weight", 0.25) == 0.25
    assert evaluate(setting, "model.embed_tokens.weight", 0.0) == 0.5
    assert evaluate([FilterValue(0.1, "mlp")], "model.norm.weight", 0.0) is None
    assert evaluate([FilterValue(0.1, "*")], "model.norm.weight", 0.0) == 0.1


def test_config_t_forms():
    base = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}
    single = parse_config(base | {"parameters": {"t": {"filter": "mlp", "value": [0, 1]}}})
    assert t_setting(single.parameters["t"]) == (FilterValue((0.0, 1.0), "mlp"),)
    assert t_setting(parse_config(base | {"parameters": {"t": [0, 1]}}).parameters["t"]) == (0, 1)
    # Whether base_model and t are right depends on the method: the plan checks them against the
    # method registry (tests/merge_core/test_methods_bad_input.py), not the parser.
    with pytest.raises(MergeInputError, match="models"):
        parse_config(base | {"models": None})


def test_yaml_round_trip():
    data = {"slices": [{"sources": [{"model": "a", "layer_range": [0, 32]}, {"model": "b", "layer_range": [0, 32]}]}],
            "merge_method": "slerp", "base_model": "a",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
            "dtype": "bfloat16"}
    import yaml
    config = parse_config(data)
    assert parse_config(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("name,index", [
    ("model.layers.12.self_attn.q_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.bias", 0), ("blocks.7.ffn.weight", 7),
    ("model.embed_tokens.weight", None), ("lm_head.weight", None), ("model.final_layernorm.weight", None),
])
def test_layer_index(name, index):
    assert layer_index(name) == index
    if index is not None:
        assert layer_index(with_layer(name, 40)) == 40


def test_layer_count_keys():
    assert layer_count({"num_hidden_layers": 32}) == 32
    assert layer_count({"n_layer": 12}) == 12
    assert layer_count({"text_config": {"num_hidden_layers": 4}}) == 4


def test_model_ref_parsing():
    assert ModelRef.parse("org/name@v1.0") == ModelRef("org/name", "v1.0")
    assert ModelRef.parse("org/name") == ModelRef("org/name")
    assert str(ModelRef.parse("org/name@abc")) == "org/name@abc"


def test_hub_id_resolves_from_local_cache(tmp_path, tiny_models, monkeypatch):
    """A Hub id is looked up through huggingface_hub's cache layout, offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--phi" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_models["phi_a"], snapshot)
    (cache / "models--tiny--phi" / "refs").mkdir()
    (cache / "models--tiny--phi" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert resolve("tiny/phi") == snapshot
    assert resolve(f"tiny/phi@{snapshot.name}") == snapshot
    with pytest.raises(MergeInputError, match="not in the local Hugging Face cache"):
        resolve("tiny/absent")

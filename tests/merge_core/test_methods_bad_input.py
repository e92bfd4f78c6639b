"""`search merge` on configs a method cannot take: exit 2, one line, no OUT_DIR left behind."""

from __future__ import annotations

import pytest

from tests.conftest import build_tiny_model, run_cli
from tests.merge_core.test_merge_bad_input import assert_refused, write_config


def three(f, **per_model) -> list[dict]:
    """The three children of a family, each with the given per-model parameters."""
    return [{"model": str(f[f"child_{i}"]), "parameters": {k: v[i - 1] for k, v in per_model.items()}}
            for i in (1, 2, 3)]


def bad_configs(f, wide) -> list[tuple[str, dict, tuple[str, ...]]]:
    base = str(f["base"])
    return [
        ("linear without weight", {"merge_method": "linear", "models": [{"model": str(f["child_1"])},
                                                                       {"model": str(f["child_2"])}]},
         ("parameters.weight", "required by linear")),
        ("della density +/- epsilon", {"merge_method": "della", "base_model": base,
                                       "models": three(f, weight=[1, 1, 1], density=[0.9, 0.5, 0.5])},
         ("density 0.9", "epsilon 0.15", "(0, 1)", f"{f['child_1']}: ")),
        ("ties without base", {"merge_method": "ties", "models": three(f, weight=[1, 1, 1])},
         ("ties", "needs a base_model")),
        ("misspelt parameter", {"merge_method": "ties", "base_model": base,
                                "models": three(f, weight=[1, 1, 1], densty=[0.5, 0.5, 0.5])},
         ("models.0.parameters.densty", "did you mean 'density'")),
        ("global misspelt", {"merge_method": "linear", "models": three(f, weight=[1, 1, 1]),
                             "parameters": {"normalise": True}}, ("parameters.normalise", "'normalize'")),
        ("bool given a number", {"merge_method": "ties", "base_model": base, "models": three(f, weight=[1, 1, 1]),
                                 "parameters": {"normalize": 0.5}}, ("parameters.normalize", "true or false")),
        ("weight given text", {"merge_method": "linear", "models": three(f, weight=["heavy", 1, 1])},
         ("parameters.weight", "must be a number")),
        ("slerp of three", {"merge_method": "slerp", "base_model": str(f["child_1"]), "models": three(f),
                            "parameters": {"t": 0.5}}, ("slerp", "exactly 2 models")),
        ("model_stock of two", {"merge_method": "model_stock", "base_model": base,
                                "models": [{"model": str(f["child_1"])}]}, ("model_stock", "at least 3")),
        ("base not in slice", {"merge_method": "ties", "base_model": base, "slices": [{"sources": [
            {"model": str(f["child_1"]), "layer_range": [0, 4]}, {"model": str(f["child_2"]), "layer_range": [0, 4]}],
            "parameters": {"weight": 1.0}}]}, ("base_model", "is not among the merged models")),
        ("different shapes", {"merge_method": "task_arithmetic", "base_model": base,
                              "models": three(f, weight=[1, 1, 1])[:2] + [{"model": str(wide),
                                                                           "parameters": {"weight": 1}}]},
         ("hidden_size differs", str(wide))),
        ("dare density below 0", {"merge_method": "dare_ties", "base_model": base,
                                  "models": three(f, weight=[1, 1, 1], density=[0.5, -0.1, 0.5])},
         ("density -0.1 is negative", "from 0 to 1", f"{f['child_2']}: ")),
        ("empty weight list", {"merge_method": "linear", "models": three(f, weight=[[], 1, 1])},
         ("models.0.parameters", "weight is an empty list", "gradient like [0.2, 0.8]")),
        # mergekit divides by the sum and writes NaN (0/0) or infinite tensors
        ("linear weights summing to 0", {"merge_method": "linear", "models": three(f, weight=[0.5, -0.25, -0.25])},
         ("weights (0.5, -0.25, -0.25) sum to 0", "normalize: false")),
        ("linear weights 0 in one layer only", {"merge_method": "linear", "models": three(
            f, weight=[[1, 0], [1, 0], [1, 0]])}, ("model.layers.3.", "weights (0, 0, 0) sum to 0")),
        ("multislerp weights summing to 0", {"merge_method": "multislerp", "models": three(f, weight=[1, -1, 0])},
         ("weights (1, -1, 0) sum to 0", "normalize_weights: false")),
        # mergekit merges the tensors after the layers from the last slice's first sources, one per source of
        # the first slice: here child_1 and child_2, without the base (mergekit: "Base input is not present")
        ("base cut from the tensors after the layers", {"merge_method": "task_arithmetic", "base_model": base,
         "slices": [{"sources": [{"model": str(f["child_1"]), "layer_range": [0, 2], "parameters": {"weight": 1}},
                                 {"model": base, "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(f["child_1"]), "layer_range": [2, 4], "parameters": {"weight": 1}},
                                 {"model": str(f["child_2"]), "layer_range": [2, 4], "parameters": {"weight": 1}},
                                 {"model": base, "layer_range": [2, 4]}]}]},
         ("tensors after the layers", "first 2 sources", f"base_model {base} is not among the merged models")),
        ("multislerp base cut from the tensors after the layers", {
            "merge_method": "multislerp", "base_model": base, "parameters": {"weight": 1},
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                    {"model": str(f["child_1"]), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(f["child_1"]), "layer_range": [2, 4]},
                                    {"model": str(f["child_2"]), "layer_range": [2, 4]},
                                    {"model": base, "layer_range": [2, 4]}]}]},
         ("tensors after the layers", f"base_model {base} is not among the merged models")),
        # mergekit sums multislerp's weights in the tensors' dtype: 1 - 0.9999 is 0 in float16
        ("multislerp weights summing to 0 in float16", {"merge_method": "multislerp", "dtype": "float16",
                                                        "models": three(f, weight=[1, -0.9999, 0])},
         ("weights (1, -0.9999, 0) sum to 0",)),
    ]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "wide", "phi", seed=3, hidden=64)


@pytest.mark.parametrize("index", range(19))
def test_refused(families, wide, tmp_path, index):
    name, config, needles = bad_configs(families["phi"], wide)[index]
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), *needles, out=out)


def test_a_zero_weight_sum_does_not_hide_another_error(families):
    """Weights summing to 0 for some tensors are one degenerate point (a study's range check skips it);
    a missing parameter elsewhere in the same config is still the error reported."""
    from merge_core.config import parse_config
    from merge_core.errors import DegeneratePoint, MergeInputError
    from merge_core.merger import MergePlan

    f = families["phi"]
    models = [{"model": str(f[f"child_{i}"]), "parameters": {"weight": [0, 1]}} for i in (1, 2)]
    plan = MergePlan(parse_config({"merge_method": "linear", "models": [
        {"model": str(f["child_1"]), "parameters": {"weight": [1, 1]}}, models[1]]}))
    degenerate = parse_config({"merge_method": "linear", "models": models})
    with pytest.raises(DegeneratePoint, match="sum to 0"):
        plan.values(degenerate)
    # lm_head, merged first, sums to 0; the tensors after it have no weight for child_2
    models[0]["parameters"]["weight"] = 0
    models[1]["parameters"]["weight"] = [{"filter": "lm_head", "value": 0}]
    assert plan.outputs[0].name.startswith("lm_head")
    with pytest.raises(MergeInputError, match="no filter matches tensor") as raised:
        plan.values(parse_config({"merge_method": "linear", "models": models}))
    assert not isinstance(raised.value, DegeneratePoint)

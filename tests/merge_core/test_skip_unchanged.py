"""A study's merger leaves a live tensor alone when its values are those it last wrote there, and
the live model still equals a build from scratch: after a partial change of parameters, after an
in-place write by someone else, after a build that failed half way; randomised methods never skip."""

from __future__ import annotations

import pytest
import torch

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from tests.merge_core.test_oracle import PHIGMENT_T, config_for

OTHER_ATTN_T = [{"filter": "self_attn", "value": [1, 0.2, 0.6]}, *PHIGMENT_T[1:]]


def _slerp(tiny_models, t):
    return parse_config(config_for(tiny_models["phi_a"], tiny_models["phi_b"], "one_slice", t, "float16"))


def _assert_built(model, merger, candidate) -> None:
    """The live model holds exactly what a fresh build of `candidate` gives."""
    expected = dict(merger.tensors(candidate))
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name].view(torch.int16), tensor.view(torch.int16)), name


def test_only_the_outputs_whose_values_changed_are_merged(tiny_models):
    first, second = _slerp(tiny_models, PHIGMENT_T), _slerp(tiny_models, OTHER_ATTN_T)
    merger = Merger(MergePlan(first))
    model = merger.new_model()
    outputs = len(merger.plan.outputs)
    attn = sum("self_attn" in out.name for out in merger.plan.outputs)
    assert 0 < attn < outputs

    assert merger.build_into(model, first) == outputs
    assert merger.build_into(model, first) == 0  # the same candidate again: nothing to do
    assert merger.build_into(model, second) == attn
    _assert_built(model, merger, second)
    assert merger.build_into(model, first) == attn
    _assert_built(model, merger, first)


def test_without_skipping_every_output_is_merged(tiny_models):
    first = _slerp(tiny_models, PHIGMENT_T)
    merger = Merger(MergePlan(first), skip_unchanged=False)
    model = merger.new_model()
    outputs = len(merger.plan.outputs)
    assert merger.build_into(model, first) == outputs
    assert merger.build_into(model, first) == outputs


def test_a_tensor_changed_in_place_is_merged_again(tiny_models):
    first = _slerp(tiny_models, PHIGMENT_T)
    merger = Merger(MergePlan(first))
    model = merger.new_model()
    merger.build_into(model, first)
    name = "model.layers.1.mlp.fc1.weight"
    with torch.no_grad():
        model.get_parameter(name).mul_(3)
    assert merger.build_into(model, first) == 1
    _assert_built(model, merger, first)
    # a state dict loaded into the model (copy_ into every tensor) puts every output back in line
    model.load_state_dict({n: torch.zeros_like(t) for n, t in model.state_dict().items()})
    assert merger.build_into(model, first) == len(merger.plan.outputs)
    _assert_built(model, merger, first)


def test_a_parameter_given_new_storage_is_written_there(tiny_models):
    first = _slerp(tiny_models, PHIGMENT_T)
    merger = Merger(MergePlan(first))
    model = merger.new_model()
    merger.build_into(model, first)
    param = model.get_parameter("model.final_layernorm.weight")
    param.data = torch.zeros_like(param)  # what a dtype or device move does to every parameter
    assert merger.build_into(model, first) == len(merger.plan.outputs)
    _assert_built(model, merger, first)
    assert merger.build_into(model, first) == 0


def test_a_new_live_model_is_built_in_full(tiny_models):
    first = _slerp(tiny_models, PHIGMENT_T)
    merger = Merger(MergePlan(first))
    merger.build_into(merger.new_model(), first)
    other = merger.new_model()
    assert merger.build_into(other, first) == len(merger.plan.outputs)
    _assert_built(other, merger, first)


def test_a_build_that_fails_half_way_leaves_no_stale_record(tiny_models, monkeypatch):
    first, second = _slerp(tiny_models, PHIGMENT_T), _slerp(tiny_models, OTHER_ATTN_T)
    merger = Merger(MergePlan(first))
    model = merger.new_model()
    merger.build_into(model, first)
    method = merger.plan.method
    real_merge = method.merge
    failing = "model.layers.2.self_attn.q_proj.weight"
    target = model.get_parameter(failing)

    def merge_then_fail(out, inputs, state, values, rng):
        if out.data_ptr() == target.data_ptr():
            out.data.fill_(float("nan"))  # a write the version counter does not see, then an error
            raise RuntimeError("interrupted")
        real_merge(out, inputs, state, values, rng)

    monkeypatch.setattr(method, "merge", merge_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        merger.build_into(model, second)
    monkeypatch.setattr(method, "merge", real_merge)
    # back to the first candidate: the half-written tensor is merged again, not taken as unchanged
    merger.build_into(model, first)
    assert not torch.isnan(target).any()
    _assert_built(model, merger, first)


def test_randomised_methods_merge_every_output(families):
    f = families["llama"]
    config = parse_config({
        "merge_method": "dare_ties", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": str(f["base"])}] + [{"model": str(f[child]), "parameters": {"weight": 0.5, "density": 0.6}}
                                                for child in ("child_1", "child_2")],
    })
    merger = Merger(MergePlan(config), seed=3)
    assert not merger.skip_unchanged
    model = merger.new_model()
    outputs = len(merger.plan.outputs)
    assert merger.build_into(model, config) == outputs
    assert merger.build_into(model, config) == outputs
    expected = dict(Merger(MergePlan(config), seed=3).tensors(config))
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name

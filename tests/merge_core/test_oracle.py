"""Our SLERP against mergekit's on tiny real models: every tensor within 1 ulp."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from tests.conftest import run_cli

PHIGMENT_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
# Order matters: q_proj is also self_attn, and must take the first matching entry.
ORDERED_T = [
    {"filter": "self_attn.q_proj", "value": 0.9},
    {"filter": "self_attn", "value": [0.1, 0.8]},
    {"filter": "mlp", "value": [0.2, 0.9, 0.4]},
    {"value": [0.3, 0.6, 0.2, 0.8, 0.5, 0.7]},
]


def config_for(a: Path, b: Path, shape: str, t, dtype: str) -> dict:
    """A mergekit slerp config over models a (base) and b."""
    if shape == "models":
        body = {"models": [{"model": str(a)}, {"model": str(b)}]}
    elif shape == "one_slice":
        body = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 4]},
                                        {"model": str(b), "layer_range": [0, 4]}]}]}
    else:  # two slices, the second taking other layers of the other model and its own t
        body = {"slices": [
            {"sources": [{"model": str(b), "layer_range": [0, 2]}, {"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(a), "layer_range": [1, 4]}, {"model": str(b), "layer_range": [1, 4]}],
             "parameters": {"t": [{"filter": "mlp", "value": [1, 0]}]}},
        ]}
    return body | {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": t}, "dtype": dtype}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a merged model folder."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map a 16/32-bit float's bits to integers whose difference counts ulps, across zero too."""
    bits = x.view({2: torch.int16, 4: torch.int32}[x.element_size()]).long()
    sign_bit = 1 << (8 * x.element_size() - 1)
    return torch.where(bits < 0, -(bits + sign_bit), bits)


def assert_within_one_ulp(ours: dict, theirs: dict) -> None:
    """Same names, shapes and dtypes; values at most one ulp apart."""
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype), name
        ulps = (ordered_bits(got.contiguous()) - ordered_bits(expected.contiguous())).abs().max().item()
        assert ulps <= 1, f"{name}: {ulps} ulps from mergekit"


def mergekit_merge(config: dict, out: Path) -> Path:
    """The oracle: mergekit's own merge, run in process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, write_model_card=False))
    return out


CASES = [
    ("phi", "float16", "one_slice", PHIGMENT_T),
    ("phi", "bfloat16", "two_slices", ORDERED_T),
    ("phi", "float32", "models", [0, 1]),
    ("llama", "float16", "two_slices", ORDERED_T),
    ("llama", "bfloat16", "one_slice", PHIGMENT_T),
    ("llama", "float16", "models", 0.35),
    ("qwen2", "bfloat16", "one_slice", PHIGMENT_T),  # tied embeddings: no lm_head tensor of its own
]


@pytest.mark.parametrize("arch,dtype,shape,t", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_in_memory_and_cli_match_mergekit(tiny_models, tmp_path, arch, dtype, shape, t):
    config = config_for(tiny_models[f"{arch}_a"], tiny_models[f"{arch}_b"], shape, t, dtype)
    expected = load_folder(mergekit_merge(config, tmp_path / "mergekit"))

    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    assert_within_one_ulp(written, expected)

    merger = Merger(MergePlan(parse_config(config)))
    model = merger.new_model()
    merger.build_into(model)
    live = {n: p.detach() for n, p in model.state_dict().items() if n in written}
    assert sorted(live) == sorted(written)
    for name, tensor in written.items():
        assert torch.equal(live[name], tensor), f"{name}: in-memory candidate differs from the folder"


def test_lerp_branch_for_parallel_tensors(tiny_models, tmp_path):
    base = tiny_models["phi_a"]
    other = tmp_path / "phi_parallel"
    shutil.copytree(tiny_models["phi_b"], other)
    tensors = load_folder(other)
    base_tensors = load_folder(base)
    parallel = "model.layers.1.mlp.fc1.weight"
    tensors[parallel] = base_tensors[parallel] * 1.5  # dot of the normalised pair is 1
    for f in other.glob("*.safetensors*"):
        f.unlink()
    from safetensors.torch import save_file
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})

    config = config_for(base, other, "one_slice", PHIGMENT_T, "float16")
    merger = Merger(MergePlan(parse_config(config)))
    assert merger._geometry[parallel].linear
    assert not merger._geometry["model.layers.1.mlp.fc2.weight"].linear
    expected = load_folder(mergekit_merge(config, tmp_path / "mergekit"))
    assert_within_one_ulp(dict(merger.tensors()), expected)


def test_candidates_rebuild_in_place(tiny_models):
    """A live model rebuilt for t1 then t2 equals one built for t2 directly: no state leaks."""
    config = parse_config(config_for(tiny_models["phi_a"], tiny_models["phi_b"], "one_slice", PHIGMENT_T, "float16"))
    merger = Merger(MergePlan(config))
    model = merger.new_model()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    merger.build_into(model, 0.9)
    merger.build_into(model, [0.2, 0.4])
    direct = dict(merger.tensors([0.2, 0.4]))
    for name, param in model.state_dict().items():
        assert torch.equal(param, direct[name])
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}

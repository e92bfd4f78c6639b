"""nuslerp, multislerp, sce, karcher, nearswap and arcee_fusion against mergekit on fine-tune-like
families: `search merge` and the in-memory candidate within 1 ulp of `mergekit-yaml` (same
--random-seed), and bit-identical to each other. Kernel rows on tensors larger than the tiny
families' check the chunked passes and arcee_fusion's sampled quartiles."""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from merge_core.methods import arcee_fusion
from merge_core.methods import get as get_method
from merge_core.methods.base import Inputs, Values
from tests.conftest import run_cli
from tests.merge_core.test_methods_oracle import (
    MAGNITUDE,
    SEED,
    full_config,
    load_folder,
    mergekit_merge,
    models_form,
    source,
)
from tests.merge_core.test_oracle import ordered_bits

MLP_FIRST = [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]


def pair_form(f, weights=None, with_base=True, children=("child_1", "child_3"), **per_model):
    """`models:` over two children (and the base), each with its weight and extra parameters."""
    models = [{"model": str(f["base"])}] if with_base else []
    for i, name in enumerate(children):
        params = {} if weights == () else {"weight": (weights or [0.6, 0.4])[i]}
        params |= {k: v[i] for k, v in per_model.items()}
        models.append({"model": str(f[name])} | ({"parameters": params} if params else {}))
    return {"models": models}


def case(method, arch, dtype, body, parameters=None, base=True, extra=None):
    return (method, arch, dtype, body, parameters or {}, base, extra or {})


CASES = [
    # nuslerp: exactly two models besides the optional base; t = w_1 / (w_0 + w_1).
    case("nuslerp", "phi", "float16", lambda f: pair_form(f, [[1.0, 0.2], MLP_FIRST])),
    case("nuslerp", "llama", "bfloat16", lambda f: pair_form(f, [0.3, [0.9, 0.1]], with_base=False),
         {"nuslerp_flatten": False, "nuslerp_row_wise": True}, base=False),
    case("nuslerp", "llama", "float32", lambda f: pair_form(f, [0.5, [{"filter": "self_attn", "value": 0.9},
                                                                    {"value": 0.25}]]),
         {"nuslerp_flatten": False}),
    case("nuslerp", "phi", "float32", lambda f: pair_form(f, [0.7, 0.3], with_base=False),
         {"nuslerp_flatten": False, "nuslerp_row_wise": True}, base=False),
    case("nuslerp", "phi", "bfloat16", lambda f: {"slices": [
        {"sources": [source(f, "base", 0, 2), source(f, "child_1", 0, 2), source(f, "child_2", 0, 2)]},
        {"sources": [source(f, "child_1", 2, 4), source(f, "child_2", 2, 4), source(f, "child_3", 2, 4)],
         "base_model": str(f["child_1"])},
    ]}, {"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]}),
    # multislerp: any number of models besides the optional base.
    case("multislerp", "phi", "float16", lambda f: models_form(f, [[0.2, 0.8], 0.3, MLP_FIRST])),
    case("multislerp", "llama", "bfloat16", lambda f: models_form(f, with_base=False),
         {"normalize_weights": False}, base=False),
    case("multislerp", "llama", "float32", lambda f: models_form(f, [1.0, [0.5, 2.0], 0.7]), {"eps": 1e-6}),
    case("multislerp", "phi", "float32", lambda f: pair_form(f, with_base=False), base=False),
    # sce: global select_topk (variance top-k across models), int8_mask.
    case("sce", "phi", "float16", lambda f: models_form(f, ()),
         {"select_topk": [{"filter": "mlp", "value": [0.3, 0.9]}, {"filter": "self_attn", "value": 0.5},
                          {"value": 1.0}]}),
    case("sce", "llama", "float32", lambda f: models_form(f, ()), {"select_topk": 0.4, "int8_mask": True}),
    case("sce", "llama", "bfloat16", lambda f: models_form(f, ())),
    case("sce", "phi", "float32", lambda f: models_form(f, ()), {"select_topk": [0.2, 0.6]}),
    # karcher: no base (a base_model is one more input), equal weights.
    case("karcher", "phi", "float16", lambda f: models_form(f, (), with_base=False), base=False),
    case("karcher", "llama", "float32", lambda f: models_form(f, ()),
         {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 10}], "tol": [1e-3, 1e-6]}),
    case("karcher", "llama", "bfloat16", lambda f: pair_form(f, (), with_base=False), {"max_iter": 5}, base=False),
    # nearswap: base and one other model, t global.
    case("nearswap", "phi", "float16", lambda f: pair_form(f, (), children=("child_2",)),
         {"t": [{"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]}),
    case("nearswap", "llama", "bfloat16", lambda f: pair_form(f, (), children=("child_1",)), {"t": 0.02}),
    case("nearswap", "llama", "float32", lambda f: pair_form(f, (), children=("child_3",)), {"t": [0.0, 0.1]}),
    # arcee_fusion: base and one other model, no parameters. mergekit returns its float32 mask's
    # product for half inputs, so rows in half precision name out_dtype (see the test below).
    case("arcee_fusion", "phi", "float32", lambda f: pair_form(f, (), children=("child_1",))),
    case("arcee_fusion", "llama", "float16", lambda f: pair_form(f, (), children=("child_2",)),
         extra={"out_dtype": "float16"}),
    case("arcee_fusion", "phi", "bfloat16", lambda f: pair_form(f, (), children=("child_3",)),
         extra={"out_dtype": "bfloat16"}),
    # ram / ramplus_tl: a delta moved where |delta| > epsilon; ramplus_tl returns float32 for half
    # inputs (its scale is float32), so half rows name out_dtype as arcee_fusion's do.
    case("ram", "phi", "float16", lambda f: models_form(f, ()),
         {"epsilon": [{"filter": "mlp", "value": [0.01, 0.05]}, {"value": 0.03}]}),
    case("ram", "llama", "float32", lambda f: models_form(f, ())),
    case("ram", "llama", "bfloat16", lambda f: pair_form(f, ()), {"epsilon": 0.02}),
    case("ramplus_tl", "llama", "bfloat16", lambda f: models_form(f, ()), {"r": 0.05, "alpha": 1.0, "epsilon": 0.03},
         extra={"out_dtype": "bfloat16"}),
    case("ramplus_tl", "phi", "float32", lambda f: models_form(f, ()),
         {"epsilon": [0.02, 0.06], "r": [{"filter": "self_attn", "value": 0.5}, {"value": 0.2}]}),
    case("ramplus_tl", "phi", "float16", lambda f: pair_form(f, ()), {"epsilon": 0.025, "alpha": 0.5},
         extra={"out_dtype": "float16"}),
]
IDS = [f"{c[0]}-{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)]


def assert_matches(families, tmp_path, method, arch, dtype, body, parameters, base, extra):
    """mergekit-yaml vs search merge (<= 1 ulp) vs the in-memory candidate (bit-identical)."""
    config = full_config(families, method, arch, dtype, body, parameters, base) | extra
    expected = load_folder(mergekit_merge(config, tmp_path / "mergekit"))

    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"), "--random-seed", str(SEED))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    assert sorted(written) == sorted(expected)
    off = {}
    for name, theirs in expected.items():
        ours = written[name]
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype), name
        ulps = (ordered_bits(ours.contiguous()) - ordered_bits(theirs.contiguous())).abs()
        if int((ulps > 1).sum()):
            off[name] = (int((ulps > 1).sum()), ours.numel(), int(ulps.max()))
    if method in MAGNITUDE and dtype != "float32":
        # As in test_methods_oracle.py: only elements tied at the pruning threshold may differ.
        assert all(bad <= max(4, 0.02 * n) for bad, n, _ in off.values()), off
    else:
        assert not off, off

    merger = Merger(MergePlan(parse_config(config)), seed=SEED)
    model = merger.new_model()
    for _ in range(2):  # a second candidate with the same parameters gives the same tensors
        merger.build_into(model)
        live = {n: p.detach() for n, p in model.state_dict().items() if n in written}
        assert sorted(live) == sorted(written)
        for name, tensor in written.items():
            assert torch.equal(live[name], tensor), f"{name}: in-memory candidate differs from search merge"
    return written, expected


@pytest.mark.parametrize("method,arch,dtype,body,parameters,base,extra", CASES, ids=IDS)
def test_method_matches_mergekit(families, tmp_path, method, arch, dtype, body, parameters, base, extra):
    assert_matches(families, tmp_path, method, arch, dtype, body, parameters, base, extra)


@pytest.mark.parametrize("method,parameters", [("arcee_fusion", {}), ("ramplus_tl", {"epsilon": 0.03})])
def test_float32_result_of_half_merge_without_out_dtype(families, tmp_path, method, parameters):
    """Without out_dtype, mergekit writes the float32 tensor that arcee_fusion (float32 mask) and
    ramplus_tl (float32 scale) return even for a float16 merge; so do we (MergeMethod.float32_result).
    (This test first pinned a float16 output, a deviation since fixed.)"""
    f = families["phi"]
    config = {"merge_method": method, "dtype": "float16", "base_model": str(f["base"]),
              **pair_form(f, (), children=("child_2",))} | ({"parameters": parameters} if parameters else {})
    expected = load_folder(mergekit_merge(config, tmp_path / "mergekit"))
    assert {t.dtype for t in expected.values()} == {torch.float32}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    for name, theirs in expected.items():
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], theirs), name


# --- kernels on tensors larger than one chunk (and than arcee_fusion's quartile sample) ------------

def _mergekit_kernel(method: str, tensors, base: int | None, parameters: dict, seed: int | None = None):
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    if seed is not None:
        torch.manual_seed(seed)
    group = TensorGroup.from_tensors(tensors, base_index=base)
    (result,) = merge_methods.get(method)((group,), parameters=parameters)
    return result


def _ours(method: str, tensors, base: int | None, shared: dict, per_input: list[dict], out_dtype, seed=None):
    impl = get_method(method)
    inputs = Inputs(tuple(tensors), base, "kernel")
    state = impl.prepare(inputs)
    rng = torch.Generator().manual_seed(seed) if seed is not None else None
    out = torch.empty(tensors[0].shape, dtype=out_dtype)
    impl.merge(out, inputs, state, Values(shared, tuple(per_input)), rng)
    return out


def _family(shape, dtype, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [(base + torch.randn(shape, generator=g) * 0.02 * (i + 1)) for i in range(count)], g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernels_on_large_tensors(dtype):
    tensors, _ = _family((300, 700), dtype)
    tensors = [t.to(dtype) for t in tensors]
    base, a, b, c = tensors
    rows = [
        ("nearswap", [base, a], 0, {"t": 0.015}, [{}, {}]),
        ("nuslerp", [base, a, c], 0, {"nuslerp_row_wise": False, "nuslerp_flatten": True},
         [{}, {"weight": 0.3}, {"weight": 0.6}]),
        ("nuslerp", [a, b], None, {"nuslerp_row_wise": False, "nuslerp_flatten": True},
         [{"weight": 0.3}, {"weight": 0.6}]),
        ("arcee_fusion", [base, b], 0, {}, [{}, {}]),
        ("multislerp", [base, a, b, c], 0, {"normalize_weights": True, "eps": 1e-8},
         [{}, {"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]),
    ]
    for method, inputs, base_index, shared, per_input in rows:
        theirs = _mergekit_kernel(method, inputs, base_index,
                                  shared | _per_input_params(per_input, base_index))
        ours = _ours(method, inputs, base_index, shared, per_input, theirs.dtype)
        assert torch.equal(ours, theirs), method


def _per_input_params(per_input: list[dict], base: int | None) -> dict:
    names = {k for p in per_input for k in p}
    return {k: [p[k] for i, p in enumerate(per_input) if i != base] for k in names}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_arcee_fusion_sampled_quartiles(dtype):
    """Above 1M elements mergekit estimates the quartiles from a sample drawn on the global RNG;
    we draw the same indices from the candidate's generator seeded alike."""
    tensors, _ = _family((1100, 1000), dtype, count=1, seed=3)
    tensors = [t.to(dtype) for t in tensors]
    theirs = _mergekit_kernel("arcee_fusion", tensors, 0, {}, seed=SEED)
    ours = _ours("arcee_fusion", tensors, 0, {}, [{}, {}], theirs.dtype, seed=SEED)
    assert torch.equal(ours, theirs)
    # The candidate's generator is what drew the sample (the global RNG is left alone).
    rng = torch.Generator().manual_seed(SEED)
    fresh = rng.get_state()
    global_state = torch.get_rng_state()
    arcee_fusion._mask(tensors[1], tensors[0], rng)
    drawn = {SEED: rng.get_state()}
    assert not torch.equal(drawn[SEED], fresh)
    assert torch.equal(torch.get_rng_state(), global_state)
    drawn[SEED + 1] = torch.Generator().manual_seed(SEED + 1)
    arcee_fusion._mask(tensors[1], tensors[0], drawn[SEED + 1])
    drawn[SEED + 1] = drawn[SEED + 1].get_state()

    # Candidates reuse the mask drawn under the same generator state, redraw under another, and
    # leave their generator exactly where a fresh draw would.
    impl = get_method("arcee_fusion")
    inputs = Inputs(tuple(tensors), 0, "kernel")
    state = impl.prepare(inputs)
    for seed in (SEED, SEED, SEED + 1, SEED):
        rng = torch.Generator().manual_seed(seed)
        out = torch.empty(tensors[0].shape, dtype=theirs.dtype)
        impl.merge(out, inputs, state, Values(), rng)
        assert torch.equal(rng.get_state(), drawn[seed])
        if seed == SEED:
            assert torch.equal(out, theirs)


def test_int_parameter_refused(families, tmp_path):
    """karcher's max_iter is an int for mergekit: a fraction is a one-line error, exit 2."""
    f = families["llama"]
    config = {"merge_method": "karcher", "dtype": "float32", **models_form(f, (), with_base=False),
              "parameters": {"max_iter": 2.5}}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "max_iter" in result.stderr


def test_nuslerp_needs_two_models_besides_the_base(families, tmp_path):
    f = families["phi"]
    config = {"merge_method": "nuslerp", "dtype": "float16", "base_model": str(f["base"]), **models_form(f)}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "exactly 2 models besides the base" in line, line

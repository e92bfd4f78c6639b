"""The fused C passes (merge_core/native.py) against the eager torch passes they replace.

The eager passes are checked against mergekit by the oracle tests; here every native pass must give
their bits (NaN payloads aside) on fine-tune-like data, at sizes with and without a partial last
step, in every dtype, split across threads or not; a pass that does not is never used.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from merge_core import native, slerp
from merge_core.methods import karcher, linear, multislerp, nearswap, nuslerp, sce
from merge_core.methods.base import Inputs, Values
from merge_core.methods.task_arithmetic import TaskArithmetic

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SIZES = [1, 7, 8, 9, 4099, (1 << 20) + 13]  # the last is split between threads

pytestmark = pytest.mark.skipif(not native.enabled() and not os.environ.get("CI"),
                                reason="no C compiler or no AVX2/FMA/F16C here: the eager passes run")


def test_native_passes_are_built_in_ci():
    # CI installs a compiler on an x86-64 machine: the native passes must be what the tests run there.
    assert native.enabled()


def _family(numel: int, dtype: torch.dtype, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator) * 0.02
    tensors = [base.to(dtype)]
    for _ in range(count - 1):
        tensors.append((base + torch.randn(numel, generator=generator) * 0.002).to(dtype))
    if count > 1:
        tensors[1][: numel // 50] = tensors[0][: numel // 50]  # equal to the base: zero deltas
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    differ = (_bits(got) != _bits(expected)).sum().item()
    assert differ == 0, f"{differ} of {got.numel()} elements differ"


@pytest.fixture(params=[1, 2])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(dtype, numel, normalize, threads):
    tensors = _family(numel, dtype, 3)
    weights = torch.tensor([0.6, 0.25, -0.35])
    values = Values({"normalize": normalize}, tuple({"weight": w} for w in weights.tolist()))
    got = torch.empty_like(tensors[0])
    linear.Linear().merge(got, Inputs(tuple(tensors)), None, values, None)
    expected = torch.empty_like(got)
    linear._eager_pass(expected, tensors, weights, normalize)
    assert linear._native_variant(got, tensors) is not None
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_weights_summing_to_zero(dtype):
    # normalize divides by the sum even when it is 0, as mergekit does: inf and nan, not a guess
    tensors = _family(4099, dtype, 2)
    weights = torch.tensor([0.5, -0.5])
    values = Values({"normalize": True}, ({"weight": 0.5}, {"weight": -0.5}))
    got, expected = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    linear.Linear().merge(got, Inputs(tuple(tensors)), None, values, None)
    linear._eager_pass(expected, tensors, weights, True)
    assert not torch.isfinite(expected).any()
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("numel", SIZES)
def test_slerp(dtype, numel, threads):
    v0, v1 = _family(numel, dtype, 2)
    s0, s1 = slerp.coefficients(slerp.geometry(v0, v1), 0.37)
    got, expected = torch.empty_like(v0), torch.empty_like(v0)
    slerp.slerp_into(got, v0, v1, s0, s1)
    slerp._eager_half_pass(expected, v0, v1, s0, s1)
    assert slerp._native_variant(got, v0, v1) is not None
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("children", [1, 2, 3])
@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (True, 0.65), (False, 1.5)])
def test_task_arithmetic(dtype, numel, children, normalize, lam, threads):
    tensors = _family(numel, dtype, children + 1)
    weights = [0.7, -0.3, 0.45][:children]
    per_input = ({},) + tuple({"weight": w, "density": 1.0} for w in weights)
    values = Values({"int8_mask": False, "normalize": normalize, "rescale": False, "lambda": lam}, per_input)
    inputs = Inputs(tuple(tensors), base=0)
    got, expected = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    method = TaskArithmetic()
    method.merge(got, inputs, None, values, None)
    method._merge(expected, inputs, None, values, None, allow_native=False)
    assert method._native_variant(got, inputs) is not None
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_flat(dtype, numel, with_base, threads):
    tensors = _family(numel, dtype, 3)
    if not with_base:
        tensors = tensors[1:]
    values = Values({"nuslerp_flatten": True, "nuslerp_row_wise": False},
                    ({},) * (len(tensors) - 2) + ({"weight": 0.4}, {"weight": 0.9}))
    inputs = Inputs(tuple(tensors), base=0 if with_base else None)
    method = nuslerp.NuSlerp()
    state = method.prepare(inputs)
    got = torch.empty_like(tensors[0])
    method.merge(got, inputs, state, values, None)
    colinear, theta, sin_theta = state["flat"]
    others = tensors[-2:]
    expected = torch.empty_like(got)
    nuslerp._eager_flat_pass(expected, others, tensors[0] if with_base else None, 0.9 / 1.3, bool(colinear.item()),
                             theta, sin_theta)
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_colinear_branch(dtype, with_base):
    # the branch for (anti)parallel inputs, (1 - t) * v0 + t * v1, on ordinary data
    tensors = _family(4099, dtype, 3)
    inputs = Inputs(tuple(tensors), base=0) if with_base else Inputs(tuple(tensors[1:]))
    first, second = inputs.non_base
    theta = torch.tensor([0.0], dtype=dtype)
    got, expected = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    nuslerp._flat_pass(got, inputs, first, second, 0.75, torch.tensor([True]), theta, torch.sin(theta))
    base = tensors[0] if with_base else None
    nuslerp._eager_flat_pass(expected, [inputs.tensors[first], inputs.tensors[second]], base, 0.75, True, theta,
                             torch.sin(theta))
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("t", [0.0, 0.0007, 0.5])
def test_nearswap(dtype, numel, t, threads):
    base, other = _family(numel, dtype, 2)
    inputs = Inputs((base, other), base=0)
    got, expected = torch.empty_like(base), torch.empty_like(base)
    nearswap.NearSwap().merge(got, inputs, None, Values({"t": t}, ({}, {})), None)
    nearswap._eager_pass(expected.view(-1), base, other, t)
    assert nearswap._native_variant(got, base, other) is not None
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("children", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(dtype, numel, children, with_base, threads):
    tensors = _family(numel, dtype, children + 1)
    inputs = Inputs(tuple(tensors), base=0) if with_base else Inputs(tuple(tensors[1:]))
    method = multislerp.MultiSlerp()
    norms = method.prepare(inputs)
    weights = torch.tensor([0.5, 0.2, 0.3][:children], dtype=dtype)
    weights = weights / weights.sum()
    got, expected = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    chosen = multislerp._chunked_pass(got, inputs, norms, weights, 1e-8)
    assert isinstance(chosen, multislerp._NativePass)
    assert chosen.run()
    assert multislerp._ChunkedPass(expected, inputs, norms, weights, 1e-8).run()
    _assert_same(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (3, 1e-3), (25, 1e-9)])
def test_karcher(dtype, numel, count, max_iter, tol, threads):
    tensors = _family(numel, dtype, count, seed=count)
    norms = karcher._norms(tensors)
    variant = karcher._native_variant(tensors, norms)
    assert variant is not None
    got = karcher._karcher_mean(tensors, norms, max_iter, tol, variant)
    _assert_same(got, karcher._karcher_mean(tensors, norms, max_iter, tol))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_karcher_far_apart_inputs_and_skipped_ones(dtype):
    # large steps (the probe's kind of inputs) and an input equal to the mean, which the iteration
    # skips (theta under tol): the pass then takes fewer units than there are inputs
    tensors, norms = karcher._probe(dtype, 4099)
    tensors = [*tensors, tensors[0].clone()]
    norms = karcher._norms(tensors)
    variant = karcher._native_variant(tensors, norms)
    for max_iter, tol in [(10, 1e-5), (4, 0.2), (1, 1e-5)]:
        got = karcher._karcher_mean(tensors, norms, max_iter, tol, variant)
        _assert_same(got, karcher._karcher_mean(tensors, norms, max_iter, tol))


def test_karcher_non_finite_inputs_run_the_eager_steps():
    tensors = _family(4099, torch.float16, 3)
    tensors[1][5] = float("inf")
    assert karcher._native_variant(tensors, karcher._norms(tensors)) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_karcher_probe_tells_the_variants_apart(dtype):
    # every wrong variant gives other bits on the probe in the half types (in float32 the rounding
    # of a float32 factor is no rounding, so only the division differs there)
    tensors, norms = karcher._probe(dtype, 8 * 131072 + 5)
    right = karcher._karcher_mean(tensors, norms, 4, 1e-5, native.KARCHER_VARIANTS[0])
    _assert_same(right, karcher._karcher_mean(tensors, norms, 4, 1e-5))
    for variant in native.KARCHER_VARIANTS[1:]:
        if dtype == torch.float32 and variant[0] == 0:
            continue
        wrong = karcher._karcher_mean(tensors, norms, 4, 1e-5, variant)
        assert not torch.equal(_bits(wrong), _bits(right)), variant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_probe_tells_the_variants_apart(dtype):
    # fused multiply-add or not: the two give other bits on the probe, so the check picks the right
    # one rather than the first
    probe = native._probe(dtype, 4)
    fused, rounded = torch.empty_like(probe[0]), torch.empty_like(probe[0])
    native.linear(1, fused, probe[:3], [0.3, -1.7, 0.55], 2.0)
    native.linear(0, rounded, probe[:3], [0.3, -1.7, 0.55], 2.0)
    assert not torch.equal(_bits(fused), _bits(rounded))


@pytest.mark.parametrize("numel", [27, 64, 1000, 4099])
def test_bfloat16_nan_patterns_follow_torch(numel):
    # torch's vector loop and its scalar loop over the last elements write different NaN patterns
    inf = torch.full((numel,), float("inf"), dtype=torch.bfloat16)
    expected = inf * 0.0
    got = torch.empty_like(expected)
    native.linear(1, got, [inf], [0.0], None)
    assert torch.equal(_bits(got), _bits(expected))


def test_a_pass_that_differs_is_not_used():
    tensors = _family(1000, torch.float16, 2)

    def run_eager(probe, into):
        slerp._eager_half_pass(into, probe[0], probe[1], 0.8, 0.3)

    def run_native_wrong(variant, probe, into):  # fused multiply-add where the eager pass rounds first
        native.linear(variant, into, probe[:2], [0.8, 0.3], None)

    key = ("test: slerp with the wrong variant", torch.float16)
    assert native.verified(key, [1], run_native_wrong, run_eager) is None
    assert native.verified(key, [0], run_native_wrong, run_eager) is None  # the answer is kept
    assert native.verified(("test: slerp", torch.float16), [1, 0], run_native_wrong, run_eager) == 0
    assert tensors  # the family builds at this size too


@pytest.mark.parametrize("env", [{"MERGE_SEARCH_NATIVE": "0"}, {"CC": "/nonexistent/cc"}])
def test_without_native_passes_the_eager_ones_run(env, tmp_path):
    # no compiler (or turned off): nothing native is used, and the merge gives the same bits
    script = (
        "import torch\n"
        "from merge_core import native\n"
        "from merge_core.methods.linear import Linear, _eager_pass\n"
        "from merge_core.methods.base import Inputs, Values\n"
        "assert not native.enabled()\n"
        "xs = [torch.randn(1000).half() for _ in range(2)]\n"
        "out, ref = torch.empty_like(xs[0]), torch.empty_like(xs[0])\n"
        "values = Values({'normalize': True}, ({'weight': 1.0}, {'weight': 2.0}))\n"
        "Linear().merge(out, Inputs(tuple(xs)), None, values, None)\n"
        "_eager_pass(ref, xs, torch.tensor([1.0, 2.0]), True)\n"
        "assert torch.equal(out, ref)\n"
    )
    environment = {**os.environ, "MERGE_SEARCH_CACHE": str(tmp_path), **env}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_a_cache_others_can_write_is_not_used(tmp_path):
    # a library in a folder anyone could write to is never loaded, nor built there
    shared = tmp_path / "native"
    shared.mkdir()
    shared.chmod(0o777)
    script = "from merge_core import native\nprint(native.enabled())\n"
    environment = {**os.environ, "MERGE_SEARCH_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(shared.iterdir())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("children", [1, 2, 3, 4])
def test_sce_without_selection(dtype, numel, children, threads):
    tensors = _family(numel, dtype, children + 1, seed=children)
    inputs = Inputs(tuple(tensors), base=0)
    state = sce.Sce().prepare(inputs)
    got, expected = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    assert sce._native_variant(got, tensors[0], tensors[1:]) is not None
    sce.Sce().merge(got, inputs, state, Values({"int8_mask": False, "select_topk": 1.0}, ({},) * len(tensors)), None)
    sce._merge_chunked(expected, inputs, state.weights)
    _assert_same(got, expected)


@pytest.mark.parametrize("children", [5, 8])
def test_sce_float32_with_many_children_runs_the_eager_pass(children):
    """torch sums more than four float32 rows in another order than the native pass: those run eager."""
    tensors = _family(1001, torch.float32, children + 1, seed=children)
    assert sce._native_variant(torch.empty_like(tensors[0]), tensors[0], tensors[1:]) is None
    assert sce._native_variant(torch.empty_like(tensors[0]).half(), tensors[0].half(),
                               [t.half() for t in tensors[1:]]) is not None

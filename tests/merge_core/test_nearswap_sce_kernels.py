"""nearswap and sce kernels bit for bit against mergekit's, on tensors larger than one chunk:
the chunked, preallocated candidate passes against mergekit's whole-tensor code, with signed zeros,
infinities and NaN (bit patterns compared, so a NaN's sign counts too), and edge parameter values."""

from __future__ import annotations

import pytest
import torch

from tests.merge_core.test_methods_more_oracle import _mergekit_kernel, _ours

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _bits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal dtypes and bit patterns (-0 and +0 differ)."""
    return ours.dtype == theirs.dtype and torch.equal(ours.view(BITS[ours.dtype]), theirs.view(BITS[theirs.dtype]))


def _pair(shape, dtype, seed: int = 1) -> list[torch.Tensor]:
    """A base and one child near it, with -0, +0, equal elements, infinities, a NaN and tiny deltas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    other = base + torch.randn(shape, generator=g) * 0.002
    fb, fo = base.view(-1), other.view(-1)
    fb[:10] = -0.0
    fo[:5] = -0.0
    fo[5:7] = 0.0
    fb[10] = float("inf")
    fo[11] = float("-inf")
    fb[12] = float("nan")
    fo[13], fb[13] = 1e-7, -1e-7
    fo[14:20] = fb[14:20]
    return [base.to(dtype), other.to(dtype)]


NEARSWAP_TS = [0.0, -0.0, 1e-4, 1e-6, 0.001, 0.02, 1.0, -1.0, 1e9, float("inf")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(27,), (600, 500), (300_001,)])
def test_nearswap_kernel(dtype, shape):
    tensors = _pair(shape, dtype)
    for t in NEARSWAP_TS:
        theirs = _mergekit_kernel("nearswap", tensors, 0, {"t": t})
        ours = _ours("nearswap", tensors, 0, {"t": t}, [{}, {}], theirs.dtype)
        assert _bits_equal(ours, theirs), t


def test_nearswap_into_another_dtype():
    """An output of another dtype gets mergekit's result cast to it."""
    tensors = _pair((300_001,), torch.float16)
    theirs = _mergekit_kernel("nearswap", tensors, 0, {"t": 0.001})
    ours = _ours("nearswap", tensors, 0, {"t": 0.001}, [{}, {}], torch.float32)
    assert _bits_equal(ours, theirs.float())


def _family(shape, dtype, children: int, seed: int = 0) -> list[torch.Tensor]:
    """A base and children that move part of its elements, with -0 where all are zero and -0
    children over a +0 base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    tensors = [base]
    for i in range(children):
        child = base + torch.randn(shape, generator=g) * 0.002 * (i + 1)
        keep = torch.rand(shape, generator=g) < 0.3
        child[keep] = base[keep]
        tensors.append(child)
    flat = [t.view(-1) for t in tensors]
    for t in flat:
        t[:8] = -0.0
    flat[0][8:12] = 0.0
    return [t.to(dtype) for t in tensors]


SCE_DEFAULTS = {"int8_mask": False, "select_topk": 1.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(27,), (600, 500), (300_001,)])
@pytest.mark.parametrize("children", [1, 2, 3])
def test_sce_kernel_without_selection(dtype, shape, children):
    tensors = _family(shape, dtype, children)
    for shared in (SCE_DEFAULTS, SCE_DEFAULTS | {"int8_mask": True}, SCE_DEFAULTS | {"select_topk": 1.5}):
        theirs = _mergekit_kernel("sce", tensors, 0, shared)
        ours = _ours("sce", tensors, 0, shared, [{} for _ in tensors], theirs.dtype)
        assert _bits_equal(ours, theirs), shared


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_kernel_edge_inputs(dtype):
    """Children equal to the base (equal shares), an infinite delta (NaN weights), and a base that
    is not the first input."""
    base, child = _family((300_001,), dtype, 1)
    for tensors, base_index in (([base, base.clone(), base.clone()], 0),
                                ([base, child, child.clone().fill_(float("inf"))], 0),
                                ([child, base, child.neg()], 1)):
        theirs = _mergekit_kernel("sce", tensors, base_index, SCE_DEFAULTS)
        ours = _ours("sce", tensors, base_index, SCE_DEFAULTS, [{} for _ in tensors], theirs.dtype)
        assert _bits_equal(ours, theirs), base_index


def test_sce_into_another_dtype():
    tensors = _family((300_001,), torch.float16, 2)
    theirs = _mergekit_kernel("sce", tensors, 0, SCE_DEFAULTS)
    ours = _ours("sce", tensors, 0, SCE_DEFAULTS, [{} for _ in tensors], torch.float32)
    assert _bits_equal(ours, theirs.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_selection_candidates_share_one_prepared_state(dtype):
    """A study prepares once and keeps |variance| from its first select_topk < 1 candidate: every later
    candidate (another select_topk, int8_mask, or no selection) is still mergekit's result bit for bit,
    equal variances at the cut included (half types have many)."""
    from merge_core.methods import get as get_method
    from merge_core.methods.base import Inputs, Values

    family = _family((300_001,), dtype, 3)
    infinite = [t.clone() for t in family]
    infinite[2].view(-1)[7::50_000] = float("inf")  # NaN weights once masked (inf * 0): mergekit's whole-tensor path
    impl = get_method("sce")
    for tensors in (family, infinite):
        inputs = Inputs(tuple(tensors), 0, "kernel")
        state = impl.prepare(inputs)
        for topk, int8 in ((0.3, False), (0.7, True), (1.0, False), (0.05, False), (0.0, False), (0.999, True)):
            shared = {"int8_mask": int8, "select_topk": topk}
            theirs = _mergekit_kernel("sce", tensors, 0, shared)
            ours = torch.empty_like(theirs)
            impl.merge(ours, inputs, state, Values(shared, tuple({} for _ in tensors)), None)
            assert _bits_equal(ours, theirs), shared
        assert state.variance is not None


@pytest.mark.parametrize("topk,count", [(0.49999999999999994, 2048), (0.49999999999999994, 4096)])
def test_sce_selection_count_is_mergekits_float32_product(topk, count):
    """k = int(count_nonzero(var) * select_topk) in float32, as mergekit's tensor product rounds it: a gradient
    gives a layer 0.49999999999999994, where Python's float64 product keeps one element fewer."""
    tensors = _family((count,), torch.float32, 2)
    shared = {"int8_mask": False, "select_topk": topk}
    theirs = _mergekit_kernel("sce", tensors, 0, shared)
    ours = _ours("sce", tensors, 0, shared, [{} for _ in tensors], torch.float32)
    assert _bits_equal(ours, theirs)

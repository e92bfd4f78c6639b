"""model_stock, ram and ramplus_tl kernels bit for bit against mergekit's, on tensors larger than one
chunk: the chunked candidate passes (t prepared once for model_stock; ram's masks from the deltas'
bits) against mergekit's whole-tensor code, signed zeros included, and the inputs that send a
tensor back to mergekit's own operations (infinite deltas)."""

from __future__ import annotations

import pytest
import torch

from tests.merge_core.test_methods_more_oracle import _mergekit_kernel, _ours

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _bits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal dtypes and bit patterns (-0 and +0 differ)."""
    return ours.dtype == theirs.dtype and torch.equal(ours.view(BITS[ours.dtype]), theirs.view(BITS[theirs.dtype]))


def _family(shape, dtype, children: int, seed: int = 0, spread: float = 0.002) -> list[torch.Tensor]:
    """A base and children that move part of its elements (some not at all, some by less than
    epsilon), with -0 where the base and every child are zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    tensors = [base]
    for i in range(children):
        child = base + torch.randn(shape, generator=g) * spread * (i + 1)
        keep = torch.rand(shape, generator=g) < 0.3
        child[keep] = base[keep]
        tiny = torch.rand(shape, generator=g) < 0.1
        child[tiny] = base[tiny] + 1e-6
        tensors.append(child)
    flat = [t.view(-1) for t in tensors]
    for t in flat:
        t[:64] = -0.0
    flat[0][64:96] = 0.0  # -0 children over a +0 base
    return [t.to(dtype) for t in tensors]


def _per_input(count: int) -> list[dict]:
    return [{} for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(600, 500), (300_001,)])
@pytest.mark.parametrize("children", [2, 3])
def test_model_stock_kernel(dtype, shape, children):
    tensors = _family(shape, dtype, children)
    for filter_wise in (False, True):
        theirs = _mergekit_kernel("model_stock", tensors, 0, {"filter_wise": filter_wise})
        ours = _ours("model_stock", tensors, 0, {"filter_wise": filter_wise}, _per_input(len(tensors)), theirs.dtype)
        assert _bits_equal(ours, theirs), filter_wise


# epsilon: mergekit's default, 0, one that rounds up to a representable value in half types, one
# between the deltas' scales, and a negative one (every delta moves, zeros included)
EPSILONS = [1e-5, 0.0, 1.0005e-5, 0.003, -1.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("children", [1, 2, 3])
def test_ram_kernel(dtype, children):
    tensors = _family((300_001,), dtype, children, seed=children)
    for epsilon in EPSILONS:
        theirs = _mergekit_kernel("ram", tensors, 0, {"epsilon": epsilon})
        ours = _ours("ram", tensors, 0, {"epsilon": epsilon}, _per_input(len(tensors)), theirs.dtype)
        assert _bits_equal(ours, theirs), epsilon


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("children", [1, 2, 3])
def test_ramplus_tl_kernel(dtype, children):
    tensors = _family((600, 500), dtype, children, seed=10 + children)
    # (r, alpha): the defaults, a scale above 1, and scales below 1 and of 0 (a product that rounds
    # to zero keeps its sign: mergekit's sum returns +0)
    for r, alpha in ((0.1, 0.2), (0.5, 1.0), (-0.5, 1.0), (1.0, -1.0)):
        for epsilon in EPSILONS:
            shared = {"r": r, "alpha": alpha, "epsilon": epsilon}
            theirs = _mergekit_kernel("ramplus_tl", tensors, 0, shared)
            ours = _ours("ramplus_tl", tensors, 0, shared, _per_input(len(tensors)), theirs.dtype)
            assert _bits_equal(ours, theirs), shared


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_infinite_deltas(method):
    """An infinite delta is NaN in mergekit's masked sums: such a tensor runs mergekit's operations."""
    tensors = _family((1000,), torch.float16, 2)
    tensors[1][5] = float("inf")
    tensors[2][7] = 60000.0
    tensors[0][7] = -60000.0  # the delta overflows float16
    shared = {"epsilon": 1e-5} | ({"r": 0.1, "alpha": 0.2} if method == "ramplus_tl" else {})
    theirs = _mergekit_kernel(method, tensors, 0, shared)
    ours = _ours(method, tensors, 0, shared, _per_input(3), theirs.dtype)
    assert torch.equal(ours.isnan(), theirs.isnan()) and theirs.isnan().any()
    assert torch.equal(ours.nan_to_num(0.0), theirs.nan_to_num(0.0))

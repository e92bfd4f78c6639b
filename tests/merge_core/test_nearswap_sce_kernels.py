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

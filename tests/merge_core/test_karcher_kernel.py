"""karcher's candidate pass bit for bit against mergekit's karcher merge: the iteration runs in buffers
allocated once per tensor (out= and in-place forms of mergekit's operations), so every branch of the
iteration (skipped inputs, early stops, zero inputs, non-finite values) must keep mergekit's bits."""

from __future__ import annotations

import pytest
import torch

from tests.merge_core.test_methods_more_oracle import _mergekit_kernel, _ours

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _bits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal dtypes and bit patterns, any NaN matching any NaN."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False
    same = ours.view(BITS[ours.dtype]) == theirs.view(BITS[theirs.dtype])
    return bool((same | (ours.isnan() & theirs.isnan())).all())


def _inputs(kind: str, dtype, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(257, 33, generator=g) * 0.02
    spread = {"fine_tunes": 0.002, "far": 0.05, "near_identical": 1e-6}.get(kind, 0.002)
    tensors = [base + torch.randn(base.shape, generator=g) * spread for _ in range(count)]
    if kind == "zero_input":
        tensors[1].zero_()
    elif kind == "identical":
        tensors[1] = tensors[0].clone()
    elif kind == "infinite":
        tensors[0][3, 4] = float("inf")
    elif kind == "opposite":
        tensors[1] = -tensors[0]
    return [t.to(dtype) for t in tensors]


KINDS = ["fine_tunes", "far", "near_identical", "zero_input", "identical", "infinite", "opposite"]
PARAMETERS = [(10, 1e-5), (3, 1e-3), (25, 1e-9), (0, 1e-5), (5, 0.5), (1, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_karcher_pass_matches_mergekit_bit_for_bit(dtype, kind):
    for count in (2, 3):
        tensors = _inputs(kind, dtype, count, seed=count)
        for max_iter, tol in PARAMETERS:
            parameters = {"max_iter": max_iter, "tol": tol}
            theirs = _mergekit_kernel("karcher", tensors, None, parameters)
            ours = _ours("karcher", tensors, None, parameters, [{}] * count, dtype)
            assert _bits_equal(ours, theirs), (count, max_iter, tol)

"""SLERP of one tensor pair against mergekit's own `slerp` function, bit for bit, at sizes that span
several of mergekit's 1M-element chunks: the cosine's order of operations shows in half-precision
outputs too (a float64 sum of the products left 0.3% of a float16 result 1-2 ulp off mergekit's)."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.slerp import slerp as mergekit_slerp

from merge_core import slerp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("spread", [0.02, 0.5, 3.0])  # fine-tune-like, apart, nearly orthogonal
@pytest.mark.parametrize("t", [0.3, 0.77])
def test_slerp_equals_mergekit_on_large_tensors(dtype, spread, t):
    generator = torch.Generator().manual_seed(int(spread * 100) + int(t * 10))
    v0 = torch.randn(1536, 2100, generator=generator)  # 3.2M elements: four of mergekit's chunks
    v1 = (v0 + spread * torch.randn(v0.shape, generator=generator)).to(dtype)
    v0 = v0.to(dtype)
    ours = slerp.slerp(t, v0, v1)
    theirs = mergekit_slerp(torch.tensor([t]), v0.unsqueeze(0), v1.unsqueeze(0))[0]
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs), int((ours != theirs).sum())

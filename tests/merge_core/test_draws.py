"""The torch facts the chunked DARE/DELLA and multislerp passes rely on to stay bit for bit mergekit's."""

from __future__ import annotations

import pytest
import torch

from merge_core.methods.draws import GeneratorStream, keep_thresholds
from merge_core.methods.multislerp import row_reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 623, 624, 625, 5000, 300_001])
def test_stream_draws_torch_bernoulli_masks(dtype, count):
    """numpy's twister from the torch generator's state keeps the elements torch.bernoulli keeps,
    and hands the generator back where torch.bernoulli leaves it (checked over three draws)."""
    theirs, ours = torch.Generator().manual_seed(count), torch.Generator().manual_seed(count)
    per_element = torch.rand(count, generator=torch.Generator().manual_seed(1)).to(dtype)
    for probabilities in (torch.full((count,), 0.37, dtype=dtype), per_element, torch.full((count,), 0.0, dtype=dtype)):
        expected = torch.bernoulli(probabilities, generator=theirs).bool()
        got = torch.empty(count, dtype=torch.bool)
        with GeneratorStream(ours) as stream:
            half = count // 2  # two calls continue one stream
            thresholds = keep_thresholds(probabilities)
            stream.draw_keep(thresholds[:half], got[:half].numpy())
            stream.draw_keep(thresholds[half:], got[half:].numpy())
        assert torch.equal(got, expected)
        assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_reduction_equals_stacked_rows(threads, dtype):
    """A row reduced on its own (two-row view) equals that row of mergekit's stacked reduction;
    a plain 1-D reduction may not (torch splits it across threads and rounds the partial sums)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stacked = (torch.randn(3, 1_000_003, generator=torch.Generator().manual_seed(0)) * 0.01).to(dtype)
        for reduce in (torch.sum, torch.norm):
            expected = reduce(stacked, dim=-1, keepdim=True)
            got = torch.stack([row_reduction(reduce, row) for row in stacked]).view(-1, 1)
            assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(previous)

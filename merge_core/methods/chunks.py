"""Helpers for per-candidate passes: element chunks that keep float32 scratch in cache."""

from __future__ import annotations

import torch

# 256K elements: 1 MB of float32 scratch per buffer, near the L2 size of CPUs and nothing on a GPU,
# and few enough chunks that per-call overhead stays small; elementwise results do not depend on it.
CHUNK_ELEMENTS = 256 * 1024

# the integer type of each float type's bit pattern: masks and comparisons on the bits are exact
BIT_TYPES = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def chunk_ranges(numel: int, size: int = CHUNK_ELEMENTS):
    """(start, stop) pairs covering range(numel)."""
    for start in range(0, numel, size):
        yield start, min(numel, start + size)


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: mergekit's precision for interpolations."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def half_row_sum(rows: torch.Tensor, out: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """rows.sum(dim=0) of a half (N, k) tensor, bit for bit, written into `out`.

    torch's sum over dim 0 of a half tensor adds the rows in float32 from +0 and rounds once: for
    two rows that is one half add (then + 0, which only turns -0 into +0), for more a float32
    accumulator (`acc`, k elements). It costs about 20x an add when called as a sum.
    """
    if len(rows) == 1:
        return torch.add(rows[0], 0.0, out=out)
    if len(rows) == 2:
        return torch.add(rows[0], rows[1], out=out).add_(0.0)
    acc = acc[: rows.shape[1]].copy_(rows[0])
    for row in rows[1:]:
        acc.add_(row)
    return out.copy_(acc.add_(0.0))

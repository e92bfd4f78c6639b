"""Helpers for per-candidate passes: element chunks that keep float32 scratch in cache."""

from __future__ import annotations

import torch

# 256K elements: 1 MB of float32 scratch per buffer, near the L2 size of CPUs and nothing on a GPU,
# and few enough chunks that per-call overhead stays small; elementwise results do not depend on it.
CHUNK_ELEMENTS = 256 * 1024


def chunk_ranges(numel: int, size: int = CHUNK_ELEMENTS):
    """(start, stop) pairs covering range(numel)."""
    for start in range(0, numel, size):
        yield start, min(numel, start + size)


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: mergekit's precision for interpolations."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32

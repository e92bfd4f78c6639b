"""release_free_heap: freed heap blocks leave the process's resident memory (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from merge_core.merger import release_free_heap


def anon_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def glibc() -> bool:
    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not glibc(), reason="malloc_trim is glibc's; elsewhere release_free_heap does nothing")
def test_freed_heap_blocks_are_returned():
    # 64 KiB blocks sit below glibc's mmap threshold: freed, they stay in the heap (and in RSS);
    # the last one stays alive so the heap's top cannot simply shrink.
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 250 MiB, touched
    keep = blocks[-1]
    del blocks
    before = anon_mib()
    release_free_heap()
    after = anon_mib()
    assert before - after > 150, (before, after)
    assert keep.sum().item() == 16 * 1024

"""isg.utils.trim_memory: freed heap pages under a live allocation go back to the OS (glibc)."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from isg.utils import heap_free_bytes, trim_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("mb", [60, 180])
def test_freed_heap_memory_below_a_live_block_is_returned_above_the_minimum(mb):
    """Freed heap below a live block stays (RSS unchanged) until trimmed; trim_memory returns it only when the
    heap holds at least ``min_free`` bytes of freed memory (default TRIM_MIN_FREE_BYTES), else it stays for reuse."""
    np.ones(3 << 20, np.uint8)  # one freed mmap'ed block raises glibc's mmap threshold: the next ones go to the heap
    blocks = [np.ones(3 << 20, np.uint8) for _ in range(mb // 3)]  # mb MB of heap, touched
    pin = np.ones(2 << 20, np.uint8)  # a live block above them: the heap's top cannot shrink
    before = _rss_mb()
    del blocks
    freed = _rss_mb()
    free = heap_free_bytes()  # this process's heap: the blocks and whatever earlier code left free
    assert free >= (mb - 3) << 20
    assert not trim_memory(min_free=free + (1 << 20))  # less free than asked: kept for reuse
    kept = _rss_mb()
    assert trim_memory(min_free=free)
    after = _rss_mb()
    assert abs(freed - kept) < 8 and before - kept < 0.3 * mb, (before, freed, kept)  # not returned until trimmed
    assert kept - after > 0.6 * mb, (before, freed, kept, after)  # then returned
    assert trim_memory(min_free=0)  # any amount on request
    del pin

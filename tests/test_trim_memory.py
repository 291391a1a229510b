"""isg.utils.trim_memory: freed heap pages under a live allocation go back to the OS (glibc)."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from isg.utils import trim_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_memory_below_a_live_block_is_returned():
    np.ones(3 << 20, np.uint8)  # one freed mmap'ed block raises glibc's mmap threshold: the next ones go to the heap
    blocks = [np.ones(3 << 20, np.uint8) for _ in range(60)]  # 180 MB of heap, touched
    pin = np.ones(2 << 20, np.uint8)  # a live block above them: the heap's top cannot shrink
    before = _rss_mb()
    del blocks
    freed = _rss_mb()
    assert trim_memory()
    after = _rss_mb()
    assert before - after > 100 and freed - after > 100, (before, freed, after)  # kept until trimmed, then returned
    del pin

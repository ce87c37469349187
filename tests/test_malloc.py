"""The heap trim after a full reconcile (daemon/malloc.py)."""

from __future__ import annotations

import platform

import pytest

from sessionsync.daemon import malloc


def _rss_anon_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_hands_freed_heap_pages_back_and_leaves_live_memory_alone() -> None:
    # Below glibc's mmap threshold, so from the heap; the last block pins the heap's top, so
    # free() alone cannot give the pages back: only a trim can.
    blocks = [bytearray(b"x" * 64 * 1024) for _ in range(512)]
    pin = bytearray(b"y" * 1024)
    before = _rss_anon_kib()
    del blocks
    assert malloc.trim()
    assert _rss_anon_kib() < before - 16 * 1024
    assert pin == b"y" * 1024

"""Tune glibc's allocator for a daemon that moves megabyte buffers all day.

Every large request allocates a buffer of up to a few MiB (a FUSE write arrives as one, a
read of several extents is joined into one). glibc serves such sizes by ``mmap`` until its
dynamic threshold rises, and gives freed memory at the top of the heap back to the kernel
once more than twice that threshold is free. Either way the next buffer is fresh memory, and
touching it costs a page fault per 4 KiB: measured, that tripled the time of a 1 MiB read of
a chain (docs/performance.md). Fixed thresholds keep such buffers in the heap and reuse
them. The memory kept this way is bounded by ``TRIM_THRESHOLD``; fewer arenas keep the I/O
threads from holding memory of their own.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: Buffers up to this size come from the heap (glibc's ``M_MMAP_THRESHOLD``).
MMAP_THRESHOLD = 4 << 20
#: Free memory kept at the top of the heap before it is returned (``M_TRIM_THRESHOLD``).
TRIM_THRESHOLD = 16 << 20
#: Arenas for the whole process (``M_ARENA_MAX``).
ARENA_MAX = 2

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Set the thresholds above; False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not done:
        log.debug("mallopt refused a setting; the allocator keeps its defaults")
    return done

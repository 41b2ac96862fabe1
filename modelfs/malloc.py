"""glibc malloc tuning for processes that allocate multi-MiB chunk buffers.

Each process chooses its own values (the daemon and the fetch workers differ, and
say why where they call :func:`tune`); this is the one place that talks to libc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune(*, mmap_threshold: int, arena_max: int, trim_threshold: int | None = None) -> None:
    """Fix glibc's mmap threshold (it is dynamic by default), cap its arenas, and
    optionally set the trim threshold. Best effort: no glibc, no change."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        if trim_threshold is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        libc.mallopt(M_ARENA_MAX, arena_max)
    except (OSError, AttributeError):
        pass


def trim() -> None:
    """Give freed heap memory back to the OS (``malloc_trim``). Best effort."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

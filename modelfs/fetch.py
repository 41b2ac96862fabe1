"""Serving file bytes to readers: from the cache's memory map, loading chunks first when needed.

The FUSE process does no per-byte work of its own: a read looks up the chunk
in the LMDB cache (:class:`~modelfs.cache.CacheView`), checks the 64 KiB blocks
it serves against their sums, and returns a memoryview into the map, which
pyfuse3 hands to the kernel. The OS page cache is the memory tier. A chunk that
is not in the cache is loaded by a :class:`ChunkSource` (in a mount: the fetch
worker processes of :mod:`modelfs.lanes`), which returns once it is committed.

Readahead follows the reader: sequential readers get a window of chunks loaded
ahead of them, and the loads of cached chunks page them in ahead of the reader
too (a worker re-checks them, which reads them).
"""

from __future__ import annotations

import logging
import math
import mmap
from typing import Protocol

from .cache import CacheView, DamagedEntry
from .errors import IntegrityError
from .lanes import FetchStats
from .manifest import FileEntry

log = logging.getLogger(__name__)

MiB = 1 << 20


class ChunkSource(Protocol):
    """Puts verified chunks into the cache. A mount's is :class:`modelfs.lanes.Lanes`;
    the in-process tests use a fake one."""

    stats: FetchStats
    generation: int  # bumped whenever a chunk becomes servable

    async def load(self, h: str, size: int, *, refetch: bool = False) -> None:
        """Return once chunk ``h`` is in the cache; raise ModelfsError if it cannot be."""

    def prefetch(self, h: str, size: int) -> None:
        """Start loading ``h`` for a reader that will want it soon."""

    def spilled(self, h: str) -> bytes | mmap.mmap | None:
        """Verified bytes of ``h`` that the cache could not store (a full disk), if held."""


class Fetcher:
    """Chunk bytes for readers: ``span`` of a file, from the cache, loading what is missing.

    Invariant: every byte returned was checked against the block sums taken when
    its chunk was verified with BLAKE3; a damaged entry is refetched once, then EIO.
    """

    def __init__(self, view: CacheView, source: ChunkSource, *, readahead_bytes: int = 64 * MiB,
                 readahead_trigger: int = 4 * MiB):
        self.view = view
        self.source = source
        self.readahead_bytes = readahead_bytes
        self.readahead_trigger = readahead_trigger  # sequential bytes before readahead starts

    @property
    def stats(self) -> FetchStats:
        return self.source.stats

    async def span(self, e: FileEntry, off: int, end: int) -> memoryview | bytes:
        """Bytes [off, end) of file ``e`` (0 < end - off; end ≤ size)."""
        first, last = e.chunk_index(off), e.chunk_index(end - 1)
        parts: list[tuple[str, int, int, int]] = []
        for i in range(first, last + 1):
            h, n = e.chunks[i]
            start = e.offsets[i]
            parts.append((h, n, max(off, start) - start, min(end, start + n) - start))
        for attempt in range(3):
            missing: list[tuple[str, int]] = []
            damaged: list[tuple[str, int]] = []
            views = []
            self.view.renew(self.source.generation)
            # no await from here until return: the views live as long as the transaction
            for h, n, lo, hi in parts:
                try:
                    v = self.view.get(h, n, lo, hi)
                except DamagedEntry as err:
                    log.warning("%s: refetching", err)
                    damaged.append((h, n))
                    continue
                if v is None and (spill := self.source.spilled(h)) is not None:
                    v = memoryview(spill)[lo:hi]
                if v is None:
                    missing.append((h, n))
                else:
                    views.append(v)
            if not missing and not damaged:
                self.stats.memory_hits += len(views)
                self.stats.bytes_served += end - off
                return views[0] if len(views) == 1 else b"".join(views)
            del views
            for h, n in missing:
                await self.source.load(h, n)
            for h, n in damaged:
                await self.source.load(h, n, refetch=True)
        raise IntegrityError(f"{e.path}@{off}: chunks still missing or damaged after refetching")


class Stream:
    """The read state of one open file: where it is, and how far ahead to load.

    Sequential readers (within 1 MiB backwards / 16 MiB forwards of where the
    last read ended, like mountpoint-s3) get a readahead window that starts at
    two chunks once ``readahead_trigger`` bytes were read in order, and doubles
    at each chunk boundary up to ``readahead_bytes``; a random access resets it.
    A single small read never loads more than the chunks it touches.
    """

    def __init__(self, fetcher: Fetcher, entry: FileEntry):
        self.fetcher = fetcher
        self.entry = entry
        self.next_off = 0
        self.run_bytes = 0  # bytes read sequentially so far
        self.window = 2
        self.ahead_until = -1  # last chunk index already asked for
        avg = entry.size / max(1, len(entry.chunks))
        self.max_window = max(2, math.ceil(fetcher.readahead_bytes / max(avg, 1)))

    async def read(self, off: int, size: int) -> memoryview | bytes:
        e = self.entry
        end = min(off + size, e.size)
        if off >= end:
            return b""
        last = e.chunk_index(end - 1)
        if -MiB <= off - self.next_off <= 16 * MiB:
            self.run_bytes += end - off
            # keep ``window`` chunks loading ahead of the reader, growing it each time
            # the reader moves into a chunk that needs a new one loaded
            if self.run_bytes >= self.fetcher.readahead_trigger and last + self.window > self.ahead_until:
                self._ahead(last + 1, last + self.window)
                self.window = min(self.window * 2, self.max_window)
        else:
            self.run_bytes, self.window, self.ahead_until = end - off, 2, -1
        self.next_off = end
        return await self.fetcher.span(e, off, end)

    def _ahead(self, lo: int, hi: int) -> None:
        hi = min(hi, len(self.entry.chunks) - 1)
        for i in range(max(lo, self.ahead_until + 1), hi + 1):
            h, n = self.entry.chunks[i]
            self.fetcher.source.prefetch(h, n)
        self.ahead_until = max(self.ahead_until, hi)

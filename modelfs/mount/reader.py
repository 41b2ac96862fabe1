"""Where a reader's bytes come from: the cache's memory map, loading chunks first when needed.

The FUSE process does no per-byte work of its own: a read looks up the chunk
in the LMDB cache (:class:`~modelfs.cache.CacheView`), checks the 64 KiB blocks
it serves against their sums, and returns a memoryview into the map, which
pyfuse3 hands to the kernel. The OS page cache is the memory tier. A chunk that
is not in the cache is loaded by a :class:`ChunkSource` (in a mount: the fetch
worker processes of :class:`~modelfs.transfer.lanes.Lanes`), which returns once it
is committed or, for a waiting reader, handed over verified. A reader's bytes come
from exactly these places, all in :meth:`Reader.span`: the cache's map; a chunk
handed over in memory (``spilled``: before its commit, or one the cache could not
store); a pinned chunk (evicted between its load and the read); a peek's verified
blocks (a small cold read); a sealed cache's chunk, decrypted (:class:`Unsealer`).
Readahead (:mod:`.readahead`) only makes those places ready sooner.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import cachetools
import trio

from ..cache import BlockCache, CacheView, DamagedEntry
from ..errors import IntegrityError
from ..format.codec import ChunkCodec
from ..format.manifest import FileEntry
from ..transfer.lanes import FetchStats
from .readahead import ReadaheadConfig, Readahead, Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1 << 20
PEEK_MAX = 256 << 10  # reads up to this size of a chunk not cached may fetch just their blocks first
PEEK_MIN_CHUNK = 1 << 20  # … in chunks at least this large (a small file's chunk: whole at once)

__all__ = ["ChunkSource", "Reader", "Stream", "Unsealer"]


class ChunkSource(Protocol):
    """Puts verified chunks into the cache. A mount's is :class:`~modelfs.transfer.lanes.Lanes`;
    the in-process tests use fakes."""

    stats: FetchStats
    generation: int  # bumped whenever a chunk becomes servable

    async def load(self, h: str, size: int, *, urgent: bool = True, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> bytes | mmap.mmap | None:
        """Return once chunk ``h`` is in the cache; raise ModelfsError if it cannot be.
        With ``pin``, return the chunk's verified bytes too (they may be evicted at once).
        With ``early`` (a reader waits), it may return as soon as the chunk is held
        verified in memory (``spilled``), before it is in the cache."""

    async def peek(self, h: str, size: int, lo: int, hi: int) -> bytes | mmap.mmap | None:
        """Bytes [lo, hi) of chunk ``h``, verified on their own, for a small read (the whole
        chunk is then loaded behind it); None if they cannot be had so (the reader loads
        the chunk)."""

    def load_ahead(self, h: str, size: int) -> None:
        """Start loading ``h`` for a reader that will want it soon."""

    def recently_loaded(self, h: str) -> bool:
        """Whether ``h`` was written or re-checked moments ago (its pages are in memory)."""

    def spilled(self, h: str) -> bytes | mmap.mmap | None:
        """Verified bytes of ``h`` held in memory, if any: a chunk the cache could not store
        (a full disk), or one being written there that a reader waits for."""

    async def cache_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (an LMDB call) on a cache thread."""


class Reader:
    """Chunk bytes for readers: ``span`` of a file, from the cache, loading what is missing.

    Invariants: every byte returned was verified against its chunk's id by a worker
    (the whole chunk, or for a small cold read the blocks it needs, against the chunk's
    block digests) and, when read from the cache, checked against the block sums taken
    then (a sealed cache: authenticated by AES-GCM); a damaged entry is refetched once,
    then EIO. A read always makes progress, however small the cache: a chunk evicted
    between its load and the read is loaded again *pinned* (its bytes handed to this
    reader in memory). What ``span`` returns is valid until the caller's next await.
    """

    def __init__(self, view: CacheView, source: ChunkSource, config: ReadaheadConfig = ReadaheadConfig(), *,
                 unsealer: Unsealer | None = None):
        self.view = view
        self.source = source
        self.unsealer = unsealer  # --encrypt-cache: the cache holds chunks encrypted
        self.readahead = Readahead(view, source, config, self, unsealer)
        self._join = bytearray()  # reads that span chunks are joined here (see _joined)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Readahead's background work (orders learned, chunks paged in) until cancelled."""
        await self.readahead.run(task_status=task_status)

    @property
    def stats(self) -> FetchStats:
        return self.source.stats

    async def span(self, e: FileEntry, off: int, end: int) -> memoryview | bytes:
        """Bytes [off, end) of file ``e`` (0 < end - off; end ≤ size): valid until the
        caller's next await (a view into the cache's map or the reused reply buffer)."""
        if self.unsealer is not None:
            return await self._sealed_span(e, off, end)
        first, last = e.chunk_index(off), e.chunk_index(end - 1)
        parts: list[tuple[str, int, int, int]] = []
        for i in range(first, last + 1):
            h, n = e.chunks[i]
            start = e.offsets[i]
            parts.append((h, n, max(off, start) - start, min(end, start + n) - start))
        pinned: dict[str, bytes | mmap.mmap] = {}
        # round 1 loads; later rounds load pinned, and a pinned chunk stays: this ends
        for attempt in range(2 + len(parts)):
            missing: list[tuple[str, int]] = []
            damaged: list[tuple[str, int]] = []
            views = []
            self.view.renew(self.source.generation)
            # no await from here until return: the views live as long as the transaction
            for h, n, lo, hi in parts:
                if h in pinned:
                    views.append(memoryview(pinned[h])[lo:hi])
                    continue
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
                return views[0] if len(views) == 1 else self._joined(views)
            del views
            if attempt == 0 and e.by_blocks and len(parts) == 1 and missing and end - off <= PEEK_MAX \
                    and parts[0][1] >= PEEK_MIN_CHUNK:
                # a small read of a chunk not cached: just the blocks it needs first, if that pays
                (h, n, lo, hi), = parts
                if (buf := await self.source.peek(h, n, lo, hi)) is not None:
                    return memoryview(buf)
            trace = self.readahead.trace
            waited = trio.current_time() if trace is not None else 0.0
            for h, n in missing:
                if (buf := await self.source.load(h, n, pin=attempt > 0, early=True)) is not None:
                    pinned[h] = buf
            if trace is not None and missing:
                trace.event("wait", path=e.path, off=off, size=end - off, chunks=len(missing),
                                  secs=round(trio.current_time() - waited, 5))
            for h, n in damaged:
                if (buf := await self.source.load(h, n, refetch=True, pin=attempt > 0, early=True)) is not None:
                    pinned[h] = buf
        raise IntegrityError(f"{e.path}@{off}: chunks still missing or damaged after refetching")

    async def _sealed_span(self, e: FileEntry, off: int, end: int) -> memoryview | bytes:
        """``span`` over a sealed cache: whole chunks, decrypted by the source (AES-GCM
        authenticates each entirely, so no block sums are needed)."""
        views = []
        for i in range(e.chunk_index(off), e.chunk_index(end - 1) + 1):
            h, n = e.chunks[i]
            start = e.offsets[i]
            raw = await self._unsealed(e, h, n)
            views.append(memoryview(raw)[max(off, start) - start:min(end, start + n) - start])
        self.stats.memory_hits += len(views)
        return views[0] if len(views) == 1 else self._joined(views)

    def _joined(self, views: list[memoryview]) -> memoryview:
        """``views`` one after another in one reply buffer, the same for every read.

        Reusing it is safe: a read's reply goes to the kernel before any other task runs
        (see :class:`~modelfs.cache.CacheView`), and callers that keep bytes copy them
        first. A fresh 1 MiB ``bytes`` per read that spans two chunks (a quarter of a
        sequential reader's) cost an mmap, 256 zero-filled page faults and a munmap each."""
        n = sum(len(v) for v in views)
        if n > MiB:  # larger than any kernel read (a file header being learned): not kept
            return memoryview(b"".join(views))
        if len(self._join) < n:
            self._join = bytearray(MiB)
        out, at = memoryview(self._join)[:n], 0
        for v in views:
            out[at:at + len(v)] = v
            at += len(v)
        return out

    async def _unsealed(self, e: FileEntry, h: str, n: int) -> bytes | memoryview | mmap.mmap:
        assert self.unsealer is not None
        for attempt in range(3):
            try:
                raw = await self.unsealer.unseal(h, n)
            except IntegrityError as err:
                log.warning("%s (sealed cache entry): refetching", err)
                buf = await self.source.load(h, n, refetch=True, pin=True)
            else:
                if raw is not None:
                    return raw
                buf = await self.source.load(h, n, pin=attempt > 0)
            if buf is not None:  # handed over in memory: verified plaintext
                return buf
        raise IntegrityError(f"{e.path}: chunk {h[:16]} still missing from the sealed cache after refetching")


class Unsealer:
    """A sealed cache's chunks (``--encrypt-cache``), decrypted: from memory, or decrypted
    on a cache thread (once for all who ask at the same time) and kept a while, so a
    reader's many small reads of a chunk decrypt it once.

    Invariants: at most ``plain_bytes`` of plaintext are held; AES-GCM authenticates
    the whole entry and its id (the associated data), and the worker checked the id's
    keyed BLAKE3 before it wrote the entry, so no hash is needed here; a damaged entry
    is an IntegrityError, never bytes."""

    def __init__(self, source: ChunkSource, cache: BlockCache, codec: ChunkCodec, plain_bytes: int = 128 << 20):
        self.source, self.cache, self.codec = source, cache, codec
        self._plain: cachetools.LRUCache = cachetools.LRUCache(plain_bytes, getsizeof=len)
        self._unsealing: dict[str, trio.Event] = {}

    def holds(self, h: str) -> bool:
        return h in self._plain

    async def unseal(self, h: str, size: int) -> bytes | memoryview | None:
        """Chunk ``h``, decrypted; None if the cache does not hold it. IntegrityError: a damaged entry."""
        while (raw := self._plain.get(h)) is None and (other := self._unsealing.get(h)) is not None:
            await other.wait()  # then look again: it may have failed, or found nothing
        if raw is not None:
            return raw
        codec, done = self.codec, self._unsealing.setdefault(h, trio.Event())
        try:
            raw = await self.source.cache_call(self.cache.with_chunk, h,
                                               lambda v: codec.decode(v, h, size, check_id=False))
            if raw is not None:
                self._plain[h] = raw
            return raw
        finally:
            del self._unsealing[h]
            done.set()

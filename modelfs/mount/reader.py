"""Serving file bytes to readers: from the cache's memory map, loading chunks first when needed.

The FUSE process does no per-byte work of its own: a read looks up the chunk
in the LMDB cache (:class:`~modelfs.cache.CacheView`), checks the 64 KiB blocks
it serves against their sums, and returns a memoryview into the map, which
pyfuse3 hands to the kernel. The OS page cache is the memory tier. A chunk that
is not in the cache is loaded by a :class:`ChunkSource` (in a mount: the fetch
worker processes of :mod:`modelfs.transfer.lanes`), which returns once it is committed.

Readahead follows the reader: sequential readers get a window of chunks loaded
ahead of them; cached chunks in that window are paged in from disk on a thread,
so a warm reader finds them in memory instead of the FUSE thread waiting for
the disk. For safetensors files the
window follows the order loaders read tensors in (sorted names, see
:class:`ReadOrder`), not the file's order.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import mmap
import struct
from collections.abc import Iterator
from typing import Protocol

import trio

from ..cache import CacheView, DamagedEntry
from ..errors import IntegrityError, ModelfsError
from ..transfer.lanes import FetchStats
from ..format.manifest import FileEntry

log = logging.getLogger(__name__)

MiB = 1 << 20
PEEK_MAX = 256 << 10  # reads up to this size of a chunk not cached may fetch just their blocks first
PEEK_MIN_CHUNK = 1 << 20  # … in chunks at least this large (a small file's chunk: whole at once)


class ChunkSource(Protocol):
    """Puts verified chunks into the cache. A mount's is :class:`modelfs.transfer.lanes.Lanes`;
    the in-process tests use a fake one."""

    stats: FetchStats
    generation: int  # bumped whenever a chunk becomes servable

    async def load(self, h: str, size: int, *, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> bytes | mmap.mmap | None:
        """Return once chunk ``h`` is in the cache; raise ModelfsError if it cannot be.
        With ``pin``, return the chunk's verified bytes too (they may be evicted at once).
        With ``early`` (a reader waits), it may return as soon as the chunk is held
        verified in memory (``spilled``), before it is in the cache."""

    async def peek(self, h: str, size: int, lo: int, hi: int) -> bytes | mmap.mmap | None:
        """Bytes [lo, hi) of chunk ``h``, verified on their own, for a small read (the whole
        chunk is then loaded behind it); None if they cannot be had so (the reader loads
        the chunk)."""

    def prefetch(self, h: str, size: int) -> None:
        """Start loading ``h`` for a reader that will want it soon."""

    def page_in(self, h: str, size: int) -> None:
        """Start reading cached chunk ``h`` from disk into memory for a reader that will want it soon."""

    def spilled(self, h: str) -> bytes | mmap.mmap | None:
        """Verified bytes of ``h`` held in memory, if any: a chunk the cache could not store
        (a full disk), or one being written there that a reader waits for."""

    async def unseal(self, h: str, size: int) -> bytes | memoryview | None:
        """A sealed cache's chunk ``h``, decrypted and authenticated (kept in memory a
        while: a reader's many small reads of a chunk decrypt it once); None if not cached."""


class Fetcher:
    """Chunk bytes for readers: ``span`` of a file, from the cache, loading what is missing.

    Invariants: every byte returned was verified against its chunk's id by a worker
    (the whole chunk, or for a small cold read the blocks it needs, against the chunk's
    block digests) and, when read from the cache, checked against the block sums taken
    then; a damaged entry is refetched once, then EIO. A read always makes progress,
    however small the cache: a chunk evicted between its load and the read is loaded
    again *pinned* (its bytes handed to this reader in memory).
    """

    def __init__(self, view: CacheView, source: ChunkSource, *, readahead_bytes: int = 64 * MiB,
                 readahead_trigger: int = 4 * MiB, tensor_order: bool = True, sealed: bool = False):
        self.view = view
        self.source = source
        self.sealed = sealed  # --encrypt-cache: the cache holds chunks encrypted (source.unseal)
        self.readahead_bytes = readahead_bytes
        self.readahead_trigger = readahead_trigger  # sequential bytes before readahead starts
        self.tensor_order = tensor_order  # read ahead in loaders' tensor order where known
        self._orders: dict[tuple[str, int], ReadOrder | None] = {}  # learned (None: the file has none)
        self._learning: set[tuple[str, int]] = set()
        self._nursery: trio.Nursery | None = None
        self._join = bytearray()  # reads that span chunks are joined here (see _joined)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Learn files' reading orders in the background until cancelled (see ``read_order``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def read_order(self, e: FileEntry) -> ReadOrder | None | bool:
        """The loaders' reading order of ``e`` (safetensors: from its header), learned once
        per file in the background: False while it is not known yet (learning has started,
        if ``run`` is running), None if the file has none.

        No read waits for it: the header's chunks must be loaded and, for thousands of
        tensors, parsing takes tens of milliseconds, which a lone random read (or every
        other reader of the mount, the FUSE loop being one thread) must not pay."""
        if not self.tensor_order or e.description.get("format") != "safetensors" or e.size < 16:
            return None
        key = (e.sha256, e.size)
        if key in self._orders:
            return self._orders[key]
        if key not in self._learning and self._nursery is not None:
            self._learning.add(key)
            self._nursery.start_soon(self._learn, e, key)
        return False

    async def _learn(self, e: FileEntry, key: tuple[str, int]) -> None:
        try:
            n = struct.unpack("<Q", bytes(await self.span(e, 0, 8)))[0]
            order = None
            if 8 + n <= min(e.size, MAX_HEADER):
                head = bytes(await self.span(e, 0, 8 + n))
                order = await trio.to_thread.run_sync(ReadOrder.safetensors, head, e.size)
            self._orders[key] = order
        except ModelfsError as err:  # the reads themselves will say it; ask again on a later read
            log.debug("%s: reading order not learned: %s", e.path, err)
        except Exception:  # a bug here must cost readahead, not the mount (this is not a read)
            log.exception("%s: reading order not learned", e.path)
            self._orders[key] = None
        finally:
            self._learning.discard(key)

    @property
    def stats(self) -> FetchStats:
        return self.source.stats

    def ahead(self, h: str, n: int) -> None:
        """Readahead of one chunk. A cached one is paged in from disk on a thread (no
        worker, no presigned URL); a missing one is loaded by the source. Called only
        where no view is outstanding."""
        self.view.renew(self.source.generation)
        if self.view.has(h):
            self.source.page_in(h, n)
        else:
            self.source.prefetch(h, n)

    async def span(self, e: FileEntry, off: int, end: int) -> memoryview | bytes:
        """Bytes [off, end) of file ``e`` (0 < end - off; end ≤ size): valid until the
        caller's next await (a view into the cache's map or the reused reply buffer)."""
        if self.sealed:
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
            for h, n in missing:
                if (buf := await self.source.load(h, n, pin=attempt > 0, early=True)) is not None:
                    pinned[h] = buf
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
        for attempt in range(3):
            try:
                raw = await self.source.unseal(h, n)
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


class ReadOrder:
    """The order a loader reads a file's bytes in: file byte ranges, in reading order.

    For a safetensors file: the header, then every tensor sorted by name, which is
    how ``safe_open(...).keys()``, ``load_file`` and the serving frameworks built on
    them walk a file; the file itself holds tensors in write order (layer 1, 2, …,
    10 — or grouped by dtype), so a file-order readahead keeps resetting while a
    loader walks layers ``1, 10, 11, …``. Bytes no tensor claims come last.
    """

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges  # (file_lo, file_hi), in reading order
        self.ostart = list(itertools.accumulate((hi - lo for lo, hi in ranges), initial=0))
        by_file = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        self._file_lo = [ranges[i][0] for i in by_file]
        self._pos = by_file

    @classmethod
    def safetensors(cls, head: bytes, size: int) -> ReadOrder | None:
        """From the file's first ``8 + n`` bytes; None if they are not a usable header."""
        try:
            n = struct.unpack_from("<Q", head)[0]
            doc = json.loads(bytes(head[8:8 + n]))
            base = 8 + n
            spans = sorted((name, base + int(t["data_offsets"][0]), base + int(t["data_offsets"][1]))
                           for name, t in doc.items() if name != "__metadata__")
        except (ValueError, KeyError, TypeError, IndexError, struct.error, AttributeError):
            return None
        ranges = [(0, base)] + [(lo, hi) for _, lo, hi in spans if base <= lo < hi <= size]
        covered = sorted(ranges)
        pos, gaps = 0, []
        for lo, hi in covered:
            if lo > pos:
                gaps.append((pos, lo))
            pos = max(pos, hi)
        if pos < size:
            gaps.append((pos, size))
        return cls(ranges + gaps)

    def position(self, off: int) -> int:
        """The reading-order index of the range holding file offset ``off``."""
        return self._pos[max(0, bisect.bisect_right(self._file_lo, off) - 1)]

    def order_offset(self, off: int) -> int:
        p = self.position(off)
        return self.ostart[p] + off - self.ranges[p][0]

    def file_ranges(self, olo: int, ohi: int) -> Iterator[tuple[int, int]]:
        """The file byte ranges that reading-order bytes [olo, ohi) are."""
        p = max(0, bisect.bisect_right(self.ostart, olo) - 1)
        while p < len(self.ranges) and self.ostart[p] < ohi:
            lo, hi = self.ranges[p]
            a = lo + max(0, olo - self.ostart[p])
            b = min(hi, lo + ohi - self.ostart[p])
            if a < b:
                yield a, b
            p += 1


MAX_HEADER = 100 * MiB  # a larger safetensors header is not believed (the format caps it too)


class Stream:
    """The read state of one open file: where it is, and how far ahead to load.

    Sequential readers (within 1 MiB backwards / 16 MiB forwards of where the
    last read ended, like mountpoint-s3) get a readahead window that starts at
    two chunks once ``readahead_trigger`` bytes were read in order, and doubles
    at each chunk boundary up to ``readahead_bytes``; a random access resets it.
    A single small read never loads more than the chunks it touches.

    Where the fetcher knows the loaders' reading order (:class:`ReadOrder`), the same
    rules also apply in that order, side by side with file order (a copy reads in file
    order, a loader in tensor order): a read is "sequential" there when it lands in the tensor the
    reader was in or a few after it, and the window covers the next tensors in that
    order, wherever they lie in the file. A read is placed by its middle byte: the
    kernel's read-around for an mmap fault starts before the faulting tensor.
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
        self.avg_chunk = max(1, int(avg))
        self.order: ReadOrder | None = None
        self._order_known = False  # the fetcher said what the order is (None: there is none)
        self.t_pos = -1  # reading-order index of the range the last read was in
        self.t_ahead = 0  # reading-order offset up to which loads were started
        self.t_window = 2 * self.avg_chunk

    @property
    def path(self) -> str:
        return self.entry.path

    async def read(self, off: int, size: int) -> memoryview | bytes:
        e = self.entry
        end = min(off + size, e.size)
        if off >= end:
            return b""
        if not self._order_known and (len(e.chunks) < 2 or off >= e.offsets[1]):
            # once the reader leaves the first chunk (a loader: done with the header), not
            # before: a lone small read at the start needs no header parse
            order = self.fetcher.read_order(e)
            if order is not False:
                self._order_known, self.order = True, order
        # two predictors side by side: copies and dd read in file order, loaders in tensor
        # order; each reads ahead only while its reader looks sequential to it
        self._ahead_in_file(off, end)
        if self.order is not None:
            self._ahead_in_order(self.order, off, end)
        data = await self.fetcher.span(e, off, end)
        self.fetcher.stats.bytes_served += end - off  # what readers got (not our header reads)
        return data

    def _ahead_in_file(self, off: int, end: int) -> None:
        e = self.entry
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

    def _ahead_in_order(self, order: ReadOrder, off: int, end: int) -> None:
        mid = (off + end) // 2
        q, o = order.position(mid), order.order_offset(mid)
        if self.t_pos - 2 <= q <= self.t_pos + 8:
            self.run_bytes += end - off
        else:  # a jump in the loader's order: start over
            self.run_bytes, self.t_window, self.t_ahead = end - off, 2 * self.avg_chunk, 0
        self.t_pos = q
        if self.run_bytes < self.fetcher.readahead_trigger or o + self.t_window <= self.t_ahead:
            return
        lo, hi = max(self.t_ahead, o), o + self.t_window
        e, asked = self.entry, set()
        for flo, fhi in order.file_ranges(lo, hi):
            for i in range(e.chunk_index(flo), e.chunk_index(fhi - 1) + 1):
                if i not in asked:
                    asked.add(i)
                    self.fetcher.ahead(*e.chunks[i])
        self.t_ahead = hi
        self.t_window = min(self.t_window * 2, self.fetcher.readahead_bytes)

    def _ahead(self, lo: int, hi: int) -> None:
        hi = min(hi, len(self.entry.chunks) - 1)
        for i in range(max(lo, self.ahead_until + 1), hi + 1):
            h, n = self.entry.chunks[i]
            self.fetcher.ahead(h, n)
        self.ahead_until = max(self.ahead_until, hi)

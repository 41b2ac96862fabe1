"""Getting chunk bytes to readers: memory → LMDB cache → object store, verified, once.

All of this runs on the trio thread, and only the blocking steps (an LMDB read,
an S3 GET with its decode and BLAKE3 check, a batched LMDB write) leave it, each
through ``trio.to_thread.run_sync`` under its own ``CapacityLimiter``. One
thread hand-off per chunk, not per 128 KiB read: the many small reads of a chunk
are served from the in-memory LRU on the trio thread.

Single flight: every load runs as a task in the fetcher's own nursery and
publishes its result to whoever waits, so concurrent readers and readahead of
one chunk cause one fetch, and a reader that gives up does not cancel the fetch
for the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import cachetools
import trio

from .cache import BlockCache
from .errors import ModelfsError, StoreError
from .manifest import FileEntry
from .registry import Registry

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class FetchConfig:
    memory_bytes: int = 256 * MiB  # decoded chunks kept in memory (LRU)
    s3_concurrency: int = 16  # parallel GETs
    cache_threads: int = 4  # parallel LMDB reads
    readahead_bytes: int = 64 * MiB  # largest readahead window per sequential reader
    readahead_trigger: int = 4 * MiB  # sequential bytes (one average chunk) before readahead starts
    fetch_timeout: float = 60.0  # a chunk not fetched by then is EIO


@dataclass
class FetchStats:
    """Counters since the mount started (``modelfs stats``, Prometheus, systemd STATUS)."""
    bytes_served: int = 0  # bytes returned to readers (page-cache hits never reach us)
    memory_hits: int = 0  # chunk reads answered from the in-memory LRU
    cache_hits: int = 0  # chunk loads answered from the LMDB cache
    fetches: int = 0  # chunk GETs from the store
    bytes_fetched: int = 0
    fetch_seconds: float = 0.0  # sum of GET durations (decode and verification included)
    errors: int = 0  # chunk loads that failed (the reader got EIO)
    recent_latencies: deque = field(default_factory=lambda: deque(maxlen=4096))  # seconds, newest last


class _Flight:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class Fetcher:
    def __init__(self, registry: Registry | None, cache: BlockCache, config: FetchConfig = FetchConfig()):
        self.registry = registry
        self.cache = cache
        self.config = config
        self.memory: cachetools.LRUCache = cachetools.LRUCache(config.memory_bytes, getsizeof=len)
        self.s3_limiter = trio.CapacityLimiter(config.s3_concurrency)
        self.cache_limiter = trio.CapacityLimiter(config.cache_threads)
        self.stats = FetchStats()
        self._flights: dict[str, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._to_cache_send, self._to_cache_recv = trio.open_memory_channel(8)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the loads and the cache writer; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._cache_writer)
            task_status.started()
            await trio.sleep_forever()

    # -- chunks --------------------------------------------------------------------
    async def chunk(self, h: str, size: int) -> bytes:
        """The verified bytes of chunk ``h``; raises ModelfsError on failure."""
        data = self.memory.get(h)
        if data is not None:
            self.stats.memory_hits += 1
            return data
        flight = self._start(h, size)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    def prefetch(self, h: str, size: int) -> None:
        if h not in self.memory:
            self._start(h, size)

    def _start(self, h: str, size: int) -> _Flight:
        flight = self._flights.get(h)
        if flight is None:
            flight = self._flights[h] = _Flight()
            assert self._nursery is not None, "Fetcher.run() is not running"
            self._nursery.start_soon(self._load, h, size, flight)
        return flight

    async def _load(self, h: str, size: int, flight: _Flight) -> None:
        fetched = False
        try:
            data = await trio.to_thread.run_sync(self.cache.get, h, limiter=self.cache_limiter)
            if data is not None:
                self.stats.cache_hits += 1
            else:
                data = await self._from_store(h, size)
                fetched = True
            self.memory[h] = data
            flight.data = data
        except ModelfsError as e:
            self.stats.errors += 1
            log.error("chunk %s: %s", h, e)
            flight.error = e
        except Exception as e:  # a bug must not take the mount down: the reader gets EIO
            self.stats.errors += 1
            log.exception("chunk %s: unexpected error", h)
            flight.error = StoreError(f"chunk {h}: {e}")
        finally:
            del self._flights[h]
            flight.done.set()
        if fetched:
            await self._to_cache_send.send((h, flight.data))

    async def _from_store(self, h: str, size: int) -> bytes:
        if self.registry is None:
            raise StoreError("no store configured")
        with trio.move_on_after(self.config.fetch_timeout) as scope:
            data, took = await trio.to_thread.run_sync(self._timed_get, h, size,
                                                       limiter=self.s3_limiter, abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise StoreError(f"not fetched within {self.config.fetch_timeout:g} s")
        st = self.stats
        st.fetches += 1
        st.bytes_fetched += size
        st.fetch_seconds += took
        st.recent_latencies.append(took)
        return data

    def _timed_get(self, h: str, size: int) -> tuple[bytes, float]:
        """In the worker thread: the GET's own time, not the wait for a slot."""
        assert self.registry is not None
        t0 = time.monotonic()
        data = self.registry.get_chunk(h, size)
        return data, time.monotonic() - t0

    @property
    def in_flight(self) -> int:
        """Chunk loads under way (waiting for a GET slot, fetching, or reading the cache)."""
        return len(self._flights)

    async def _cache_writer(self) -> None:
        """The one LMDB writer: batches new chunks (and last-use times) into one transaction.

        The channel is short on purpose: when the disk is slower than the network,
        flights wait here (their bytes are the same objects the memory LRU holds)
        instead of piling up copies.
        """
        while True:
            batch = [await self._to_cache_recv.receive()]
            while len(batch) < 4:  # LMDB copies a batch into malloc'd pages: keep it small
                try:
                    batch.append(self._to_cache_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await trio.to_thread.run_sync(self.cache.write, batch)
            except Exception:
                log.exception("cache write failed; %d chunks stay uncached", len(batch))


class Stream:
    """The read state of one open file: where it is, and how far ahead to fetch.

    Sequential readers (within 1 MiB backwards / 16 MiB forwards of where the
    last read ended, like mountpoint-s3) get a readahead window that starts at
    two chunks once ``readahead_trigger`` bytes were read in order, and doubles
    at each chunk boundary up to ``readahead_bytes``; a random access resets it.
    A single small read never fetches more than the chunks it touches.
    """

    def __init__(self, fetcher: Fetcher, entry: FileEntry):
        self.fetcher = fetcher
        self.entry = entry
        self.next_off = 0
        self.run_bytes = 0  # bytes read sequentially so far
        self.window = 2
        self.ahead_until = -1  # last chunk index already asked for
        avg = entry.size / max(1, len(entry.chunks))
        self.max_window = max(2, math.ceil(fetcher.config.readahead_bytes / max(avg, 1)))

    async def read(self, off: int, size: int) -> bytes:
        e = self.entry
        end = min(off + size, e.size)
        if off >= end:
            return b""
        first, last = e.chunk_index(off), e.chunk_index(end - 1)
        if -MiB <= off - self.next_off <= 16 * MiB:
            self.run_bytes += end - off
            # keep ``window`` chunks in flight ahead of the reader, growing it each time
            # the reader moves into a chunk that needs a new one fetched
            if self.run_bytes >= self.fetcher.config.readahead_trigger \
                    and last + self.window > self.ahead_until:
                self._ahead(last + 1, last + self.window)
                self.window = min(self.window * 2, self.max_window)
        else:
            self.run_bytes, self.window, self.ahead_until = end - off, 2, -1
        self.next_off = end
        parts = []
        for i in range(first, last + 1):
            h, n = e.chunks[i]
            data = await self.fetcher.chunk(h, n)
            start = e.offsets[i]
            parts.append(data[max(off, start) - start:min(end, start + n) - start])
        self.fetcher.stats.bytes_served += end - off
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _ahead(self, lo: int, hi: int) -> None:
        hi = min(hi, len(self.entry.chunks) - 1)
        for i in range(max(lo, self.ahead_until + 1), hi + 1):
            h, n = self.entry.chunks[i]
            self.fetcher.prefetch(h, n)
        self.ahead_until = max(self.ahead_until, hi)


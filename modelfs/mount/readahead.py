"""Readahead: which chunks a reader will want next, and getting them ready before it asks.

Everything about readahead is here, so a change to it is a change to this file:

* :class:`ReadaheadConfig`: every knob, with what it does (mountpoint-s3's
  ``PrefetcherConfig`` is the model);
* :class:`Stream`: the policy, per open file — is this reader sequential, in file
  order or in the loaders' tensor order, and how large is its window;
* :class:`ReadOrder`: the order loaders read a safetensors file in (sorted tensor
  names), from its header;
* :class:`Readahead`: the execution, per mount — learning files' reading orders in
  the background, and for each chunk a window wants: page it in from the cache
  (on a cache thread), or have a worker load it (behind readers' loads), or in a
  sealed cache decrypt it into memory.

No read waits for readahead: a chunk a reader needs is loaded by the reader itself
(:mod:`.reader`); readahead only makes that load find its chunk ready.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import cachetools
import trio

from ..cache import CacheView
from ..describe.headers import MAX_SAFETENSORS_HEADER, safetensors_tensors
from ..errors import ModelfsError
from ..format.manifest import FileEntry, Manifest
from ..transfer.trace import tracer

if TYPE_CHECKING:
    from .reader import ChunkSource, Reader, Unsealer

log = logging.getLogger(__name__)

MiB = 1 << 20
FOLLOWED_KEPT = 64  # files read ahead into and not opened yet, remembered


@dataclass(frozen=True)
class ReadaheadConfig:
    """Every readahead knob. The defaults are what docs/benchmarks.md measured best here."""
    max_bytes: int = 64 * MiB  # largest window per sequential reader (--readahead)
    trigger_bytes: int = 4 * MiB  # bytes read in order before readahead starts (--readahead-trigger):
    #   one average chunk, so a lone small read loads only the chunks it touches
    first_window: int = 2  # chunks in a new window; it doubles each time it is extended
    back_bytes: int = 4 * MiB  # a read starting this far before the furthest one ended is still in order
    #   (the kernel sends an mmap fault's read-around as several requests, answered in any order)…
    forward_bytes: int = 16 * MiB  # …and this far after it (as mountpoint-s3); else the window resets
    tensor_order: bool = True  # also follow loaders' tensor order where a format says it (--readahead-order)
    order_back: int = 2  # in tensor order: a read touching a tensor this many before the furthest one…
    order_forward: int = 8  # …or this many after it is in order (a loader may skip small tensors)
    follow: bool = True  # a reader that reaches a file's end reads ahead into the next file it will open
    far_seconds: float = 2.0  # against a far store, a window holds this long of the recent fetch rate…
    far_factor: int = 4  # …up to this many times max_bytes
    paging_max: int = 64  # cached chunks being paged in from disk at once
    unseal_max: int = 4  # sealed-cache chunks being decrypted ahead of readers at once


def _key(e: FileEntry) -> tuple[str, int]:
    """What a file's learned order and followed window are kept under: its content."""
    return e.sha256, e.size


class Spans(Protocol):
    async def span(self, e: FileEntry, off: int, end: int) -> memoryview | bytes:
        """Bytes [off, end) of file ``e``, valid until the caller's next await."""


class Readahead:
    """Readahead's execution for one mount: orders learned, chunks made ready.

    Invariants: nothing here raises into a read (a failure costs readahead, and the
    read itself says what is wrong); at most ``paging_max`` (sealed: ``unseal_max``)
    chunks are being paged in at once; a file's reading order is learned at most once
    at a time, and kept (None: it has none) once learned. Work starts only while
    ``run`` runs (a mount's task): before, ``want`` asks the source for missing chunks
    only, and ``read_order`` says "not known yet".
    """

    def __init__(self, view: CacheView, source: ChunkSource, config: ReadaheadConfig, spans: Spans,
                 unsealer: Unsealer | None = None):
        self.view = view
        self.source = source
        self.config = config
        self.spans = spans  # the reader: how a header's bytes are read
        self.unsealer = unsealer  # a sealed cache: decrypt ahead, not page in
        self._orders: dict[tuple[str, int], ReadOrder | None] = {}  # learned (None: the file has none)
        self._learning: dict[tuple[str, int], trio.Event] = {}  # being learned: set when done
        # files a reader read ahead into before they were opened: their window, in bytes
        self._followed: cachetools.LRUCache = cachetools.LRUCache(FOLLOWED_KEPT)
        self._successors: cachetools.LRUCache = cachetools.LRUCache(8)  # id(manifest) → (it, path → next file)
        self._paging: set[str] = set()  # chunks being paged in (or decrypted)
        self._nursery: trio.Nursery | None = None
        self.trace = tracer()  # None unless MODELFS_TRACE is set (benchmarks); the reader writes its waits here too

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Learn orders and page chunks in, in the background, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def window_cap(self) -> int:
        """The largest window a reader may have now: ``max_bytes``; against a far store
        (``FetchStats.far``), as many bytes as the fetches brought in the last
        ``far_seconds``, up to ``far_factor`` × ``max_bytes``.

        A loader alternates between waiting for bytes and copying them (``load_file``
        spends seconds of CPU on a shard); once its window is in, the link idles until
        it reads on. Against a far store the window is what keeps the link busy through
        those phases (measured at 20 ms / 1 Gbit/s: 64 MiB 1.16 × a copy, 256 MiB 1.04 ×);
        near, the CPU is the limit and a larger window buys nothing."""
        cfg, st = self.config, self.source.stats
        if not st.far():
            return cfg.max_bytes
        return int(min(cfg.far_factor * cfg.max_bytes, max(cfg.max_bytes, st.fetch_rate(cfg.far_seconds) * cfg.far_seconds)))

    # -- chunks ------------------------------------------------------------------
    def want(self, h: str, n: int) -> None:
        """A window wants chunk ``h``: a cached one is paged in from disk on a cache thread
        (no worker, no presigned URL), a missing one is loaded by a worker behind readers'
        loads. Called only where no view is outstanding (it renews the cache view)."""
        self.view.renew(self.source.generation)
        if self.view.has(h):
            self._page_in(h, n)
        elif self.unsealer is None:
            self.source.load_ahead(h, n)
        else:  # a sealed cache: load, then decrypt it ahead of its reader
            self._start(self._load_and_unseal, h, n)

    def _page_in(self, h: str, n: int) -> None:
        sealed = self.unsealer is not None
        if h in self._paging or len(self._paging) >= (self.config.unseal_max if sealed else self.config.paging_max):
            return
        if self.unsealer is not None and self.unsealer.holds(h):
            return
        if not sealed and self.source.recently_loaded(h):
            return  # a worker wrote or re-checked it moments ago: its pages are in memory
        if self._start(self._page, h, n):
            self._paging.add(h)

    def _start(self, fn: Callable[[str, int], Awaitable[None]], h: str, n: int) -> bool:
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, h, n)
        return True

    async def _page(self, h: str, n: int) -> None:
        try:
            if self.unsealer is not None:
                found = await self.unsealer.unseal(h, n) is not None
            else:
                found = await self.source.cache_call(self.view.cache.page_in, h)
            if found:
                self.source.stats.paged_in += 1
        except Exception as e:  # readahead only: the read itself will say what is wrong
            log.debug("paging in chunk %s: %s", h[:16], e)
        finally:
            self._paging.discard(h)

    async def _load_and_unseal(self, h: str, n: int) -> None:
        try:
            await self.source.load(h, n, urgent=False)
        except ModelfsError as e:  # readahead only (the load logged it)
            log.debug("loading chunk %s ahead: %s", h[:16], e)
            return
        self._page_in(h, n)

    # -- reading orders ------------------------------------------------------------
    def read_order(self, e: FileEntry) -> ReadOrder | None | bool:
        """The loaders' reading order of ``e`` (safetensors: from its header), learned once
        per file in the background: False while it is not known yet (learning has started,
        if ``run`` is running), None if the file has none.

        No read waits for it: the header's chunks must be loaded and, for thousands of
        tensors, parsing takes tens of milliseconds, which a lone random read (or every
        other reader of the mount, the FUSE loop being one thread) must not pay."""
        if not self.config.tensor_order or e.description.get("format") != "safetensors" or e.size < 16:
            return None
        key = _key(e)
        if key in self._orders:
            return self._orders[key]
        if key not in self._learning and self._nursery is not None:
            self._learning[key] = trio.Event()
            self._nursery.start_soon(self._learn, e, key)
        return False

    async def _learn(self, e: FileEntry, key: tuple[str, int]) -> None:
        try:
            n = struct.unpack("<Q", bytes(await self.spans.span(e, 0, 8)))[0]
            order = None
            if 8 + n <= min(e.size, 8 + MAX_SAFETENSORS_HEADER):
                head = bytes(await self.spans.span(e, 0, 8 + n))
                order = await trio.to_thread.run_sync(ReadOrder.safetensors, head, e.size)
            self._orders[key] = order
        except ModelfsError as err:  # the reads themselves will say it; ask again on a later read
            log.debug("%s: reading order not learned: %s", e.path, err)
        except Exception:  # a bug here must cost readahead, not the mount (this is not a read)
            log.exception("%s: reading order not learned", e.path)
            self._orders[key] = None
        finally:
            self._learning.pop(key).set()

    # -- the next file ---------------------------------------------------------------
    def follow(self, e: FileEntry, lo: int, hi: int) -> None:
        """A reader is finishing the file before ``e`` (the next one a loader opens), and
        its window reaches ``hi`` bytes into ``e`` (in ``e``'s reading order; [0, lo) was
        asked for already): load those bytes (the header first), and let ``e``'s stream
        start at that pace (``followed_by``)."""
        self._followed[_key(e)] = hi
        if self._nursery is not None and hi > lo and e.chunks:
            self._nursery.start_soon(self._follow, e, lo, hi)

    def successor(self, m: Manifest, e: FileEntry) -> FileEntry | None:
        """The file a loader opens after ``e``: the next one in name order in its directory
        with its suffix (``model-00002-of-00004.safetensors`` after ``…00001…``), as
        transformers and the serving frameworks walk shards; None after the last."""
        nexts = self._successors.get(id(m))
        if nexts is None or nexts[0] is not m:
            groups: dict[tuple[str, str], list[FileEntry]] = {}
            for f in m.files:
                d, _, name = f.path.rpartition("/")
                groups.setdefault((d, name.rpartition(".")[2] if "." in name else ""), []).append(f)
            after: dict[str, FileEntry] = {}
            for fs in groups.values():
                fs.sort(key=lambda f: f.path)
                after.update((a.path, b) for a, b in zip(fs, fs[1:]))
            nexts = self._successors[id(m)] = (m, after)
        return nexts[1].get(e.path)

    def followed_by(self, e: FileEntry) -> int | None:
        """The window a reader read ahead into ``e`` with, if one did (once)."""
        return self._followed.pop(_key(e), None)

    async def _follow(self, e: FileEntry, lo: int, hi: int) -> None:
        asked = {0}
        if lo == 0:
            self.want(*e.chunks[0])  # the header: what a loader reads first
        order = self.read_order(e)
        if order is False and (learning := self._learning.get(_key(e))) is not None:
            await learning.wait()
            order = self._orders.get(_key(e))
        self.want_ranges(e, order.file_ranges(lo, hi) if isinstance(order, ReadOrder) else [(lo, min(hi, e.size))],
                         asked)

    def want_ranges(self, e: FileEntry, ranges: Iterable[tuple[int, int]], asked: set[int]) -> None:
        """``want`` each chunk of ``e`` under the file byte ranges, once: ``asked`` holds the
        chunk indexes wanted already, and gains these."""
        for lo, hi in ranges:
            for i in range(e.chunk_index(lo), e.chunk_index(hi - 1) + 1):
                if i not in asked:
                    asked.add(i)
                    self.want(*e.chunks[i])


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
        """From the file's first ``8 + n`` bytes (parsed as publish describes the file);
        None if they are not a usable header."""
        try:
            tensors, _, base = safetensors_tensors(io.BytesIO(head), size)
        except (ValueError, KeyError, TypeError, IndexError, struct.error, AttributeError):
            return None
        spans = sorted((name, lo, hi) for name, (_, _, lo, hi) in tensors.items())
        ranges = [(0, base)] + [(lo, hi) for _, lo, hi in spans if base <= lo < hi <= size]
        pos, gaps = 0, []
        for lo, hi in sorted(ranges):
            if lo > pos:
                gaps.append((pos, lo))
            pos = max(pos, hi)
        if pos < size:
            gaps.append((pos, size))
        return cls(ranges + gaps)

    def position(self, off: int) -> int:
        """The reading-order index of the range holding file offset ``off``."""
        return self._pos[max(0, bisect.bisect_right(self._file_lo, off) - 1)]

    def positions(self, off: int, end: int) -> list[int]:
        """The reading-order indexes of the ranges that file bytes [off, end) touch."""
        i = max(0, bisect.bisect_right(self._file_lo, off) - 1)
        j = bisect.bisect_left(self._file_lo, end)
        return self._pos[i:max(j, i + 1)]

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


class Stream:
    """The read state of one open file: where it is, and how far ahead to load.

    Sequential readers (a read starting within ``back_bytes`` before / ``forward_bytes``
    after the furthest in-order read's end: the kernel splits an mmap fault's read-around
    into requests answered in any order) get a readahead window that starts at
    ``first_window`` chunks once ``trigger_bytes`` were read in order, and doubles at each
    chunk boundary up to ``Readahead.window_cap`` (``max_bytes``; more against a far
    store); a random access resets it. A single small read
    never loads more than the chunks it touches.

    Where the loaders' reading order is known (:class:`ReadOrder`), the same rules also
    apply in that order, side by side with file order (a copy reads in file order, a
    loader in tensor order): a read is "sequential" there when it touches the tensor the
    reader was furthest in, or one a few before or after it (a read-around spans
    neighbours in the file, which may be far apart in the loader's order), and the window
    covers the next tensors in that order, wherever they lie in the file.

    A sequential reader whose window reaches the end of its file (in file order: having
    read most of it in order) reads ahead into the file a loader opens next
    (``Readahead.successor``: the next shard) as far as its window reaches past the end:
    further at each read, until the whole window lies there when the reader reaches the
    end; that file's stream starts with this window, so the link stays busy across
    the move (a window asked for whole at once would let the link drain while the
    reader finishes the file).
    """

    def __init__(self, reader: Reader, entry: FileEntry, manifest: Manifest | None = None):
        self.reader = reader
        self.ahead = reader.readahead
        self.config = cfg = reader.readahead.config
        self.entry = entry
        self.manifest = manifest if cfg.follow else None  # the version holding it: where its successor is
        self.frontier = 0  # the furthest end of an in-order read
        self.run_bytes = 0  # bytes read sequentially so far
        self.window = cfg.first_window
        self.ahead_until = -1  # last chunk index already asked for
        self.avg_chunk = max(1, int(entry.size / max(1, len(entry.chunks))))
        self.order: ReadOrder | None = None
        self._order_known = False  # the reader said what the order is (None: there is none)
        self.t_pos = -1  # reading-order index of the furthest range an in-order read touched
        self.t_run = 0  # bytes read in reading order so far (each predictor counts its own)
        self.t_ahead = 0  # reading-order offset up to which loads were started
        self.t_window = cfg.first_window * self.avg_chunk
        self.followed = 0  # bytes of ``successor`` (in its reading order) readahead asked for
        if (warm := self.ahead.followed_by(entry)) is not None:
            # an earlier file's reader read ahead into this one: go on at its pace
            self.run_bytes = self.t_run = cfg.trigger_bytes
            self.window = min(self.max_window, max(cfg.first_window, warm // self.avg_chunk))
            self.t_window = max(self.t_window, min(warm, self.ahead.window_cap()))
            self.t_pos = 0

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def max_window(self) -> int:
        """The largest window now, in chunks (see ``Readahead.window_cap``)."""
        return max(self.config.first_window, math.ceil(self.ahead.window_cap() / self.avg_chunk))

    async def read(self, off: int, size: int) -> memoryview | bytes:
        e = self.entry
        end = min(off + size, e.size)
        if off >= end:
            return b""
        if not self._order_known and (len(e.chunks) < 2 or off >= e.offsets[1]):
            # once the reader leaves the first chunk (a loader: done with the header), not
            # before: a lone small read at the start needs no header parse
            order = self.ahead.read_order(e)
            if order is not False:
                self._order_known, self.order = True, order
        # two predictors side by side: copies and dd read in file order, loaders in tensor
        # order; each reads ahead only while its reader looks sequential to it
        self._ahead_in_file(off, end)
        if self.order is not None:
            self._ahead_in_order(self.order, off, end)
        if self.ahead.trace is not None:
            self.ahead.trace.event("read", path=e.path, off=off, size=end - off, run=self.run_bytes,
                                   window=self.window, order=self._order_known)
        data = await self.reader.span(e, off, end)
        self.reader.stats.bytes_served += end - off  # what readers got (not our header reads)
        return data

    def _ahead_in_file(self, off: int, end: int) -> None:
        e, cfg = self.entry, self.config
        last = e.chunk_index(end - 1)
        if self.frontier - cfg.back_bytes <= off <= self.frontier + cfg.forward_bytes:
            self.run_bytes += end - off
            self.frontier = max(self.frontier, end)
            # keep ``window`` chunks loading ahead of the reader, growing it each time
            # the reader moves into a chunk that needs a new one loaded
            if self.run_bytes >= cfg.trigger_bytes and last + self.window > self.ahead_until:
                self._ahead(last + 1, last + self.window)
                self.window = min(self.window * 2, self.max_window)
            if self.ahead_until >= len(e.chunks) - 1 and 2 * self.run_bytes >= e.size:
                # read in order, most of it (a copy, or a loader reading in file order): the
                # window reaches past the end by what is left of it after this read
                self._follow(self.window * self.avg_chunk - (e.size - end))
        else:
            self.run_bytes, self.window, self.ahead_until = end - off, cfg.first_window, -1
            self.frontier = end

    def _ahead_in_order(self, order: ReadOrder, off: int, end: int) -> None:
        cfg = self.config
        near = [q for q in order.positions(off, end) if self.t_pos - cfg.order_back <= q <= self.t_pos + cfg.order_forward]
        if near:
            self.t_run += end - off
            self.t_pos = max(self.t_pos, *near)
        else:  # a jump in the loader's order: start over
            self.t_run, self.t_window, self.t_ahead = end - off, cfg.first_window * self.avg_chunk, 0
            self.t_pos = order.position((off + end) // 2)
        o = order.ostart[self.t_pos]
        if self.t_run < cfg.trigger_bytes or o + self.t_window <= self.t_ahead:
            return
        lo, hi = max(self.t_ahead, o), o + self.t_window
        self.ahead.want_ranges(self.entry, order.file_ranges(lo, hi), set())
        self.t_ahead = hi
        if hi >= order.ostart[-1] and 2 * self.t_run >= self.entry.size:  # most of it read in this order
            self._follow(hi - order.ostart[-1])
        self.t_window = min(self.t_window * 2, self.ahead.window_cap())

    def _ahead(self, lo: int, hi: int) -> None:
        last = len(self.entry.chunks) - 1
        for i in range(max(lo, self.ahead_until + 1), min(hi, last) + 1):
            h, n = self.entry.chunks[i]
            self.ahead.want(h, n)
        self.ahead_until = max(self.ahead_until, min(hi, last))

    def _follow(self, reach: int) -> None:
        """The window reaches ``reach`` bytes past the end of the file: go on into the next
        file that far (its header at least), asking only what was not asked yet."""
        if self.manifest is None or (self.followed and reach < self.followed + self.avg_chunk):
            return
        if (after := self.ahead.successor(self.manifest, self.entry)) is not None:
            reach = max(reach, after.chunks[0][1] if after.chunks else 0, self.followed)
            self.ahead.follow(after, self.followed, reach)
            self.followed = reach

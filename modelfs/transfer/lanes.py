"""The boundary between the trio loop and everything that blocks.

One object, :class:`Lanes`, owns it, with its limits and timeouts:

* chunks: fetch worker processes (:mod:`.worker`, spoken to in :mod:`.protocol`)
  that GET, verify and write chunks straight into the shared LMDB cache, so the
  per-byte work of a cold read runs on other cores than the FUSE loop. ``load``
  returns once the chunk is in the cache; the reader then serves it from the
  cache's memory map. ``deliver`` has a worker write a verified chunk into a file
  instead (``pull``); ``peek`` has one fetch and check just the blocks a small read
  needs, first; ``upload`` has one read, name and PUT a piece of a file (``publish``).
* store calls (listings, manifests, tags), bounded by ``fetch_timeout``, and cache
  calls (manifest records, last-use flushes, paging in), unbounded: LMDB on a local
  disk answers or the host is broken — on worker threads under their own
  ``CapacityLimiter``s.

Readahead's loads wait here, in order, not in the workers: a worker is handed
only as many as it has threads (and a spare each few, so a thread that finishes
finds its next chunk at once), so a reader's load, or a queued one a reader comes
to want (promoted), is always next, never behind a window's worth of predictions.

Single flight: one load per chunk per mount, whoever asks (readers, readahead);
across mounts and processes on one host the workers' :class:`~modelfs.cache.FetchLock`
does the same. A reader that gives up (timeout) does not cancel the load for
the others. A worker that dies is replaced; what it held is sent once more to a
live worker, and fails (EIO for the reader) if that one dies too.

A load that a reader waits on (``load(early=True)``) hands the reader the chunk as
soon as a worker verified it, mapped from the worker's memfd, while the worker
commits it; the reader does not wait for the LMDB write.
"""

from __future__ import annotations

import enum
import functools
import gc
import itertools
import logging
import mmap
import os
import socket
import statistics
import subprocess
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cachetools
import trio

from ..cache import BlockCache
from ..errors import AccessDeniedError, IntegrityError, ModelfsError, NotFoundError, StoreError, StoreUnavailableError
from ..registry.layout import Registry
from .protocol import (FD_SPACE, MAX_MESSAGE, Deliver, Done, Early, Failed, Failure, Go, Load, Message,
                       Named, Peek, Peeked, ProtocolError, Ready, Request, Upload, Uploaded, decode, encode,
                       fd_message, received_fd)
from .spawn import LaneConfig, Spawned, lanes_workers, spawn
from .trace import tracer

log = logging.getLogger(__name__)

T = TypeVar("T")
URL_SECONDS = 900  # presigned URLs outlive any queue wait and retry series
WORKER_START_SECONDS = 30.0
PEEK_SAMPLE = 32  # recent whole-chunk fetches that say whether peeks pay
FAR_SECONDS = 0.025  # a store whose chunks take longer is far: peeks pay there (and readahead goes further)
RECENT_SECONDS = 10.0  # a chunk a worker wrote or re-checked this lately: its pages are in memory


@dataclass
class FetchStats:
    """Counters since the mount started (``modelfs stats``, Prometheus, systemd STATUS)."""
    bytes_served: int = 0  # bytes returned to readers (page-cache hits never reach us)
    memory_hits: int = 0  # chunk reads served straight from the cache's map by the FUSE process
    cache_hits: int = 0  # chunk loads a worker answered from the cache (re-checked, paged in)
    paged_in: int = 0  # cached chunks read from disk ahead of a reader by a daemon thread
    fetches: int = 0  # chunk GETs from the store
    peeks: int = 0  # small reads served from a few verified blocks of a chunk (ranged GETs)
    bytes_fetched: int = 0
    fetch_seconds: float = 0.0  # sum of GET durations (decode and verification included)
    errors: int = 0  # chunk loads that failed (the reader got EIO)
    worker_restarts: int = 0
    tier_chunks: int = 0  # of the fetches (and peeks), those a cache tier node answered
    tier_bytes: int = 0
    tier_hits: int = 0  # ... from its cache
    tier_fallbacks: int = 0  # tier nodes that failed to answer (the next node or the store did)
    tier_bad: int = 0  # copies from the tier that failed verification (never served)
    recent_latencies: deque = field(default_factory=lambda: deque(maxlen=4096))  # seconds, newest last
    recent_fetches: deque = field(default_factory=lambda: deque(maxlen=256))  # (monotonic end, bytes), newest last

    def whole_chunk_seconds(self) -> float | None:
        """How long a whole chunk takes to arrive lately (the median of the last fetches;
        None: too few yet). A far store's chunks take a round trip plus tens of ms of
        transfer; one on this host sends 4 MiB in ~10 ms."""
        recent = list(itertools.islice(reversed(self.recent_latencies), PEEK_SAMPLE))
        return statistics.median(recent) if len(recent) >= PEEK_SAMPLE // 4 else None

    def far(self) -> bool:
        """Whether the store is far: its chunks take ``FAR_SECONDS`` or more (median)."""
        whole = self.whole_chunk_seconds()
        return whole is not None and whole >= FAR_SECONDS

    def fetch_rate(self, seconds: float) -> float:
        """Bytes per second the fetches that ended in the last ``seconds`` brought."""
        now = time.monotonic()
        return sum(n for t, n in self.recent_fetches if now - t <= seconds) / seconds


class Kind(enum.Enum):
    """What a flight asks of a worker (one request type of the protocol each)."""
    LOAD = "load"  # into the cache: single flight per chunk
    PEEK = "peek"  # a few verified blocks, for a small read
    DELIVER = "deliver"  # into a file (pull)
    UPLOAD = "upload"  # from a file (publish)


class _Flight:
    """One request to the workers and those who wait for it.

    Invariants: ``done`` is set exactly once (``_finish``), with ``error`` or the reply
    in ``reply``; ``ready`` is set by then too (or earlier: an early hand-over); only a
    LOAD is in ``Lanes._flights`` (one per chunk), and only until it is done."""
    __slots__ = ("kind", "h", "size", "urgent", "refetch", "pin", "early", "out", "span", "decide", "go",
                 "what", "url", "foreign_at", "retried", "started", "done", "ready", "error", "reply", "buffer")
    started: float | None

    def __init__(self, kind: Kind, h: str, size: int, *, urgent: bool = True, refetch: bool = False,
                 pin: bool = False, early: bool = False, out: tuple[int, int] | None = None,
                 span: tuple[int, int] | None = None) -> None:
        self.kind, self.h, self.size = kind, h, size
        self.urgent, self.refetch, self.pin, self.early = urgent, refetch, pin, early
        self.out = out  # (fd, offset): a DELIVER's destination, an UPLOAD's source
        self.span = span  # a PEEK: just bytes [lo, hi) of the chunk
        # an UPLOAD: what to do with the chunk once its id is known, and the answer
        # (asked once: after a worker died, the same answer goes to the next)
        self.decide: Callable[[str], Go] | None = None
        self.go: Go | None = None
        self.what = ""  # an UPLOAD's piece of its file, for errors ("model.safetensors at byte 0")
        self.url: str | None = None
        self.foreign_at: int | None = None  # an adopted chunk: raw bytes of a foreign object from here
        self.retried = False
        self.started = None  # when it went to a worker (None: queued in Lanes, or not sent yet)
        self.done = trio.Event()
        self.ready = trio.Event()  # done, or the chunk's verified bytes are here (in _spilled)
        self.error: ModelfsError | None = None
        self.reply: Done | Peeked | Uploaded | None = None  # the worker's final reply
        self.buffer: mmap.mmap | None = None  # the chunk's bytes, when a worker handed them over

    def request(self, rid: int) -> Request:
        """This flight as the protocol's request ``rid``."""
        if self.kind is Kind.LOAD:
            return Load(rid, self.h, self.size, self.url, self.urgent, self.refetch, self.pin, self.early,
                        self.foreign_at)
        if self.kind is Kind.PEEK:
            assert self.span is not None
            return Peek(rid, self.h, self.size, self.url, *self.span, self.foreign_at)
        assert self.out is not None
        if self.kind is Kind.DELIVER:
            return Deliver(rid, self.h, self.size, self.url, self.out[1], self.foreign_at)
        return Upload(rid, self.size, self.out[1])


@dataclass(eq=False)
class _Proc:
    proc: subprocess.Popen
    raw: socket.socket  # the same socket, for closing it outside the trio loop
    sock: trio.socket.SocketType
    started: float
    pending: dict[int, _Flight] = field(default_factory=dict)
    dead: bool = False
    ready: trio.Event = field(default_factory=trio.Event)


class Lanes:
    """The fetch workers and the thread limiters of one process (a mount, or a bulk command).

    Invariants: at most ``concurrency`` chunk buffers exist in all workers together
    (their threads); readahead's loads go to a worker only while it holds fewer than
    ``allowance`` requests (sent, not answered), the rest wait in ``_ahead`` in the order
    they were asked for; a flight is in ``_ahead`` or sent, never both; this process holds chunk bytes only for chunks the cache could
    not store (a full disk) or that are being committed for a waiting reader, mapped
    from the workers' memfds, at most ``spill_bytes``; every flight ends (its
    ``done`` set) even when its worker dies, twice at most per flight; the workers
    hold no credentials (every URL comes signed, the registry key over the socket).
    """

    def __init__(self, registry: Registry | None, cache: BlockCache | None, config: LaneConfig = LaneConfig(), *,
                 spawned: list[Spawned] | None = None):
        """``cache`` None: workers without a cache, for ``deliver`` only. ``spawned``: workers
        started early (``spawn``), adopted by ``run`` if their configuration is this one's."""
        self.registry = registry
        self.cache = cache
        self.config = config
        self.n_workers, self.worker_config = lanes_workers(config, cache, encrypted=registry is not None and
                                                           registry.key is not None)
        self._early = [s for s in spawned or () if s.config == self.worker_config]
        for s in spawned or ():
            if s not in self._early:
                s.abandon()
        self.store_limiter = trio.CapacityLimiter(config.concurrency)
        self.cache_limiter = trio.CapacityLimiter(config.cache_threads)
        self.stats = FetchStats()
        self.generation = 0  # bumped whenever a chunk becomes servable
        self._flights: dict[str, _Flight] = {}  # LOADs, by chunk
        self._ahead: OrderedDict[str, _Flight] = OrderedDict()  # readahead's LOADs not sent yet, oldest first
        threads = self.worker_config.threads
        self.allowance = threads + max(1, threads // 4)  # requests a worker holds before readahead waits here
        self._procs: list[_Proc] = []
        self._next_id = 0
        self._nursery: trio.Nursery | None = None
        self._quick_deaths = 0
        self._closing = False
        # chunks a worker wrote or re-checked lately (see recently_loaded)
        self._recent: cachetools.TTLCache = cachetools.TTLCache(maxsize=4096, ttl=RECENT_SECONDS)
        # chunks the cache could not store: hash → read-only map of the worker's memfd
        self._spilled: cachetools.LRUCache = cachetools.LRUCache(config.spill_bytes, getsizeof=len)
        self._trace = tracer()  # None unless MODELFS_TRACE is set (benchmarks)
        self._foreign_failed: set[str] = set()  # adopted objects that failed (logged once each)

    # -- life ---------------------------------------------------------------------
    async def run(self, *, ready_first: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers and serve loads until cancelled (then ``close()``).

        Reports started once every worker said it is ready (imports done, cache open),
        so the first read of a new mount does not wait for a process to start; with
        ``ready_first`` false, at once (requests wait in the workers' sockets)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            early, self._early = self._early[:self.n_workers], []
            for s in early:
                self._adopt(s)
            for _ in range(self.n_workers - len(early)):
                self._spawn()
            if not ready_first:
                task_status.started()
            with trio.move_on_after(WORKER_START_SECONDS):
                for p in list(self._procs):
                    await p.ready.wait()
            if not any(p.ready.is_set() for p in self._procs):
                log.error("no fetch worker became ready within %g s", WORKER_START_SECONDS)
            if ready_first:
                task_status.started()
            await trio.sleep_forever()

    def _spawn(self) -> None:
        self._adopt(spawn(self.worker_config))

    def _adopt(self, s: Spawned) -> None:
        assert self._nursery is not None
        s.adopted = True
        if self.worker_config.encrypted:  # the key goes through the socket, never argv or env
            assert self.registry is not None and self.registry.key is not None
            s.give_key(self.registry.key.secret)  # (a daemon may have given it already: Spawned.connect)
        p = _Proc(s.proc, s.sock, trio.socket.from_stdlib_socket(s.sock), time.monotonic())
        self._procs.append(p)
        self._nursery.start_soon(self._receive, p)
        log.debug("fetch worker %d started", s.proc.pid)
        self._pump()

    def close(self, grace: float = 15.0) -> None:
        """After the trio loop ended: let every worker finish and commit what it holds."""
        self._closing = True
        for s in self._early:  # started early, never adopted (the loop did not run)
            s.abandon()
        self._early = []
        for p in self._procs:
            p.raw.close()  # end of file: finish, then exit
        deadline = time.monotonic() + grace
        for p in self._procs:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("fetch worker %d did not finish in %g s: killed", p.proc.pid, grace)
                p.proc.kill()
                p.proc.wait()
        self._procs.clear()

    @property
    def worker_pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs if not p.dead]

    @property
    def in_flight(self) -> int:
        """Chunk loads asked for and not done (readahead's queued ones included)."""
        return len(self._flights)

    @property
    def queued(self) -> int:
        """Readahead loads waiting here for a worker's thread."""
        return len(self._ahead)

    # -- chunks ---------------------------------------------------------------------
    async def load(self, h: str, size: int, *, urgent: bool = True, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> mmap.mmap | None:
        """Return once chunk ``h`` is verified in the cache, or with ``early`` (a reader
        waits) once it is verified and handed over (``spilled(h)``) while a worker
        commits it; ModelfsError if it cannot be. ``urgent`` false: queued with readahead's
        loads, behind readers' (readahead that waits for its chunk); an urgent load of a
        chunk readahead queued sends that one at once.

        With ``pin``, also return the chunk's bytes (a read-only map of a worker's memfd):
        for a reader that found its chunk evicted right after an earlier load.
        """
        early = early and not pin and not self.config.sealed
        flight = self._flights.get(h)
        if flight is None or (refetch and not flight.refetch) or (pin and not flight.pin):
            if flight is not None:
                self._promote(flight)  # replaced, yet waited for: it goes too (the workers' lock keeps it one GET)
            flight = self._start(_Flight(Kind.LOAD, h, size, urgent=urgent, refetch=refetch, pin=pin, early=early))
        elif urgent:
            self._promote(flight)
        await self._wait(flight, flight.ready if early else flight.done)
        return flight.buffer

    def _promote(self, flight: _Flight) -> None:
        """A reader wants ``flight`` now: if readahead queued it here, send it, urgent (not
        ``early``: a hand-over's memfd costs a copy into fresh pages, and a reader catching
        up with readahead would pay it for most chunks)."""
        if self._ahead.pop(flight.h, None) is not None:
            flight.urgent = True
            if self._trace is not None:
                self._trace.event("promote", h=flight.h[:12])
            self._send(flight)

    def load_ahead(self, h: str, size: int) -> None:
        """Queue ``h`` for a reader that will want it soon (readahead); nobody waits for
        it. Nothing to do for a chunk loading or queued, or loaded lately."""
        if h not in self._flights and h not in self._recent:
            self._start(_Flight(Kind.LOAD, h, size, urgent=False))

    def recently_loaded(self, h: str) -> bool:
        """Whether a worker wrote or re-checked ``h`` in the last ``RECENT_SECONDS``: its
        pages are in memory, and it is in the cache."""
        return h in self._recent

    async def deliver(self, h: str, size: int, fd: int, offset: int) -> bool:
        """Have a worker write verified chunk ``h`` into ``fd`` at ``offset`` — from the cache
        if it holds the chunk (nothing is added to it), else GET — and return once it is
        written: True if it was fetched. ModelfsError if it cannot be. No single flight:
        each delivery is its own."""
        flight = self._start(_Flight(Kind.DELIVER, h, size, out=(fd, offset)))
        await self._wait(flight)
        assert isinstance(flight.reply, Done)
        return flight.reply.fetched

    async def peek(self, h: str, size: int, lo: int, hi: int) -> mmap.mmap | None:
        """Bytes [lo, hi) of chunk ``h`` for a small read, fetched and verified without the
        rest of the chunk (its block digests and the blocks that hold them), then the whole
        chunk loaded behind it (what is fetched is cached). None where that cannot be
        done or does not pay: whole chunks arrive fast (a near store: two small requests
        that each pay its per-object cost are no faster than the chunk), this
        one is on its way and due soon (or queued by readahead: then sent next), or it cannot
        be read by blocks (zstd; named before block digests); the reader then waits for the
        whole chunk."""
        if self.config.sealed or self.registry is None:
            return None
        whole = self.stats.whole_chunk_seconds()
        if whole is not None and whole < FAR_SECONDS:
            return None  # a near store
        if (loading := self._flights.get(h)) is not None:
            if loading.started is None:  # queued by readahead: the reader's chunk is next, whole
                self._promote(loading)
                return None
            if whole is None or whole - (time.monotonic() - loading.started) < FAR_SECONDS:
                return None  # the whole chunk is on its way, and soon here
        flight = self._start(_Flight(Kind.PEEK, h, size, span=(lo, hi)))
        try:
            await self._wait(flight)
        except ModelfsError as e:  # the whole chunk's load says what is wrong, if anything is
            log.debug("chunk %s, bytes %d-%d: %s", h[:16], lo, hi, e)
            return None
        finally:
            self.load_ahead(h, size)
        return flight.buffer

    async def upload(self, fd: int, offset: int, size: int, what: str,
                     decide: Callable[[str], Go]) -> tuple[str, bool, int]:
        """Have a worker read ``size`` bytes at ``offset`` of ``fd``, hash them, and then do what
        ``decide(chunk id)`` says (a :class:`~.protocol.Go`; its ``id`` is filled in here):
        skip, or HEAD (the store has it: done), encode (zstd where it pays, unless not
        ``compress``) and PUT (no URL: a dry run). ``decide`` runs in this loop, once per
        upload. ``(id, uploaded, stored bytes)``; ModelfsError if it cannot be done.
        ``what`` names the piece in errors ("model.safetensors at byte 0")."""
        flight = _Flight(Kind.UPLOAD, "", size, out=(fd, offset))  # the id comes with the worker's question
        flight.decide, flight.what = decide, what
        self._send(flight)
        await self._wait(flight)
        assert isinstance(flight.reply, Uploaded)
        return flight.reply.h, flight.reply.uploaded, flight.reply.stored

    async def _answer(self, p: _Proc, rid: int, flight: _Flight, h: str) -> None:
        """An upload's worker knows the chunk's id: say what to do with it."""
        if flight.go is None:
            assert flight.decide is not None
            flight.h = h
            try:
                flight.go = flight.decide(h)
            except ModelfsError as e:  # e.g. a URL that cannot be signed: fail this upload
                flight.error, flight.go = e, Go(0, skip=True)
        go = flight.go
        # a worker died holding this upload, maybe in the middle of its PUT, and a store may
        # keep what a cut PUT sent (seen: SeaweedFS, a 0-byte object): no HEAD, PUT it again
        head = None if flight.retried else go.head
        try:
            await p.sock.send(encode(Go(rid, go.skip, head, go.put, go.compress)))
        except OSError:
            pass  # the worker is gone: _receive sees it and re-sends the upload

    async def _wait(self, flight: _Flight, until: trio.Event | None = None) -> None:
        """Until ``flight`` is done (or ``until`` is set; its error raised) or ``fetch_timeout``
        passed (the flight goes on for whoever else waits for it)."""
        until = flight.done if until is None else until
        with trio.move_on_after(self.config.fetch_timeout):
            await until.wait()
        if not until.is_set():
            self.stats.errors += 1
            what = f"{flight.what}: not uploaded" if flight.what else f"chunk {flight.h} not fetched"
            raise StoreUnavailableError(f"{what} within {self.config.fetch_timeout:g} s")
        if flight.error is not None:
            raise flight.error

    def _start(self, flight: _Flight) -> _Flight:
        """Sign ``flight``'s URL and send it to a worker, or queue it (readahead's loads,
        when the workers hold their allowance)."""
        if flight.kind is Kind.LOAD:  # one per chunk (a delivery or a peek is its own)
            self._flights[flight.h] = flight
        try:
            if self.registry is not None and (at := self.registry.locate(flight.h)) is not None:
                flight.url, flight.foreign_at = at.store.presign(at.key, URL_SECONDS), at.at
            elif self.registry is not None:
                flight.url = self.registry.store.presign(self.registry.chunk_key(flight.h), URL_SECONDS)
        except ModelfsError as e:
            self._finish(flight, e)
            return flight
        if flight.kind is Kind.LOAD and not flight.urgent:
            self._ahead[flight.h] = flight
            if self._trace is not None:
                self._trace.event("queued", h=flight.h[:12], size=flight.size)
            self._pump()
        else:
            self._send(flight)
        return flight

    def _pump(self) -> None:
        """Hand queued readahead loads to workers below their allowance, oldest first."""
        while self._ahead:
            if not any(not p.dead and len(p.pending) < self.allowance for p in self._procs):
                return
            self._send(self._ahead.popitem(last=False)[1])

    def _send(self, flight: _Flight) -> None:
        """Give ``flight`` to the live worker that holds the fewest requests (its id is in
        that worker's ``pending`` from now on), and send it there."""
        live = [p for p in self._procs if not p.dead]
        if not live:
            self._finish(flight, StoreError("no fetch worker is running (they keep failing: see the log)"))
            return
        p = min(live, key=lambda q: len(q.pending))
        self._next_id += 1
        rid = self._next_id
        p.pending[rid] = flight
        flight.started = time.monotonic()
        if self._trace is not None:
            self._trace.event("start", kind=flight.kind.value, h=flight.h[:12], size=flight.size, urgent=flight.urgent)
        assert self._nursery is not None, "Lanes.run() is not running"
        self._nursery.start_soon(self._transmit, p, rid, flight)

    async def _transmit(self, p: _Proc, rid: int, flight: _Flight) -> None:
        try:
            await p.sock.sendmsg([encode(flight.request(rid))], fd_message(flight.out[0] if flight.out else None))
        except OSError:
            pass  # the worker is gone: _receive sees it and re-sends what it held

    async def _receive(self, p: _Proc) -> None:
        while True:
            try:
                data, anc, _, _ = await p.sock.recvmsg(MAX_MESSAGE, FD_SPACE)
            except (OSError, trio.ClosedResourceError):
                data, anc = b"", []
            if not data:
                break
            fd = received_fd(anc)
            try:
                msg = decode(data)
            except ProtocolError as e:
                log.error("fetch worker %d: %s: replacing it", p.proc.pid, e)
                if fd is not None:
                    os.close(fd)
                p.proc.kill()  # what it held goes to another (see _on_death)
                break
            try:
                await self._on_message(p, msg, fd)
            finally:
                if fd is not None:
                    os.close(fd)
        await self._on_death(p)

    async def _on_message(self, p: _Proc, msg: Message, fd: int | None) -> None:
        if isinstance(msg, Ready):
            p.ready.set()
        elif isinstance(msg, Named):  # an upload's question: its chunk's id
            if (asking := p.pending.get(msg.id)) is not None:
                await self._answer(p, msg.id, asking, msg.h)
        elif isinstance(msg, Early):  # a waiting reader's bytes, ahead of the commit: the flight goes on
            if (flight := p.pending.get(msg.id)) is not None and fd is not None:
                self._spilled[flight.h] = mmap.mmap(fd, flight.size, prot=mmap.PROT_READ)
                self.generation += 1  # servable now (and a refetch's old entry is gone): views renew
                flight.ready.set()
                if self._trace is not None:
                    self._trace.event("early", h=flight.h[:12])
        elif isinstance(msg, (Done, Peeked, Uploaded, Failed)):
            if (flight := p.pending.pop(msg.id, None)) is not None:
                if fd is not None:
                    lo, hi = flight.span or (0, flight.size)
                    flight.buffer = mmap.mmap(fd, hi - lo, prot=mmap.PROT_READ)
                    if flight.kind is Kind.LOAD:
                        self._spilled[flight.h] = flight.buffer
                self._on_reply(flight, msg)
                self._pump()
        else:
            log.error("fetch worker %d sent a %s: ignored", p.proc.pid, type(msg).__name__)

    def spilled(self, h: str) -> mmap.mmap | None:
        """A verified chunk the cache could not store (see ``spill_bytes``), or one a
        waiting reader was handed before its commit, if still held."""
        return self._spilled.get(h)

    def _on_reply(self, flight: _Flight, r: Done | Peeked | Uploaded | Failed) -> None:
        if isinstance(r, Failed):
            if flight.kind is Kind.PEEK:  # its failure is no reader's (see peek)
                flight.error = self._error(flight, r)
                flight.done.set()
                return
            self._finish(flight, flight.error or self._error(flight, r))
            return
        flight.reply = r
        if isinstance(r, Peeked):
            self.stats.peeks += not r.none
            self._count_tier(r, 0)
            flight.done.set()
            return
        if isinstance(r, Uploaded):
            self._finish(flight, flight.error)
            return
        st = self.stats
        if r.fetched:
            st.fetches += 1
            st.bytes_fetched += flight.size
            st.fetch_seconds += r.took
            st.recent_latencies.append(r.took)
            st.recent_fetches.append((time.monotonic(), flight.size))
            self._count_tier(r, flight.size)
        else:
            st.cache_hits += 1
        if flight.kind is Kind.LOAD:
            self._recent[flight.h] = True
            self.generation += 1
            if flight.early and not r.spill:  # committed: readers find it in the cache now
                self._spilled.pop(flight.h, None)
        self._finish(flight, None)

    def _count_tier(self, r: Done | Peeked, size: int) -> None:
        st = self.stats
        st.tier_chunks += r.tier and size > 0
        st.tier_bytes += size if r.tier else 0
        st.tier_hits += r.hit and size > 0
        st.tier_fallbacks += r.fallbacks
        st.tier_bad += r.bad

    def _error(self, flight: _Flight, r: Failed) -> ModelfsError:
        # the full chunk id, once: it is what finds the object in the store (the worker's
        # own message may start with the short form)
        msg = r.msg.removeprefix(f"chunk {flight.h[:16]}: ")
        label = f"chunk {flight.h}" if not flight.what else \
            f"{flight.what} (chunk {flight.h})" if flight.h else flight.what
        if r.kind in (Failure.HTTP, Failure.THROTTLED, Failure.UNAVAILABLE) and r.status is not None \
                and self.registry is not None and flight.h:
            at = self.registry.locate(flight.h) if flight.foreign_at is not None else None
            store, key = (at.store, at.key) if at is not None else (self.registry.store, self.registry.chunk_key(flight.h))
            err = store.http_error(key, r.status, r.code, msg)
            return err if isinstance(err, ModelfsError) else StoreError(str(err))
        if r.kind is Failure.UNAVAILABLE:
            return StoreUnavailableError(f"{label}: {msg}")
        if r.kind is Failure.INTEGRITY:
            return IntegrityError(f"{label}: {msg}")
        if r.kind in (Failure.WRITE, Failure.SOURCE):
            return ModelfsError(f"{label}: {msg}")
        return StoreError(f"{label}: {msg}")

    def _finish(self, flight: _Flight, error: ModelfsError | None) -> None:
        if error is not None and flight.foreign_at is not None:
            error = self._foreign_error(flight, error)
        if error is not None:
            self.stats.errors += 1
            # an awaited load's failure is reported by whoever awaits it (a reader's EIO
            # is logged with its file and offset; prefetch says it as its error): once
            log.log(logging.DEBUG if flight.urgent else logging.WARNING, "chunk %s: %s", flight.h, error)
            flight.error = error
        if self._flights.get(flight.h) is flight:
            del self._flights[flight.h]
        if self._trace is not None:
            r = flight.reply
            self._trace.event("done", kind=flight.kind.value, h=flight.h[:12], size=flight.size, ok=error is None,
                              fetched=isinstance(r, Done) and r.fetched, took=getattr(r, "took", None))
        flight.done.set()
        flight.ready.set()

    def _foreign_error(self, flight: _Flight, error: ModelfsError) -> ModelfsError:
        """An adopted chunk's failure names the foreign object and the version (its store
        deleted or overwrote it after adoption: ``dvc gc``, ``git lfs prune``): logged once
        per object, whoever waits."""
        at = self.registry.locate(flight.h) if self.registry is not None else None
        if at is None:
            return error
        if isinstance(error, AccessDeniedError):
            error = type(error)(f"{at.version} reads {at.url} in place (an adopted version), and this host may not "
                                f"read it: it needs read access to bucket {at.store.bucket!r} too: {error}")
        else:
            gone = "is gone" if isinstance(error, NotFoundError) else "no longer holds the adopted bytes"
            error = type(error)(f"{at.version} reads {at.url}, which {gone} (changed or deleted after adoption: "
                                f"`modelfs verify --deep` lists what moved): {error}")
        if at.url not in self._foreign_failed:
            self._foreign_failed.add(at.url)
            log.error("%s", error)
        return error

    async def _on_death(self, p: _Proc) -> None:
        p.dead = True
        self._procs.remove(p)
        if self._closing:
            return
        p.sock.close()
        code = await trio.to_thread.run_sync(p.proc.wait)
        lived = time.monotonic() - p.started
        log.error("fetch worker %d exited (%s) after %.1f s; starting another", p.proc.pid, code, lived)
        self.stats.worker_restarts += 1
        self._quick_deaths = self._quick_deaths + 1 if lived < 5 else 0
        if self._quick_deaths < 5:
            if self._quick_deaths:
                await trio.sleep(0.2 * self._quick_deaths)
            self._spawn()
        for flight in p.pending.values():  # what it held: once more, elsewhere
            if flight.retried:
                self._finish(flight, StoreError(f"chunk {flight.h}: the fetch worker died twice"))
            else:
                flight.retried = True
                self._send(flight)

    # -- blocking calls on threads -----------------------------------------------------
    async def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a store request) on a thread, bounded by ``fetch_timeout``."""
        try:
            with trio.fail_after(self.config.fetch_timeout):
                return await trio.to_thread.run_sync(fn, *args, limiter=self.store_limiter,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            raise StoreUnavailableError(f"the object store did not answer within "
                                        f"{self.config.fetch_timeout:g} s") from None

    async def cache_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (an LMDB call) on a thread. Not bounded in time: LMDB on a local
        disk answers, or the host itself is broken."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.cache_limiter)


def run_with(lanes: Lanes, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a trio loop beside ``lanes`` (their workers starting while it begins
    and, at the end, left to finish and commit what they hold), for commands that are
    not a mount (``prefetch``, ``pull``, ``publish``). A failure comes out as its first
    cause, Ctrl-C or the first ModelfsError, not as an exception group."""
    async def main() -> None:
        async with trio.open_nursery() as outer:
            await outer.start(functools.partial(lanes.run, ready_first=False))
            await body()
            outer.cancel_scope.cancel()

    gc.freeze()  # imports and botocore's models stay: full collections need not walk them (as a mount)
    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        first = next((e for e in leaves if isinstance(e, KeyboardInterrupt)), None) or \
            next((e for e in leaves if isinstance(e, ModelfsError)), None)
        if first is None:
            raise
        raise first from None
    finally:
        lanes.close()


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        yield from _leaves(e) if isinstance(e, BaseExceptionGroup) else (e,)

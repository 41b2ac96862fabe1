"""The boundary between the trio loop and everything that blocks.

One object, :class:`Lanes`, owns it, with its limits and timeouts:

* chunks: fetch worker processes (:mod:`modelfs.transfer.worker`) that GET, verify and
  write chunks straight into the shared LMDB cache, so the per-byte work of a
  cold read runs on other cores than the FUSE loop. ``load`` returns once the
  chunk is in the cache; the reader then serves it from the cache's memory map.
  ``deliver`` has a worker write a verified chunk into a file instead (``pull``);
  ``peek`` has one fetch and check just the blocks a small read needs, first.
* store calls (listings, manifests, tags) and cache calls (manifest records,
  last-use flushes): worker threads under their own ``CapacityLimiter``s.

Single flight: one load per chunk per mount, whoever asks (readers, readahead);
across mounts and processes on one host the workers' :class:`~modelfs.cache.FetchLock`
does the same. A reader that gives up (timeout) does not cancel the load for
the others. A worker that dies is replaced; what it held is sent once more to a
live worker, and fails (EIO for the reader) if that one dies too.

A load that a reader waits on (``load``, not ``prefetch``) hands the reader the
chunk as soon as a worker verified it, mapped from the worker's memfd, while the
worker commits it; the reader does not wait for the LMDB write.

Invariants: at most ``concurrency`` chunk buffers exist in all workers together
(their threads); this process holds chunk bytes only for chunks the cache could
not store (a full disk) or that are being committed for a waiting reader, mapped
from the workers' memfds, at most ``spill_bytes``.
"""

from __future__ import annotations

import array
import base64
import functools
import gc
import itertools
import json
import logging
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cachetools
import trio

from ..cache import BlockCache
from ..config import ATTEMPTS, CONNECT_TIMEOUT, READ_TIMEOUT
from ..errors import IntegrityError, ModelfsError, StoreError, StoreUnavailableError
from ..registry.layout import Registry
from .worker import MAX_MESSAGE, WorkerConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
URL_SECONDS = 900  # presigned URLs outlive any queue wait and retry series
WORKER_START_SECONDS = 30.0
PAGING_MAX = 64  # cached chunks being paged in at once (readahead windows are smaller)
UNSEAL_AHEAD_MAX = 4  # a sealed cache's chunks being decrypted ahead of readers at once
PEEK_SAMPLE = 32  # recent whole-chunk fetches that say whether peeks pay
PEEK_WORTH = 0.025  # seconds: a store whose chunks take longer gets peeks (and a chunk due later)


def default_workers() -> int:
    """Half the cores, at least 2 and at most 8: the store and the FUSE loop need the rest."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class LaneConfig:
    workers: int = 0  # fetch worker processes; 0: default_workers()
    concurrency: int = 16  # parallel GETs over all workers
    cache_threads: int = 4  # parallel LMDB calls from this process
    fetch_timeout: float = 60.0  # a chunk not loaded by then is EIO for its reader
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    max_attempts: int = ATTEMPTS
    spill_bytes: int = 64 << 20  # verified chunks kept in memory when the cache cannot store them
    sealed: bool = False  # --encrypt-cache: the cache holds chunks encrypted (see unseal)
    plain_bytes: int = 128 << 20  # a sealed cache's chunks kept decrypted in memory


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
    recent_latencies: deque = field(default_factory=lambda: deque(maxlen=4096))  # seconds, newest last


class _Flight:
    __slots__ = ("h", "size", "done", "error", "url", "retried", "urgent", "refetch", "pin", "buffer", "out",
                 "decide", "go", "result", "what", "span", "started", "early", "ready")

    def __init__(self, h: str, size: int, urgent: bool, refetch: bool, pin: bool = False) -> None:
        self.h, self.size, self.urgent, self.refetch, self.pin = h, size, urgent, refetch, pin
        self.done = trio.Event()
        self.started = time.monotonic()
        self.error: ModelfsError | None = None
        self.url: str | None = None
        self.retried = False
        self.buffer: mmap.mmap | None = None  # the chunk's bytes, when a worker handed them over
        self.out: tuple[int, int] | None = None  # (fd, offset): deliver the chunk there, not to the cache
        # an upload (``out`` is then its source): what to do with the chunk once its id is known
        self.decide: Callable[[str], dict[str, Any]] | None = None
        self.go: dict[str, Any] | None = None  # decide's answer (asked again after a worker died: the same)
        self.result: dict[str, Any] | None = None  # the worker's final reply (uploads, deliveries)
        self.what = ""  # an upload's piece of its file, for errors ("model.safetensors at byte 0")
        self.span: tuple[int, int] | None = None  # a peek: just bytes [lo, hi) of the chunk
        self.early = False  # a load a reader waits on: the chunk handed over before its commit
        self.ready = trio.Event()  # done, or the chunk's verified bytes are here (in _spilled)


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
    def __init__(self, registry: Registry | None, cache: BlockCache | None, config: LaneConfig = LaneConfig()):
        """``cache`` None: workers without a cache, for ``deliver`` only."""
        self.registry = registry
        self.cache = cache
        self.config = config
        self.n_workers = config.workers or default_workers()
        self.worker_config = WorkerConfig(
            cache_dir=str(cache.path.parent) if cache is not None else "", cache_cap=cache.cap if cache else 0,
            threads=max(1, -(-config.concurrency // self.n_workers)),
            connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
            max_attempts=config.max_attempts,
            encrypted=registry is not None and registry.key is not None, sealed=config.sealed)
        self.store_limiter = trio.CapacityLimiter(config.concurrency)
        self.cache_limiter = trio.CapacityLimiter(config.cache_threads)
        self.stats = FetchStats()
        self.generation = 0  # bumped whenever a chunk becomes servable
        self._flights: dict[str, _Flight] = {}
        self._procs: list[_Proc] = []
        self._next_id = 0
        self._nursery: trio.Nursery | None = None
        self._quick_deaths = 0
        self._closing = False
        self._paging: set[str] = set()  # cached chunks being read into memory
        # chunks a worker confirmed lately: readahead need not ask again
        self._confirmed: cachetools.TTLCache = cachetools.TTLCache(maxsize=4096, ttl=10.0)
        # chunks the cache could not store: hash → read-only map of the worker's memfd
        self._spilled: cachetools.LRUCache = cachetools.LRUCache(config.spill_bytes, getsizeof=len)
        # a sealed cache's chunks, decrypted (readers and readahead), and those being decrypted
        self._plain: cachetools.LRUCache = cachetools.LRUCache(config.plain_bytes, getsizeof=len)
        self._unsealing: dict[str, trio.Event] = {}

    # -- life ---------------------------------------------------------------------
    async def run(self, *, ready_first: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers and serve loads until cancelled (then ``close()``).

        Reports started once every worker said it is ready (imports done, cache open),
        so the first read of a new mount does not wait for a process to start; with
        ``ready_first`` false, at once (requests wait in the workers' sockets)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.n_workers):
                self._spawn()
            if not ready_first:
                task_status.started()
                await trio.sleep_forever()
            with trio.move_on_after(WORKER_START_SECONDS):
                for p in list(self._procs):
                    await p.ready.wait()
            if not any(p.ready.is_set() for p in self._procs):
                log.error("no fetch worker became ready within %g s", WORKER_START_SECONDS)
            task_status.started()
            await trio.sleep_forever()

    def _spawn(self) -> None:
        assert self._nursery is not None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the workers need no credentials (URLs come signed): do not hand them any
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfs.transfer.worker", self.worker_config.to_json(), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        if self.worker_config.encrypted:  # the key goes through the socket, never argv or env
            assert self.registry is not None and self.registry.key is not None
            mine.send(json.dumps({"key": base64.b64encode(self.registry.key.secret).decode()}).encode())
        p = _Proc(proc, mine, trio.socket.from_stdlib_socket(mine), time.monotonic())
        self._procs.append(p)
        self._nursery.start_soon(self._receive, p)
        log.debug("fetch worker %d started", proc.pid)

    def close(self, grace: float = 15.0) -> None:
        """After the trio loop ended: let every worker finish and commit what it holds."""
        self._closing = True
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
        return len(self._flights)

    # -- chunks ---------------------------------------------------------------------
    async def load(self, h: str, size: int, *, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> mmap.mmap | None:
        """Return once chunk ``h`` is verified in the cache, or with ``early`` (a reader
        waits) once it is verified and handed over (``spilled(h)``) while a worker
        commits it; ModelfsError if it cannot be.

        With ``pin``, also return the chunk's bytes (a read-only map of a worker's memfd):
        for a reader that found its chunk evicted right after an earlier load.
        """
        flight = self._flights.get(h)
        if flight is None or (refetch and not flight.refetch) or (pin and not flight.pin):
            flight = self._start(h, size, urgent=True, refetch=refetch, pin=pin, early=early and not pin)
        await self._wait(flight, flight.ready if early else flight.done)
        return flight.buffer

    async def deliver(self, h: str, size: int, fd: int, offset: int) -> bool:
        """Have a worker write verified chunk ``h`` into ``fd`` at ``offset`` — from the cache
        if it holds the chunk (nothing is added to it), else GET — and return once it is
        written: True if it was fetched. ModelfsError if it cannot be. No single flight:
        each delivery is its own."""
        flight = self._start(h, size, urgent=True, refetch=False, out=(fd, offset))
        await self._wait(flight)
        return bool(flight.result and flight.result.get("fetched"))

    async def peek(self, h: str, size: int, lo: int, hi: int) -> mmap.mmap | None:
        """Bytes [lo, hi) of chunk ``h`` for a small read, fetched and verified without the
        rest of the chunk (its block digests and the blocks that hold them), then the whole
        chunk loaded behind it (what is fetched is cached). None where that cannot be
        done or does not pay: whole chunks arrive fast (``_whole_chunk_seconds``), this
        one is on its way and due soon, or it cannot be read by blocks (zstd; named before
        block digests); the reader then waits for the whole chunk."""
        if self.config.sealed or self.registry is None:
            return None
        whole = self._whole_chunk_seconds()
        if whole is not None and whole < PEEK_WORTH:
            return None  # a near store: two small requests are no faster than the chunk
        if (loading := self._flights.get(h)) is not None and \
                (whole is None or whole - (time.monotonic() - loading.started) < PEEK_WORTH):
            return None  # the whole chunk is on its way, and soon here
        flight = self._start(h, size, urgent=True, refetch=False, span=(lo, hi))
        try:
            await self._wait(flight)
        except ModelfsError as e:  # the whole chunk's load says what is wrong, if anything is
            log.debug("chunk %s, bytes %d-%d: %s", h[:16], lo, hi, e)
            return None
        finally:
            self.prefetch(h, size)
        return flight.buffer

    def _whole_chunk_seconds(self) -> float | None:
        """How long a whole chunk takes to arrive lately (the median of the last fetches;
        None: too few yet). Peeks pay against a remote store, where a chunk takes a round
        trip plus tens of ms of transfer, not against one on this host, which sends 4 MiB
        in ~10 ms, no slower than two small requests that each pay its per-object cost."""
        recent = list(itertools.islice(reversed(self.stats.recent_latencies), PEEK_SAMPLE))
        return statistics.median(recent) if len(recent) >= PEEK_SAMPLE // 4 else None

    async def upload(self, fd: int, offset: int, size: int, what: str,
                     decide: Callable[[str], dict[str, Any]]) -> tuple[str, bool, int]:
        """Have a worker read ``size`` bytes at ``offset`` of ``fd``, hash them, and then do what
        ``decide(chunk id)`` says: ``{"skip": True}``, or HEAD ``"head"`` (the store has it:
        done), encode (zstd where it pays, unless ``"compress"`` is false) and PUT to
        ``"put"`` (none: a dry run). ``decide`` runs in this loop, once per upload.
        ``(id, uploaded, stored bytes)``; ModelfsError if it cannot be done. ``what`` names
        the piece in errors ("model.safetensors at byte 0")."""
        flight = _Flight("", size, urgent=True, refetch=False)  # the id comes with the worker's question
        flight.out, flight.decide, flight.what = (fd, offset), decide, what
        assert self._nursery is not None, "Lanes.run() is not running"
        self._nursery.start_soon(self._send, flight)
        await self._wait(flight)
        assert flight.result is not None
        return flight.result["h"], flight.result["uploaded"], flight.result["stored"]

    async def _answer(self, p: _Proc, rid: int, flight: _Flight, h: str) -> None:
        """An upload's worker knows the chunk's id: say what to do with it."""
        if flight.go is None:
            assert flight.decide is not None
            flight.h = h
            try:
                flight.go = flight.decide(h)
            except ModelfsError as e:  # e.g. a URL that cannot be signed: fail this upload
                flight.error, flight.go = e, {"skip": True}
        try:
            await p.sock.send(json.dumps({"id": rid, "go": True, **flight.go}).encode())
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

    def prefetch(self, h: str, size: int) -> None:
        """Start loading ``h`` (readahead); nobody waits for it."""
        if h not in self._flights and h not in self._confirmed:
            self._start(h, size, urgent=False, refetch=False)

    def page_in(self, h: str, size: int) -> None:
        """Read cached chunk ``h`` from disk into the page cache on a cache thread
        (readahead of a warm chunk; in a sealed cache, decrypt it into memory);
        nobody waits for it."""
        if h in self._paging or len(self._paging) >= (UNSEAL_AHEAD_MAX if self.config.sealed else PAGING_MAX):
            return
        if self.config.sealed and h in self._plain:
            return
        if not self.config.sealed and h in self._confirmed:
            return  # a worker wrote or re-checked it moments ago: its pages are in memory
        self._paging.add(h)
        assert self._nursery is not None, "Lanes.run() is not running"
        self._nursery.start_soon(self._page_in, h, size)

    async def _page_in(self, h: str, size: int) -> None:
        try:
            if await (self.unseal(h, size) if self.config.sealed else self.cache_call(self.cache.page_in, h)):
                self.stats.paged_in += 1
        except Exception as e:  # readahead only: the read itself will say what is wrong
            log.debug("paging in chunk %s: %s", h[:16], e)
        finally:
            self._paging.discard(h)

    def _start(self, h: str, size: int, *, urgent: bool, refetch: bool, pin: bool = False,
               out: tuple[int, int] | None = None, span: tuple[int, int] | None = None,
               early: bool = False) -> _Flight:
        flight = _Flight(h, size, urgent, refetch, pin)
        if out is None and span is None:  # a load: one per chunk (a delivery or a peek is its own)
            self._flights[h] = flight
        flight.out, flight.span = out, span
        flight.early = early and not self.config.sealed
        try:
            if self.registry is not None:
                flight.url = self.registry.store.presign(self.registry.chunk_key(h), URL_SECONDS)
        except ModelfsError as e:
            self._finish(flight, e)
            return flight
        assert self._nursery is not None, "Lanes.run() is not running"
        self._nursery.start_soon(self._send, flight)
        return flight

    async def _send(self, flight: _Flight) -> None:
        live = [p for p in self._procs if not p.dead]
        if not live:
            self._finish(flight, StoreError("no fetch worker is running (they keep failing: see the log)"))
            return
        p = min(live, key=lambda q: len(q.pending))
        self._next_id += 1
        rid = self._next_id
        p.pending[rid] = flight
        if flight.decide is not None:
            msg = {"id": rid, "up": True, "n": flight.size, "urgent": True}
        else:
            msg = {"id": rid, "h": flight.h, "n": flight.size, "url": flight.url, "urgent": flight.urgent,
                   "refetch": flight.refetch, "pin": flight.pin}
            if flight.span is not None:
                msg["lo"], msg["hi"] = flight.span
            if flight.early:
                msg["early"] = True
        try:
            if flight.out is None:
                await p.sock.send(json.dumps(msg).encode())
            else:
                fd, msg["at"] = flight.out
                await p.sock.sendmsg([json.dumps(msg).encode()],
                                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError:
            pass  # the worker is gone: _receive sees it and re-sends what it held

    async def _receive(self, p: _Proc) -> None:
        fd_space = socket.CMSG_SPACE(4)
        while True:
            try:
                data, anc, _, _ = await p.sock.recvmsg(MAX_MESSAGE, fd_space)
            except (OSError, trio.ClosedResourceError):
                data, anc = b"", []
            if not data:
                break
            reply = json.loads(data)
            if "ready" in reply:
                p.ready.set()
                continue
            if "ok" not in reply:  # an upload's question: its chunk's id
                if (asking := p.pending.get(reply["id"])) is not None:
                    await self._answer(p, reply["id"], asking, reply["h"])
                continue
            early = reply.get("early")  # a waiting reader's bytes, ahead of the commit: the flight goes on
            flight = p.pending.get(reply["id"]) if early else p.pending.pop(reply["id"], None)
            for level, kind, fds in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = int.from_bytes(fds[:4], sys.byteorder)
                    try:
                        if flight is not None and reply.get("spill"):
                            lo, hi = flight.span or (0, flight.size)
                            buf = mmap.mmap(fd, hi - lo, prot=mmap.PROT_READ)
                            if flight.span is None:
                                self._spilled[flight.h] = buf
                            if not early:  # an early one is for readers to find in _spilled
                                flight.buffer = buf
                    finally:
                        os.close(fd)
            if flight is not None and early:
                self.generation += 1  # servable now (and a refetch's old entry is gone): views renew
                flight.ready.set()
            elif flight is not None:
                self._on_reply(flight, reply)
        await self._on_death(p)

    def spilled(self, h: str) -> mmap.mmap | None:
        """A verified chunk the cache could not store (see ``spill_bytes``), if still held."""
        return self._spilled.get(h)

    def _on_reply(self, flight: _Flight, r: dict[str, Any]) -> None:
        st, flight.result = self.stats, r
        if flight.decide is not None:  # an upload
            self._finish(flight, flight.error or (None if r["ok"] else self._error(flight, r)))
            return
        if flight.span is not None:  # a peek: its failure is no reader's (see peek)
            st.peeks += r["ok"] and not r.get("none")
            flight.error = None if r["ok"] else self._error(flight, r)
            flight.done.set()
            return
        if r["ok"]:
            if r["fetched"]:
                st.fetches += 1
                st.bytes_fetched += flight.size
                st.fetch_seconds += r["took"]
                st.recent_latencies.append(r["took"])
            else:
                st.cache_hits += 1
            if flight.out is None:
                self._confirmed[flight.h] = True
                self.generation += 1
                if flight.early and not r.get("spill"):  # committed: readers find it in the cache now
                    self._spilled.pop(flight.h, None)
            self._finish(flight, None)
            if self.config.sealed and not flight.urgent:
                self.page_in(flight.h, flight.size)  # decrypt it ahead of its reader
            return
        self._finish(flight, self._error(flight, r))

    def _error(self, flight: _Flight, r: dict[str, Any]) -> ModelfsError:
        # the full chunk id, once: it is what finds the object in the store (the worker's
        # own message may start with the short form)
        kind, msg = r.get("kind"), r.get("msg", "").removeprefix(f"chunk {flight.h[:16]}: ")
        label = f"chunk {flight.h}" if not flight.what else \
            f"{flight.what} (chunk {flight.h})" if flight.h else flight.what
        if kind in ("http", "throttled", "unavailable") and r.get("status") is not None \
                and self.registry is not None and flight.h:
            err = self.registry.store.http_error(self.registry.chunk_key(flight.h), r["status"],
                                                 r.get("code") or "", msg)
            return err if isinstance(err, ModelfsError) else StoreError(str(err))
        if kind == "unavailable":
            return StoreUnavailableError(f"{label}: {msg}")
        if kind == "integrity":
            return IntegrityError(f"{label}: {msg}")
        if kind in ("write", "source"):
            return ModelfsError(f"{label}: {msg}")
        return StoreError(f"{label}: {msg}")

    def _finish(self, flight: _Flight, error: ModelfsError | None) -> None:
        if error is not None:
            self.stats.errors += 1
            # an awaited load's failure is reported by whoever awaits it (a reader's EIO
            # is logged with its file and offset; prefetch says it as its error): once
            log.log(logging.DEBUG if flight.urgent else logging.WARNING, "chunk %s: %s", flight.h, error)
            flight.error = error
        if self._flights.get(flight.h) is flight:
            del self._flights[flight.h]
        flight.done.set()
        flight.ready.set()

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
                await self._send(flight)

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

    async def unseal(self, h: str, size: int) -> bytes | memoryview | None:
        """Chunk ``h`` of a sealed cache (``--encrypt-cache``), decrypted: from memory, or
        decrypted on a cache thread (once for all who ask at the same time) and kept;
        None if the cache does not hold it. IntegrityError: a damaged entry.

        AES-GCM authenticates the whole entry and its id (the associated data), and the
        worker checked the id's keyed BLAKE3 before it wrote the entry: no hash here."""
        assert self.config.sealed and self.registry is not None
        while (raw := self._plain.get(h)) is None and (other := self._unsealing.get(h)) is not None:
            await other.wait()  # then look again: it may have failed, or found nothing
        if raw is not None:
            return raw
        codec, done = self.registry.codec, self._unsealing.setdefault(h, trio.Event())
        try:
            raw = await self.cache_call(self.cache.with_chunk, h,
                                        lambda v: codec.decode(v, h, size, check_id=False))
            if raw is not None:
                self._plain[h] = raw
            return raw
        finally:
            del self._unsealing[h]
            done.set()

    async def cache_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (an LMDB call) on a thread."""
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

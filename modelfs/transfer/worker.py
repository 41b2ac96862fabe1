"""A fetch worker process: GET a chunk, decode, verify, write it into the LMDB cache
(or into a file; or read one from a file and upload it).

The daemon starts a few of these (``python -m modelfs.transfer.worker``) so the
per-byte work of a cold read — receiving the body, zstd, BLAKE3, the LMDB
write — runs outside the FUSE process and its GIL, on as many cores as there
are workers. A worker imports neither boto3 nor trio: the daemon signs each
request (a presigned URL, valid for minutes), so credentials never leave it and
a worker stays small (~36 MB RSS at start, ~17 MB of it private). What it is asked and answers is :mod:`.protocol`.

SIGINT and SIGTERM are ignored (systemd signals the whole cgroup; the daemon ends
us through the socket). End of file on the socket: finish what is held, so a chunk
that was fetched is always cached (an unmount, SIGTERM or a crash of the daemon
never throws fetched bytes away); queued deliveries and uploads, which nobody waits
for any more, are dropped.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import gc
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import malloc
from ..cache import BlockCache, FetchLock
from ..errors import IntegrityError, UsageError
from ..format.chunking import BLOCK
from ..format.codec import ChunkCodec, block_span, check_blocks, check_head, check_raw, head_size
from .http import FetchFailed, HttpClient
from .tier import Tier, Via
from .protocol import (Connect, Deliver, Done, Early, Failed, Failure, Go, Key, Load, Named, Peek, Peeked,
                       ProtocolError, Ready, Reply, Upload, Uploaded, WorkerConfig, receive, send)

if TYPE_CHECKING:  # imported by an encrypted registry's worker only (~30 ms of a start)
    from ..format.encryption import RegistryKey

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_SECONDS = 10.0  # a thread without work this long frees its chunk buffer
PEEK_JOIN = 256 << 10  # blocks this close to a chunk's start come in one GET with its digests


class Worker:
    """One worker process's requests, served by ``threads`` threads.

    Invariants: a chunk is written only after its id check (with ``sealed``, its
    stored, encrypted form is what is written, after the check of what it decrypts
    to); a ``Done`` is sent only after the commit (an ``Early``, only after the id
    check); memory is bounded by ``threads`` chunk buffers, twice that with a cache tier (its
    client's and the store's; an idle thread frees its own); every descriptor that came
    with a request is closed once it is served.
    """

    def __init__(self, cfg: WorkerConfig, sock: socket.socket):
        self.cfg = cfg
        self.sock = sock
        self.cache = BlockCache(Path(cfg.cache_dir), cfg.cache_cap) if cfg.cache_dir else None
        self.codec = ChunkCodec(_receive_key(sock) if cfg.encrypted else None)
        self.http = HttpClient(cfg.timeouts)
        self.tier = Tier.of(cfg.tiers)  # None: every GET to the store
        # a peek's second GET (its chunk's digests), beside the first: threads with their own connections
        self.side = concurrent.futures.ThreadPoolExecutor(cfg.threads, thread_name_prefix="side")
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.send_lock = threading.Lock()
        self.seq = 0
        self.answers: dict[int, queue.SimpleQueue] = {}  # uploads waiting for the daemon's Go
        self.answers_lock = threading.Lock()
        self.closed = False

    def run(self) -> None:
        threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.cfg.threads)]
        for t in threads:
            t.start()
        self._send(Ready(os.getpid()))  # the daemon waits for this before it reports READY
        while True:
            try:
                msg, fd = receive(self.sock)
            except ProtocolError as e:
                log.error("%s: exiting", e)  # the daemon replaces a worker that exits
                break
            except OSError:
                msg, fd = None, None
            if msg is None:
                break
            if isinstance(msg, Connect):  # a connection per thread, opened beside the requests
                if self.tier is None:  # (with a tier, requests go to its nodes first)
                    for _ in range(self.cfg.threads):
                        self.side.submit(self.http.preconnect, msg.url)
                continue
            if isinstance(msg, Go):  # the answer an upload waits for
                with self.answers_lock:
                    waiting = self.answers.pop(msg.id, None)
                if waiting is not None:
                    waiting.put(msg)
                continue
            if not isinstance(msg, (Load, Peek, Deliver, Upload)):
                log.error("unexpected %s: exiting", type(msg).__name__)
                break
            self.seq += 1
            self.jobs.put((0 if msg.urgent else 1, self.seq, (msg, fd)))
        with self.answers_lock:  # no answer comes any more: uploads waiting for one give up
            self.closed = True
            for waiting in self.answers.values():
                waiting.put(None)
            self.answers.clear()
        for _ in threads:  # the daemon is gone or done: finish what we hold, then exit
            self.jobs.put((2, 1 << 62, None))
        for t in threads:
            t.join()

    def _work(self) -> None:
        lock = FetchLock(self.cache) if self.cache is not None else None
        while True:
            try:
                _, _, job = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:  # idle: hand the chunk buffer back (a mount may idle for days)
                self.http.drop_spares()
                if self.http.drop_buffer() | (self.tier is not None and self.tier.http.drop_buffer()):
                    malloc.trim()
                continue
            if job is None:
                return
            req, fd = job
            if self.closed and not isinstance(req, Load):  # nobody waits for it any more: drop it
                if fd is not None:
                    os.close(fd)
                continue
            spill: int | None = None
            try:
                if isinstance(req, Upload):
                    reply = self._upload(req, fd)
                elif isinstance(req, Peek):
                    reply, spill = self._peek(req)
                elif isinstance(req, Deliver):
                    reply = self._deliver(req, fd)
                elif lock is None:
                    raise FetchFailed(Failure.OTHER, "this fetch worker has no cache")
                else:
                    reply, spill = self._ensure(req, lock)
            except FetchFailed as e:
                reply = Failed(req.id, e.kind, str(e), e.status, e.code)
            except IntegrityError as e:
                reply = Failed(req.id, Failure.INTEGRITY, str(e))
            except Exception as e:  # a bug must not kill the worker: the reader gets EIO
                log.exception("chunk %s", getattr(req, "h", "?"))
                reply = Failed(req.id, Failure.OTHER, f"{type(e).__name__}: {e}")
            finally:
                if fd is not None:
                    os.close(fd)
            self._send(reply, spill)

    def _send(self, msg: Reply | Ready | Early | Named, fd: int | None = None) -> None:
        """Send ``msg`` (with ``fd``, which is closed here in any case)."""
        try:
            with self.send_lock:
                send(self.sock, msg, fd)
        except OSError:
            pass  # the daemon is gone; the chunk is cached all the same
        finally:
            if fd is not None:
                os.close(fd)

    def _deliver(self, req: Deliver, fd: int | None) -> Done:
        """Write verified chunk ``h`` into ``fd`` at offset ``at``: from the cache when it holds
        the chunk (block sums checked, as a mount serves it), else GET, decode and verify it."""
        h, n = req.h, req.n
        if fd is None:
            raise FetchFailed(Failure.OTHER, "a delivery needs a file descriptor")
        if self.cache is not None and not self.cfg.sealed and self.cache.reverify(h, n) and \
                self.cache.with_chunk(h, lambda view: _write_out(fd, view, req.at)):
            return Done(req.id, fetched=False, took=0.0)
        if not req.url:
            raise FetchFailed(Failure.OTHER, "no object store configured for this delivery")
        t0 = time.monotonic()
        _, raw, via = self._get_chunk(req)
        took = time.monotonic() - t0
        _write_out(fd, raw, req.at)
        return Done(req.id, fetched=True, took=took, **_via(via))

    def _get_chunk(self, req: Load | Deliver) -> tuple[memoryview, memoryview | bytes, Via]:
        """GET chunk ``req.h`` (the store's object; an adopted chunk's foreign range) and
        verify it: (the body, the raw chunk, where it came from)."""
        h, n, url = req.h, req.n, req.url
        assert url is not None
        if req.foreign_at is not None:  # not through the tier: it keeps chunk objects alone
            body = self.http.get(url, n, (req.foreign_at, req.foreign_at + n))
            return body, check_raw(body, h, n), Via()
        return self._get(h, url, self.codec.max_stored_size(n), lambda blob: self.codec.decode(blob, h, n))

    def _get(self, h: str, url: str, limit: int, check: Callable[[memoryview], T],
             span: tuple[int, int] | None = None) -> tuple[memoryview, T, Via]:
        """GET ``url`` — through the cache tier first, if there is one — and ``check`` the
        body (it raises IntegrityError on bad bytes): (body, what check made of it, where
        it came from)."""
        if self.tier is not None:
            return self.tier.fetch(h, url, limit, check, self.http, span)
        body = self.http.get(url, limit, span)
        return body, check(body), Via()

    def _peek(self, req: Peek) -> tuple[Peeked, int | None]:
        """Bytes [lo, hi) of chunk ``h`` without the rest of it (see :meth:`_peek_by`):
        through the cache tier if there is one (its node then holds the whole chunk), from
        the store directly if what the tier gave does not check out."""
        tier = self.tier
        if tier is None:
            return self._peek_by(req, self.http.get)
        vias: list[Via] = []

        def through(url: str, limit: int, span: tuple[int, int]) -> memoryview:
            body, _, via = tier.fetch(req.h, url, limit, lambda b: b, self.http, span)
            vias.append(via)
            return body
        try:
            reply, fd = self._peek_by(req, through)
            bad = 0
        except IntegrityError as e:
            log.warning("a bad range of chunk %s from the cache tier (%s): from the store", req.h[:16], e)
            reply, fd = self._peek_by(req, self.http.get)
            vias, bad = [v for v in vias if not v.tier], 1
        merged = Via(tier=any(v.tier for v in vias), hit=any(v.hit for v in vias),
                     fallbacks=sum(v.fallbacks for v in vias), bad=bad)
        return dataclasses.replace(reply, **_via(merged)), fd

    def _peek_by(self, req: Peek, get: Callable[[str, int, tuple[int, int]], memoryview]
                 ) -> tuple[Peeked, int | None]:
        """Bytes [lo, hi) of chunk ``h`` without the rest of it: GET (with ``get``) its header
        and block digests and the blocks that hold them (one GET when they lie near the
        start), check the digests against the id and the blocks against the digests, and
        hand the bytes over as a memfd. ``none``: the chunk cannot be read so (zstd, or named
        before block digests); nothing is cached (the daemon loads the whole chunk)."""
        h, n, lo, hi, url = req.h, req.n, req.lo, req.hi, req.url
        if not url:
            raise FetchFailed(Failure.OTHER, "no object store configured for this mount")
        if req.foreign_at is not None:  # no block digests in another store's object: load it whole
            return Peeked(req.id, none=True), None
        t0 = time.monotonic()
        head_n = head_size(n)
        first, a, b = block_span(lo, hi, n)
        if a - head_n <= PEEK_JOIN:
            body = get(url, b, (0, b))
            digests = check_head(body[:head_n], h, n)
            blocks = body[a:b]
        else:  # the digests and the blocks side by side: a store's latency once, not twice
            head = self.side.submit(lambda: bytes(get(url, head_n, (0, head_n))))
            try:
                blocks, failed = get(url, b - a, (a, b)), None
            except FetchFailed as e:  # e.g. past the end of a zstd chunk: the head says
                blocks, failed = b"", e
            digests = check_head(head.result(), h, n)
            if digests is not None and failed is not None:
                raise failed
        if digests is None:
            return Peeked(req.id, none=True), None
        if len(blocks) != b - a:
            raise IntegrityError(f"chunk {h[:16]}: {len(blocks)} bytes where blocks of {b - a} were asked for")
        check_blocks(blocks, first, digests, h)
        skip = lo - first * BLOCK
        return Peeked(req.id, took=time.monotonic() - t0), _memfd(blocks[skip:skip + hi - lo])

    def _upload(self, req: Upload, fd: int | None) -> Uploaded:
        """Read the chunk at ``at`` of ``fd`` (a file being published), tell the daemon its id,
        and on its answer HEAD it (present: nothing to send), encode and PUT it. The id is
        computed from the very bytes that are sent: an object in the store always matches
        its name, even if the file changes meanwhile (its SHA-256 check then fails)."""
        at, n = req.at, req.n
        if fd is None:
            raise FetchFailed(Failure.OTHER, "an upload needs a file descriptor")
        raw, got = self.http.buffer(n), 0
        while got < n:
            try:
                k = os.preadv(fd, [raw[got:]], at + got)
            except OSError as e:
                raise FetchFailed(Failure.SOURCE, f"cannot read it: {e.strerror}") from None
            if not k:
                raise FetchFailed(Failure.SOURCE, f"the file ended at {at + got}: it changed while being published")
            got += k
        h, digests = self.codec.name(raw)
        go = self._ask(Named(req.id, h))
        t0 = time.monotonic()
        if go.skip or (go.head and self.http.exists(go.head)):
            return Uploaded(req.id, h, uploaded=False, stored=0, took=0.0)
        parts = self.codec.encode_parts(raw, h, go.compress, digests)
        if go.put:
            self.http.put(go.put, parts)
        return Uploaded(req.id, h, uploaded=True, stored=sum(len(p) for p in parts), took=time.monotonic() - t0)

    def _ask(self, question: Named) -> Go:
        """Send ``question`` and wait for the daemon's answer to it."""
        answer: queue.SimpleQueue = queue.SimpleQueue()
        with self.answers_lock:
            if self.closed:
                raise FetchFailed(Failure.OTHER, "the daemon is gone")
            self.answers[question.id] = answer
        self._send(question)
        go = answer.get()
        if go is None:
            raise FetchFailed(Failure.OTHER, "the daemon is gone")
        return go

    def _ensure(self, req: Load, lock: FetchLock) -> tuple[Done, int | None]:
        reply, spill = self._load(req, lock)
        if req.pin and spill is None:
            # the reader saw this chunk evicted right after an earlier load: hand it the
            # bytes themselves, so it makes progress however small the cache is
            h, n = req.h, req.n
            assert self.cache is not None
            spill = self.cache.with_chunk(h, (lambda v: _memfd(self.codec.decode(v, h, n))) if self.cfg.sealed
                                          else _memfd)
            if spill is None:  # evicted again already: fetch it and hand it over
                reply, spill = self._load(req, lock, refetch=True, keep=True)
            else:
                reply = Done(reply.id, reply.fetched, reply.took, spill=True)
        return reply, spill

    def _load(self, req: Load, lock: FetchLock, *, refetch: bool = False,
              keep: bool = False) -> tuple[Done, int | None]:
        """Chunk ``h`` into the cache (``keep``: and its bytes as a memfd, whatever the cache does)."""
        assert self.cache is not None
        h, n = req.h, req.n
        if req.refetch or refetch:
            self.cache.delete([h])
        elif self.cache.reverify(h, None if self.cfg.sealed else n):
            return Done(req.id, fetched=False, took=0.0), None
        if not req.url:
            raise FetchFailed(Failure.OTHER, "no object store configured for this mount")
        lock.acquire(h)
        try:
            if self.cache.has(h) and not keep:  # another process fetched it while we waited
                return Done(req.id, fetched=False, took=0.0), None
            t0 = time.monotonic()
            blob, raw, via = self._get_chunk(req)
            took = time.monotonic() - t0
            if req.early:  # a reader waits for these bytes: not for the commit too
                self._send(Early(req.id), _memfd(raw))
            if not self.cache.write([(h, memoryview(blob) if self.cfg.sealed else raw)]) or keep:
                # a full or failing cache disk must not fail the reader (nor may a cache
                # too small to keep it): hand the verified bytes over in memory, a memfd
                return Done(req.id, fetched=True, took=took, spill=True, **_via(via)), _memfd(raw)
            return Done(req.id, fetched=True, took=took, **_via(via)), None
        finally:
            lock.release(h)


def _via(via: Via) -> dict:
    """A reply's fields that say where its bytes came from."""
    return {"tier": via.tier, "hit": via.hit, "fallbacks": via.fallbacks, "bad": via.bad}


def _receive_key(sock: socket.socket) -> RegistryKey:
    """The registry key, the daemon's first message (see the protocol above)."""
    try:
        msg, fd = receive(sock)
        if fd is not None:
            os.close(fd)
        if msg is None:  # started early by a daemon that then failed: nothing to do
            raise SystemExit(0)
        if not isinstance(msg, Key):
            raise ValueError(type(msg).__name__)
        from ..format.encryption import RegistryKey

        return RegistryKey(base64.b64decode(msg.secret, validate=True))
    except (ValueError, OSError, ProtocolError, UsageError):
        raise SystemExit("modelfs worker: the daemon did not send a registry key") from None


def _write_out(fd: int, data: bytes | memoryview, at: int) -> bool:
    """All of ``data`` into ``fd`` at offset ``at`` (a destination's error: FetchFailed)."""
    view, done = memoryview(data), 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], at + done)
    except OSError as e:
        raise FetchFailed(Failure.WRITE, f"cannot write it into the destination file: {e.strerror}") from None
    return True


def _memfd(data: bytes | memoryview) -> int:
    """An anonymous in-memory file holding ``data`` (for the daemon to map read-only)."""
    fd = os.memfd_create("modelfs-chunk", os.MFD_CLOEXEC)
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return fd


def _bound_malloc() -> None:
    """Let glibc reuse freed chunk-sized buffers instead of mapping fresh zeroed memory
    for each: LMDB's dirty pages and the GET buffers are multi-MiB allocations, and
    with the default (dynamic) mmap threshold each one costs page faults and a
    munmap. Measured: LMDB put+commit 2.1 → 0.4 CPU-s/GB. Memory stays bounded by
    the few buffers each of the few threads holds (and the arena cap)."""
    malloc.tune(mmap_threshold=64 << 20, trim_threshold=256 << 20, arena_max=2)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("MODELFS_LOG_LEVEL", "warning").upper(),
                        format="modelfs worker %(process)d: %(levelname)s %(message)s")
    _bound_malloc()
    cfg = WorkerConfig.from_json(sys.argv[1])
    sock = socket.socket(fileno=int(sys.argv[2]))
    worker = Worker(cfg, sock)
    gc.freeze()  # imports stay: full collections need not walk them (as the daemon does)
    worker.run()


if __name__ == "__main__":
    main()

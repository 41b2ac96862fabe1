"""Requests to presigned URLs from a fetch worker: GET (whole or ranged), HEAD, PUT.

``http.client`` on one kept-alive connection per thread and host: no boto3 (the
daemon signs every URL, so a worker holds no credentials), and no copy of a body
past the thread's reused buffer. Retries follow the store's answers (throttling,
5xx, resets, timeouts) with the same bound as boto3's in the daemon
(:class:`~modelfs.config.Timeouts`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..config import Timeouts
from .protocol import MAX_MESSAGE, Failure

T = TypeVar("T")

SPARE_SECONDS = 10.0  # a connection opened ahead and not taken by then is closed, not used (stores drop idle ones)


class FetchFailed(Exception):
    """A request that failed, and why (a worker sends it on as a ``Failed`` reply)."""

    def __init__(self, kind: Failure, msg: str, status: int | None = None, code: str = ""):
        super().__init__(msg)
        self.kind, self.status, self.code = kind, status, code


class HttpClient:
    """Requests to presigned URLs (GET, HEAD, PUT) over one kept-alive connection per
    thread and host. Each GET body lands in its thread's buffer, which an upload also
    reads its chunk into (reused: a fresh zeroed 4 MiB per chunk cost 0.66 vs 0.57
    CPU-s/GB of GETs, medians of five interleaved rounds)."""

    def __init__(self, timeouts: Timeouts):
        self.timeouts = timeouts
        self.local = threading.local()
        self.spares: dict[tuple[str, str, int | None], list[tuple[float, http.client.HTTPConnection]]] = {}
        self.spares_lock = threading.Lock()
        self.ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)

    def _conn(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        conns = self.local.__dict__.setdefault("conns", {})
        key = (scheme, host, port)
        c = conns.get(key)
        if c is None:
            c = conns[key] = self._spare(key) or self._new(*key)
        return c

    def _new(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeouts.connect, context=self.ssl)
        return http.client.HTTPConnection(host, port, timeout=self.timeouts.connect)

    def _open(self, c: http.client.HTTPConnection) -> None:
        """Connect ``c`` (the connect timeout), then wait at most the read timeout for each answer."""
        c.connect()
        assert c.sock is not None
        c.sock.settimeout(self.timeouts.read)

    def preconnect(self, url: str) -> None:
        """Open a connection to ``url``'s origin for the first thread that has none there, so
        its first request does not wait for TCP's round trip (and TLS's). Best effort: a
        connection that fails is left to that request, which says what failed."""
        u = urlsplit(url)
        key = (u.scheme, u.hostname or "", u.port)
        c = self._new(*key)
        try:
            self._open(c)
        except (OSError, http.client.HTTPException):
            c.close()
            return
        with self.spares_lock:
            self.spares.setdefault(key, []).append((time.monotonic(), c))

    def _spare(self, key: tuple[str, str, int | None]) -> http.client.HTTPConnection | None:
        """A connection :meth:`preconnect` opened to ``key``'s origin lately, if one is left."""
        with self.spares_lock:
            spares = self.spares.get(key, [])
            while spares:
                at, c = spares.pop()
                if time.monotonic() - at < SPARE_SECONDS:
                    return c
                c.close()
        return None

    def drop_spares(self) -> None:
        """Close the connections opened ahead that no thread took."""
        with self.spares_lock:
            spares, self.spares = self.spares, {}
        for conns in spares.values():
            for _, c in conns:
                c.close()

    def get(self, url: str, limit: int, span: tuple[int, int] | None = None,
            headers: dict[str, str] | None = None) -> memoryview:
        """The body (at most ``limit`` bytes; with ``span``, of bytes [start, end) of the
        object: fewer where it is shorter), retried on connection errors, 5xx and
        throttling: a view of this thread's buffer, valid until the thread's next ``get``
        or ``buffer``. ``headers``: sent besides (never signed ones: a presigned URL's
        signature covers only its host)."""
        return self._retried(self._get_once, url, limit, span, headers)

    def last_header(self, name: str) -> str | None:
        """Header ``name`` of this thread's last GET answer (None: absent)."""
        msg = self.local.__dict__.get("headers")
        return msg.get(name) if msg is not None else None

    def exists(self, url: str) -> bool:
        """Whether a HEAD of ``url`` finds the object (200) or not (404); retried as ``get``."""
        return self._retried(self._head_once, url)

    def put(self, url: str, parts: tuple[bytes | memoryview, ...]) -> None:
        """PUT the concatenation of ``parts`` (sent one after another, not joined); retried
        as ``get`` (a PUT of a chunk is idempotent: same id, same bytes)."""
        self._retried(self._put_once, url, parts)

    def drop_buffer(self) -> bool:
        """Free this thread's buffer (an idle thread); True if it held one."""
        return self.local.__dict__.pop("buf", None) is not None

    def buffer(self, n: int) -> memoryview:
        """``n`` bytes of this thread's buffer (what ``get`` returns its body in)."""
        buf = self.local.__dict__.get("buf")
        if buf is None or len(buf) < n:
            buf = self.local.buf = bytearray(n)
        return memoryview(buf)[:n]

    def _retried(self, once: Callable[..., T], *args: Any) -> T:
        delay = 0.1
        for attempt in range(1, self.timeouts.attempts + 1):
            try:
                return once(*args)
            except FetchFailed as e:
                if e.kind not in (Failure.UNAVAILABLE, Failure.THROTTLED) or attempt == self.timeouts.attempts:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _exchange(self, url: str) -> Iterator[tuple[http.client.HTTPConnection, str]]:
        """The connection for ``url`` and the request target; a connection error, or one
        the body of the block raises, closes it and becomes a FetchFailed."""
        u = urlsplit(url)
        c = self._conn(u.scheme, u.hostname or "", u.port)
        where = f"{u.scheme}://{u.netloc}"
        try:
            if c.sock is None:
                self._open(c)
            yield c, f"{u.path}?{u.query}" if u.query else u.path
        except FetchFailed:
            c.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            c.close()
            if isinstance(e, (TimeoutError, socket.timeout)):
                raise FetchFailed(Failure.UNAVAILABLE, f"{where} did not answer in time") from None
            raise FetchFailed(Failure.UNAVAILABLE, f"connection to {where} failed: {e}") from None

    @staticmethod
    def _refused(r: http.client.HTTPResponse) -> FetchFailed:
        """The FetchFailed for an error answer (its S3 error code read from the body)."""
        body = r.read(MAX_MESSAGE)
        code = m.group(1).decode(errors="replace") if (m := re.search(rb"<Code>([^<]{1,64})</Code>", body)) else ""
        kind = Failure.THROTTLED if r.status in (429, 503) else Failure.UNAVAILABLE if r.status >= 500 else Failure.HTTP
        return FetchFailed(kind, f"HTTP {r.status} {code}".strip(), r.status, code)

    def _get_once(self, url: str, limit: int, span: tuple[int, int] | None,
                  headers: dict[str, str] | None = None) -> memoryview:
        with self._exchange(url) as (c, target):
            sent = dict(headers or {})
            if span:
                sent["Range"] = f"bytes={span[0]}-{span[1] - 1}"
            c.request("GET", target, headers=sent)
            r = c.getresponse()
            self.local.headers = r.msg
            if r.status not in ((206,) if span else (200, 206)):  # a server that ignores Range: refused
                raise self._refused(r)
            n = int(r.getheader("Content-Length") or -1)
            if not 0 <= n <= limit:
                raise FetchFailed(Failure.INTEGRITY, f"object of {n} bytes where at most {limit} were expected")
            view, got = self.buffer(n), 0
            while got < n:
                k = r.readinto(view[got:])
                if not k:
                    raise http.client.IncompleteRead(bytes(0), n - got)
                got += k
            return view

    def _head_once(self, url: str) -> bool:
        with self._exchange(url) as (c, target):
            c.request("HEAD", target)
            r = c.getresponse()
            if r.status not in (200, 404):
                raise self._refused(r)
            r.read()
            return r.status == 200

    def _put_once(self, url: str, parts: tuple[bytes | memoryview, ...]) -> None:
        with self._exchange(url) as (c, target):
            c.putrequest("PUT", target, skip_accept_encoding=True)
            # no Content-Type: a SigV2 URL (what botocore presigns for a custom endpoint) signs it empty
            c.putheader("Content-Length", str(sum(len(p) for p in parts)))
            c.endheaders()
            for p in parts:
                c.send(p)
            r = c.getresponse()
            if r.status != 200:
                raise self._refused(r)
            r.read()

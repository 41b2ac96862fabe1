"""A thin, thread-safe object store over one shared boto3 client.

Everything above this module speaks in keys and bytes; botocore's exceptions
are translated here, once, into :mod:`modelfs.errors` with messages a user can
act on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ..config import StoreConfig
from ..errors import AccessDeniedError, NotFoundError, StoreError, StoreUnavailableError

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


@cache
def _errors() -> tuple[type[Exception], ...]:
    """What a boto3 call raises: its own errors, S3's error answers, and answers it
    cannot parse (imported when first needed: boto3 costs ~0.2 s of a start)."""
    import botocore.exceptions
    import botocore.parsers

    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            botocore.parsers.ResponseParserError)


def _speaks_s3(headers: dict, code: str) -> bool:
    """Whether an error answer came from an S3 store: S3 explains every error of a GET
    in an XML body (botocore then has a named code, not just the status) and stamps
    its answers with ``x-amz-*`` ids; a plain web server does neither."""
    return not code.isdigit() or any(h.lower().startswith("x-amz-") for h in headers)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # POSIX seconds
    etag: str | None = None  # from a HEAD (stat): an object written in one PUT has its MD5 here


class Store:
    """One bucket of an S3-compatible store.

    The boto3 client is made on first use (:meth:`connect`), not here: a mount that
    starts from its cache serves before it needs the store, and boto3's import and
    client (~0.3 s) would otherwise be most of its start."""

    # called once this process has made its first client, before its first request: a mount's
    # helper, resolving ahead of its daemon, tells the daemon then that the start is cold
    # (mount/resolving.py)
    on_first_client: ClassVar[Callable[[Store], None] | None] = None

    def __init__(self, bucket: str, config: StoreConfig | None = None):
        self.bucket = bucket
        self.config = config or StoreConfig()
        self._client: Any = None
        # a custom endpoint (path-style addressing), else AWS's for the region
        self._custom: str | None = self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._endpoint = self._custom
        region = self.config.region or os.environ.get("AWS_DEFAULT_REGION")
        if self._endpoint is None and region and not self.config.profile:
            self._endpoint = f"https://s3.{region}.amazonaws.com"
        self._lock = threading.Lock()
        self._hung: tuple[float, StoreUnavailableError] | None = None  # (until, the error it gave)
        self._signed: dict[str, tuple[str, float]] = {}  # key → (a GET URL signed elsewhere, valid until)

    @property
    def endpoint(self) -> str:
        """The store's URL (for messages and cache records); for AWS with a region only a
        profile names, the client is made to learn it."""
        if self._endpoint is None:
            self.connect()
        assert self._endpoint is not None
        return self._endpoint

    @property
    def connected(self) -> bool:
        """Whether the client was made (a request was sent, or is about to be)."""
        return self._client is not None

    @property
    def client(self) -> Any:
        return self._client if self._client is not None else self.connect()

    def connect(self) -> Any:
        """The shared boto3 client, made now if not yet (thread-safe; no request is sent)."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
                hook, Store.on_first_client = Store.on_first_client, None
                if hook is not None:
                    hook(self)
            return self._client

    def _make_client(self) -> Any:
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.handlers

        config = self.config
        try:  # a bad profile or an unparsable config/credentials file fails here
            session = boto3.session.Session(profile_name=config.profile)
            region = config.region or session.region_name or "us-east-1"
            if self._endpoint is None:
                self._endpoint = f"https://s3.{region}.amazonaws.com"
            bc = botocore.config.Config(
                max_pool_connections=config.concurrency + 4,
                connect_timeout=config.timeouts.connect,
                read_timeout=config.timeouts.read,
                retries={"max_attempts": config.timeouts.attempts, "mode": "standard"},
                # Chunks carry their own BLAKE3 hash, verified end to end: the extra
                # CRC that newer botocore adds to every request is pure CPU cost.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if self._custom else None,
                tcp_keepalive=True,
            )
            client = session.client("s3", endpoint_url=self._custom, region_name=region, config=bc)
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"cannot configure the S3 client: {e}") from None
        # A PUT's body goes with its headers: botocore's "Expect: 100-continue" would wait a
        # round trip for the store's go-ahead first (two per PUT; manifests, tags and leases
        # are small, chunks go through presigned URLs, not this client)
        client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        return client

    # -- error translation -------------------------------------------------

    def _fail(self, e: Exception, what: str) -> Exception:
        err = self._translate(e, what)
        if isinstance(err, StoreUnavailableError) and self._timed_out(e):
            # a store that let a request run out of time is not asked again for as long as a
            # request may take: a command's requests in sequence then fail at once, so the
            # whole command keeps the bound one request has (docs/reliability.md)
            self._hung = (time.monotonic() + self.config.timeouts.request_bound(), err)
        return err

    def _check_hung(self) -> None:
        """Fail at once while the store is known not to answer (see :meth:`_fail`)."""
        hung = self._hung
        if hung is not None:
            if time.monotonic() < hung[0]:
                raise StoreUnavailableError(str(hung[1]))
            self._hung = None

    @staticmethod
    def _timed_out(e: Exception) -> bool:
        import botocore.exceptions

        return isinstance(e, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError))

    def _translate(self, e: Exception, what: str) -> Exception:
        import botocore.exceptions
        import botocore.parsers

        where = f"s3://{self.bucket}/{what}"
        c = self.config.timeouts
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            meta = e.response.get("ResponseMetadata", {})
            status, code = meta.get("HTTPStatusCode"), str(err.get("Code", ""))
            if not e.operation_name.startswith("Head") and not _speaks_s3(meta.get("HTTPHeaders", {}), code):
                return self._not_s3(f"HTTP {status} for {where}")
            return self.http_error(what, status, code, str(err.get("Message", e)))
        if isinstance(e, botocore.parsers.ResponseParserError):
            return self._not_s3(f"an answer for {where} that is not S3's XML")
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                              "or AWS_PROFILE")
        tries = f"{c.attempts} attempt{'s' if c.attempts > 1 else ''}"
        if isinstance(e, botocore.exceptions.ConnectTimeoutError):
            return StoreUnavailableError(
                f"cannot reach the object store at {self.endpoint}: no connection within "
                f"{c.connect:g} s ({tries}; --connect-timeout, --attempts)")
        if isinstance(e, botocore.exceptions.EndpointConnectionError):
            return StoreUnavailableError(f"cannot reach the object store at {self.endpoint}: {e}")
        if isinstance(e, botocore.exceptions.ReadTimeoutError):
            return StoreUnavailableError(
                f"the object store at {self.endpoint} accepted the connection but did not answer "
                f"within {c.read:g} s ({tries}) for {where}; if it is only slow, raise "
                "--read-timeout or --attempts")
        if isinstance(e, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return StoreUnavailableError(f"{where}: connection to the object store failed: {e}")
        return StoreError(f"{where}: {e}")

    def _not_s3(self, what: str) -> StoreError:
        return StoreError(f"the endpoint {self.endpoint} does not speak S3 ({what}, without an S3 "
                          "error or request id): check --endpoint-url / $AWS_ENDPOINT_URL")

    def http_error(self, what: str, status: int | None, code: str, message: str) -> Exception:
        """The error for an S3 error answer, whoever made the request (boto3 here, or a
        fetch worker with a presigned URL): one mapping, one set of messages."""
        where = f"s3://{self.bucket}/{what}"
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
        if code in _MISSING or status == 404:
            return NotFoundError(f"{where} not found")
        if code in _DENIED or status == 403:
            return AccessDeniedError(
                f"access denied to {where} ({code or status}): check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and permissions"
            )
        cls = StoreUnavailableError if isinstance(status, int) and (status >= 500 or status == 429) \
            else StoreError
        return cls(f"{where}: {code or status}: {message}")

    # -- operations ----------------------------------------------------------

    def origin(self) -> str:
        """Where this store's objects are asked for (``scheme://host[:port]``), as the URLs
        it signs say (a virtual-hosted bucket's host names the bucket)."""
        u = urlsplit(self.presign("origin", 60))
        return f"{u.scheme}://{u.netloc}"

    def adopt_signed(self, urls: dict[str, str], valid_until: float) -> None:
        """GET URLs of ``urls``' keys that another process signed with this store's
        credentials (a mount's helper: mount/resolving.py), valid until ``valid_until``
        (POSIX time). :meth:`presign` hands them out while they outlive what it is asked
        for, so a daemon serves its first cold reads before it has a client of its own."""
        self._signed.update((k, (u, valid_until)) for k, u in urls.items())

    def presign(self, key: str, expires: int = 900, method: str = "GET") -> str:
        """A ``GET``, ``HEAD`` or ``PUT`` URL for ``key`` that works without credentials for
        ``expires`` seconds (for the fetch workers, which hold none). Signing is local:
        no request. A PUT URL signs no payload hash: chunks carry their own id."""
        if method == "GET" and (signed := self._signed.get(key)) is not None and signed[1] - time.time() >= expires:
            return signed[0]
        op = {"GET": "get_object", "HEAD": "head_object", "PUT": "put_object"}[method]
        try:
            return self.client.generate_presigned_url(op, Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=expires, HttpMethod=method)
        except _errors() as e:
            raise self._fail(e, key) from None

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or bytes [start, end) of it."""
        self._check_hung()
        kw = {}
        if start is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **kw)
            return resp["Body"].read()
        except _errors() as e:
            raise self._fail(e, key) from None

    def download(self, key: str, sink: Callable[[bytes], None], piece: int = 1 << 20) -> int:
        """Stream the object into ``sink``, ``piece`` bytes at a time (never whole in
        memory): the bytes it had."""
        self._check_hung()
        n = 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            for data in body.iter_chunks(piece):
                sink(data)
                n += len(data)
        except _errors() as e:
            raise self._fail(e, key) from None
        return n

    def download_parts(self, key: str, size: int, sink: Callable[[bytes], None], part: int, ahead: int) -> int:
        """Bytes [0, size) of the object into ``sink``, in order, as ranged GETs of ``part``
        bytes with ``ahead`` of them in flight: one TCP stream gets a share of a far link,
        not the link (and a large object read alone would be one stream). At most
        ``ahead + 1`` parts are held (in flight, and the one being sunk). A part that comes
        back short (the object shrank) ends the download: the bytes sunk are returned,
        fewer than ``size``."""
        offsets = iter(range(0, size, part))
        n = 0
        with concurrent.futures.ThreadPoolExecutor(ahead, thread_name_prefix="part") as pool:
            try:
                inflight = collections.deque(pool.submit(self.get, key, o, min(o + part, size))
                                             for o in itertools.islice(offsets, ahead))
                while inflight:
                    data = inflight.popleft().result()
                    if len(data) != min(part, size - n):
                        break
                    o = next(offsets, None)
                    if o is not None:
                        inflight.append(pool.submit(self.get, key, o, min(o + part, size)))
                    sink(data)
                    n += len(data)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return n

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._check_hung()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except _errors() as e:
            raise self._fail(e, key) from None

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and store-side modification time, or None if it is absent."""
        self._check_hung()
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except _errors() as e:
            err = self._fail(e, key)
            if isinstance(err, NotFoundError):
                return None
            raise err from None
        return ObjectInfo(key, r["ContentLength"], r["LastModified"].timestamp(), r.get("ETag", "").strip('"') or None)

    def delete(self, key: str) -> None:
        self._check_hung()
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except _errors() as e:
            raise self._fail(e, key) from None

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[ObjectInfo | str]:
        """Objects under ``prefix``; with a delimiter, common prefixes come as ``str``."""
        self._check_hung()
        kw = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                for cp in page.get("CommonPrefixes", ()):
                    yield cp["Prefix"]
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"], obj["Size"], obj["LastModified"].timestamp())
        except _errors() as e:
            raise self._fail(e, prefix) from None

    def check_bucket(self) -> None:
        """Fail early, with a clear message, on a missing bucket or bad credentials."""
        self._check_hung()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _errors() as e:
            err = self._fail(e, "")
            if isinstance(err, NotFoundError):
                # A HEAD answer has no body to tell an S3 store from any web server: ask
                # once more with a GET, whose error an S3 store always explains.
                try:
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                    return
                except _errors() as e2:
                    err = self._fail(e2, "")
                if isinstance(err, NotFoundError):
                    err = StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
            raise err from None

"""A thin, thread-safe object store over one shared boto3 client.

Everything above this module speaks in keys and bytes; botocore's exceptions
are translated here, once, into :mod:`modelfs.errors` with messages a user can
act on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions

from .config import StoreConfig
from .errors import NotFoundError, StoreError, StoreUnavailableError

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # POSIX seconds


class Store:
    """One bucket of an S3-compatible store."""

    def __init__(self, bucket: str, config: StoreConfig | None = None):
        self.bucket = bucket
        self.config = config = config or StoreConfig()
        try:  # a bad profile or an unparsable config/credentials file fails here
            session = boto3.session.Session(profile_name=config.profile)
            endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            region = config.region or session.region_name or "us-east-1"
            self.endpoint = endpoint or f"https://s3.{region}.amazonaws.com"
            bc = botocore.config.Config(
                max_pool_connections=config.concurrency + 4,
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                retries={"max_attempts": config.max_attempts, "mode": "standard"},
                # Chunks carry their own BLAKE3 hash, verified end to end: the extra
                # CRC that newer botocore adds to every request is pure CPU cost.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if endpoint else None,
                tcp_keepalive=True,
            )
            self.client = session.client("s3", endpoint_url=endpoint, region_name=region, config=bc)
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"cannot configure the S3 client: {e}") from None

    # -- error translation -------------------------------------------------

    def _fail(self, e: Exception, what: str) -> Exception:
        where = f"s3://{self.bucket}/{what}"
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            return self.http_error(what, e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                                   str(err.get("Code", "")), str(err.get("Message", e)))
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                              "or AWS_PROFILE")
        if isinstance(e, (botocore.exceptions.EndpointConnectionError,
                          botocore.exceptions.ConnectTimeoutError)):
            return StoreUnavailableError(f"cannot reach the object store at {self.endpoint}: {e}")
        if isinstance(e, botocore.exceptions.ReadTimeoutError):
            return StoreUnavailableError(f"{where}: the object store did not answer in time")
        if isinstance(e, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return StoreUnavailableError(f"{where}: connection to the object store failed: {e}")
        return StoreError(f"{where}: {e}")

    def http_error(self, what: str, status: int | None, code: str, message: str) -> Exception:
        """The error for an S3 error answer, whoever made the request (boto3 here, or a
        fetch worker with a presigned URL): one mapping, one set of messages."""
        where = f"s3://{self.bucket}/{what}"
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
        if code in _MISSING or status == 404:
            return NotFoundError(f"{where} not found")
        if code in _DENIED or status == 403:
            return StoreError(
                f"access denied to {where} ({code or status}): check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and permissions"
            )
        cls = StoreUnavailableError if isinstance(status, int) and (status >= 500 or status == 429) \
            else StoreError
        return cls(f"{where}: {code or status}: {message}")

    # -- operations ----------------------------------------------------------

    def presign(self, key: str, expires: int = 900) -> str:
        """A GET URL for ``key`` that works without credentials for ``expires`` seconds
        (for the fetch workers, which hold no credentials). Signing is local: no request."""
        try:
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=expires)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(e, key) from None

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or bytes [start, end) of it."""
        kw = {}
        if start is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **kw)
            return resp["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(e, key) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(e, key) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            err = self._fail(e, key)
            if isinstance(err, NotFoundError):
                return False
            raise err from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(e, key) from None

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[ObjectInfo | str]:
        """Objects under ``prefix``; with a delimiter, common prefixes come as ``str``."""
        kw = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                for cp in page.get("CommonPrefixes", ()):
                    yield cp["Prefix"]
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"], obj["Size"], obj["LastModified"].timestamp())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._fail(e, prefix) from None

    def check_bucket(self) -> None:
        """Fail early, with a clear message, on a missing bucket or bad credentials."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            err = self._fail(e, "")
            if isinstance(err, NotFoundError):
                err = StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
            raise err from None

"""Parsing of registry and model references.

    s3://bucket/prefix                  a registry
    s3://bucket/prefix/NAME[@SELECTOR]  a model; SELECTOR is a tag or a version id
                                        (``latest`` when omitted)

Names, tags and version ids become S3 key components, so they are checked
against a strict pattern here, once, before they reach any key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9a-f]{20}$")
DEFAULT_TAG = "latest"


def check_name(name: str, what: str = "model name") -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


RESERVED_TAGS = {"versions"}  # a directory of its own in a mounted registry


def check_tag(tag: str) -> str:
    check_name(tag, "tag")
    if VERSION_RE.match(tag):
        raise UsageError(f"invalid tag {tag!r}: it looks like a version id")
    if tag in RESERVED_TAGS:
        raise UsageError(f"invalid tag {tag!r}: the name is reserved")
    return tag


@dataclass(frozen=True)
class RegistryRef:
    bucket: str
    prefix: str  # without leading or trailing '/', may be empty

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


@dataclass(frozen=True)
class ModelRef:
    registry: RegistryRef
    name: str
    selector: str  # a tag or a version id

    @property
    def is_version(self) -> bool:
        return bool(VERSION_RE.match(self.selector))

    def __str__(self) -> str:
        return f"{self.registry}/{self.name}@{self.selector}"


def _split_s3(url: str) -> tuple[str, list[str]]:
    if not url.startswith("s3://"):
        raise UsageError(f"invalid reference {url!r}: expected s3://BUCKET/PREFIX")
    if "\x00" in url:
        raise UsageError("invalid reference: contains a NUL byte")
    parts = [p for p in url[5:].split("/") if p]
    if not parts:
        raise UsageError(f"invalid reference {url!r}: no bucket")
    bucket = parts[0]
    if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        raise UsageError(f"invalid bucket name {bucket!r}")
    for p in parts[1:]:
        if p in (".", ".."):
            raise UsageError(f"invalid reference {url!r}: '.' or '..' in the path")
    return bucket, parts[1:]


def parse_registry(url: str) -> RegistryRef:
    bucket, parts = _split_s3(url)
    if any("@" in p for p in parts):
        raise UsageError(f"{url!r} names a model version; expected a registry s3://BUCKET/PREFIX")
    return RegistryRef(bucket, "/".join(parts))


def parse_model(url: str) -> ModelRef:
    """The last path component is the model (``NAME`` or ``NAME@SELECTOR``)."""
    bucket, parts = _split_s3(url)
    if not parts:
        raise UsageError(f"invalid model reference {url!r}: expected s3://BUCKET/PREFIX/NAME[@TAG]")
    last = parts[-1]
    name, _, selector = last.partition("@")
    if "@" in "/".join(parts[:-1]):
        raise UsageError(f"invalid model reference {url!r}: '@' before the model name")
    check_name(name)
    selector = selector or DEFAULT_TAG
    if not VERSION_RE.match(selector):
        check_tag(selector)
    return ModelRef(RegistryRef(bucket, "/".join(parts[:-1])), name, selector)


def is_model_ref(url: str) -> bool:
    return url.startswith("s3://") and "@" in url

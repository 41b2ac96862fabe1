"""The registry layout under an S3 prefix, and the operations on it.

    <prefix>/chunks/<blake3>                    chunk objects (see codec), shared by all models
    <prefix>/models/<name>/versions/<id>.json   manifests, immutable, id = hash of the bytes
    <prefix>/models/<name>/tags/<tag>.json      {"version": id, ...}, mutable pointers
    <prefix>/leases/<id>.json                   a publish in progress (see lifecycle)

Readers only ever follow tag → manifest → chunks, and writers write in the
opposite order (chunks, then the manifest, then the tag), so a reader never
sees a manifest whose chunks are missing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import codec
from .errors import IntegrityError, ManifestError, NotFoundError, StoreError, UsageError
from .config import StoreConfig
from .manifest import Manifest, loads
from .refs import VERSION_RE, ModelRef, RegistryRef, check_name, check_tag, parse_registry
from .store import ObjectInfo, Store

TAG_FORMAT = "modelfs-tag"
_HEX = frozenset("0123456789abcdef")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created: float  # when the manifest object was written (store time)
    manifest_bytes: int


class Registry:
    def __init__(self, store: Store, ref: RegistryRef):
        self.store = store
        self.ref = ref

    # -- keys ----------------------------------------------------------------
    def chunk_key(self, h: str) -> str:
        return self.ref.key("chunks", h)

    def version_key(self, name: str, version: str) -> str:
        return self.ref.key("models", name, "versions", f"{version}.json")

    def tag_key(self, name: str, tag: str) -> str:
        return self.ref.key("models", name, "tags", f"{tag}.json")

    def lease_key(self, lease_id: str) -> str:
        return self.ref.key("leases", f"{lease_id}.json")

    # -- chunks --------------------------------------------------------------
    def chunks(self) -> Iterator[ObjectInfo]:
        """Every chunk object (key, stored size, store time), in key order."""
        base = self.ref.key("chunks") + "/"
        for o in self.store.list(base):
            if isinstance(o, ObjectInfo) and _is_hash(o.key[len(base):]):
                yield o

    def chunk_of(self, key: str) -> str:
        return key.rsplit("/", 1)[-1]

    def has_chunk(self, h: str) -> bool:
        return self.store.exists(self.chunk_key(h))

    def put_chunk(self, h: str, blob: bytes) -> None:
        self.store.put(self.chunk_key(h), blob)

    def get_chunk(self, h: str, size: int) -> bytes:
        """The chunk's verified raw bytes (IntegrityError when the store's copy is bad)."""
        try:
            blob = self.store.get(self.chunk_key(h))
        except NotFoundError:
            raise NotFoundError(f"chunk {h} is missing from {self.ref}") from None
        return codec.decode(blob, h, size)

    # -- manifests and tags ----------------------------------------------------
    def put_manifest(self, m: Manifest) -> str:
        data = m.to_bytes()
        self.store.put(self.version_key(m.name, m.version_id), data, "application/json")
        return m.version_id

    def manifest_bytes(self, name: str, version: str) -> bytes:
        try:
            return self.store.get(self.version_key(name, version))
        except NotFoundError:
            raise NotFoundError(f"no version {version} of model {name!r} in {self.ref}") from None

    def parse_manifest(self, name: str, version: str, data: bytes) -> Manifest:
        """Validate manifest bytes fetched (or cached) as ``name@version``."""
        m = loads(data, expected_version=version, source=f"{self.ref}/{name}@{version}")
        if m.name != name:
            raise IntegrityError(f"manifest {version} names model {m.name!r}, not {name!r}")
        return m

    def get_manifest(self, name: str, version: str) -> Manifest:
        return self.parse_manifest(name, version, self.manifest_bytes(name, version))

    def get_tag(self, name: str, tag: str) -> str:
        try:
            data = self.store.get(self.tag_key(name, tag))
        except NotFoundError:
            if not self.model_exists(name):
                raise NotFoundError(f"no model {name!r} in {self.ref}") from None
            raise NotFoundError(f"model {name!r} has no tag {tag!r}") from None
        try:
            doc = json.loads(data)
            version = doc["version"]
            if doc.get("format") != TAG_FORMAT or not VERSION_RE.match(version):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ManifestError(f"tag {name}@{tag} in {self.ref} is malformed") from None
        return version

    def set_tag(self, name: str, tag: str, version: str) -> None:
        check_tag(tag)
        doc = {"format": TAG_FORMAT, "version": version,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.put(self.tag_key(name, tag), json.dumps(doc, sort_keys=True).encode(),
                       "application/json")

    def delete_tag(self, name: str, tag: str) -> None:
        self.store.delete(self.tag_key(name, tag))

    def delete_version(self, name: str, version: str) -> None:
        """Remove a manifest (its chunks stay until ``gc``)."""
        self.store.delete(self.version_key(name, version))

    def resolve(self, ref: ModelRef) -> tuple[str, Manifest]:
        """``(version id, manifest)`` for a tag or version reference."""
        version = ref.selector if ref.is_version else self.get_tag(ref.name, ref.selector)
        return version, self.get_manifest(ref.name, version)

    # -- listings ------------------------------------------------------------
    def models(self) -> list[str]:
        base = self.ref.key("models") + "/"
        return sorted(p[len(base):].rstrip("/") for p in self.store.list(base, "/")
                      if isinstance(p, str))

    def model_exists(self, name: str) -> bool:
        base = self.ref.key("models", name) + "/"
        return any(True for _ in self.store.list(base, "/"))

    def tags(self, name: str) -> dict[str, str]:
        """Every tag of ``name``. A malformed tag object is skipped (with a warning);
        any other failure fails the whole listing, so that a mount keeps serving its
        last good listing instead of one with tags missing."""
        base = self.ref.key("models", name, "tags") + "/"
        out = {}
        for o in self.store.list(base):
            if isinstance(o, ObjectInfo) and o.key.endswith(".json"):
                tag = o.key[len(base):-5]
                try:
                    out[check_tag(tag)] = self.get_tag(name, tag)
                except (ManifestError, UsageError) as e:
                    log.warning("skipping tag object %s: %s", o.key, e)
                except NotFoundError:  # listed but not readable: not consistent yet
                    raise StoreError(f"tag {name}@{tag} is listed but cannot be read yet") from None
        return dict(sorted(out.items()))

    def versions(self, name: str) -> list[VersionInfo]:
        check_name(name)
        base = self.ref.key("models", name, "versions") + "/"
        out = [VersionInfo(o.key[len(base):-5], o.last_modified, o.size)
               for o in self.store.list(base)
               if isinstance(o, ObjectInfo) and VERSION_RE.match(o.key[len(base):-5])]
        return sorted(out, key=lambda v: (v.created, v.version))

    def latest_manifest(self, name: str) -> Manifest | None:
        """The newest version of ``name``, if any (its chunks are known to exist)."""
        versions = self.versions(name)
        if not versions:
            return None
        return self.get_manifest(name, versions[-1].version)


# -- opening what a user names ------------------------------------------------------

def open_registry(ref: RegistryRef, config: StoreConfig) -> Registry:
    return Registry(Store(ref.bucket, config), ref)


def read_manifest_file(path: str) -> Manifest:
    """A manifest file given where a ref is expected (inspect, pull, mount)."""
    if not Path(path).is_file():
        raise UsageError(f"{path!r} is neither an s3:// reference nor a manifest file")
    return loads(Path(path).read_bytes(), source=path)


def origin_registry(m: Manifest, registry_url: str | None, config: StoreConfig) -> Registry:
    """Where a manifest file's chunks live: ``--registry``, else the manifest's origin."""
    url = registry_url or m.origin
    if not url:
        raise UsageError("this manifest names no origin registry: pass --registry s3://BUCKET/PREFIX")
    return open_registry(parse_registry(url), config)


def _is_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX

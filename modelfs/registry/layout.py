"""The registry layout under an S3 prefix, and the operations on it.

    <prefix>/chunks/<blake3>                    chunk objects (see codec), shared by all models
    <prefix>/models/<name>/versions/<id>.json   manifests, immutable, id = hash of the bytes
    <prefix>/models/<name>/tags/<tag>.json      {"version": id, "sequence": n, ...}, mutable pointers
    <prefix>/models/<name>/signatures/<id>.sig  a version's model_signing bundle (see trust)
    <prefix>/leases/<id>.json                   a publish in progress (see lifecycle)
    <prefix>/encryption.json                    only in an encrypted registry: scheme and key id

An encrypted registry (docs/security.md) has the same layout: chunk ids are keyed
BLAKE3, chunks are AES-256-GCM (see codec), and manifests and tags are sealed
objects bound to their key under the prefix (see encryption). Its marker object
lets every command tell a missing or wrong key from damage, in one clear line.

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
from typing import Any

from ..cache import BlockCache
from ..format.codec import ChunkCodec, check_raw
from ..format.encryption import MetadataSealer, RegistryKey, is_sealed
from ..errors import IntegrityError, ManifestError, NotFoundError, StoreError, StoreUnavailableError, UsageError
from ..config import StoreConfig
from ..format.manifest import ForeignStore, Manifest, loads, utc_stamp
from ..format.refs import VERSION_RE, RegistryRef, check_name, check_tag, parse_registry
from .store import ObjectInfo, Store
from ..format.trust import SigningKey

TAG_FORMAT = "modelfs-tag"
MARKER_FORMAT = "modelfs-encryption"
MARKER = "encryption.json"
_HEX = frozenset("0123456789abcdef")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagRecord:
    version: str
    sequence: int  # goes up with every move (0: written before sequences existed)
    signature: dict | None  # see trust.SigningKey.sign_tag


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created: float  # when the manifest object was written (store time)
    manifest_bytes: int


@dataclass(frozen=True)
class Location:
    """Where an adopted version's chunk is read from: raw bytes [at, at + size) of a foreign
    object (a DVC or Git LFS store's), not an object of the registry."""
    store: Store
    key: str
    at: int
    version: str  # NAME@VERSION that named it (for the one line a missing object gives)

    @property
    def url(self) -> str:
        return f"s3://{self.store.bucket}/{self.key}"


class Registry:
    """One registry under an S3 prefix: its chunks, manifests and tags.

    Invariants: with a key, everything read is opened (decrypted and authenticated)
    before it is parsed, and plain manifests, tags or chunks are refused; without
    one, encrypted objects are refused with a line that asks for the key. A chunk is
    read from a foreign store only where a manifest parsed here said so (``locate``).
    """

    def __init__(self, store: Store, ref: RegistryRef, key: RegistryKey | None = None):
        self.store = store
        self.ref = ref
        self.key = key
        self.codec = ChunkCodec(key)
        self._sealer = MetadataSealer(key) if key is not None else None
        self._located: dict[str, Location] = {}  # adopted versions' foreign chunks
        self._foreign_stores: dict[tuple[str | None, str], Store] = {}

    # -- adopted versions' chunks, in other stores ------------------------------------
    def learn(self, m: Manifest) -> None:
        """Remember where ``m``'s foreign chunks are (an adopted version), for ``locate``."""
        for h, (f, at) in m.foreign_chunks.items():
            if h not in self._located:
                assert f.foreign is not None
                src = m.sources[f.foreign.source]
                self._located[h] = Location(self.foreign_store(src), src.key(f.foreign.key), at,
                                            f"{m.name}@{m.version_id}")

    def locate(self, h: str) -> Location | None:
        """Where chunk ``h`` is read from if not from this registry's ``chunks/``."""
        return self._located.get(h)

    def foreign_store(self, src: ForeignStore) -> Store:
        """The bucket of a foreign store, reached with this host's credentials (read only)."""
        k = (src.endpoint, src.bucket)
        s = self._foreign_stores.get(k)
        if s is None:
            c = self.store.config
            s = self._foreign_stores[k] = Store(src.bucket, StoreConfig(
                src.endpoint or c.endpoint_url, c.region, c.profile, c.concurrency, c.timeouts))
        return s

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

    def get_chunk(self, h: str, size: int) -> bytes:
        """The chunk's verified raw bytes (IntegrityError when the store's copy is bad)."""
        at = self.locate(h)
        if at is not None:  # an adopted chunk: raw bytes of a foreign object
            try:
                return check_raw(at.store.get(at.key, at.at, at.at + size), h, size)
            except (NotFoundError, IntegrityError) as e:
                raise type(e)(f"{at.version} reads {at.url}, changed or deleted after adoption: {e}") from None
        try:
            blob = self.store.get(self.chunk_key(h))
        except NotFoundError:
            raise NotFoundError(f"chunk {h} is missing from {self.ref}") from None
        return self.codec.decode(blob, h, size)

    # -- encryption --------------------------------------------------------------
    def check_encryption(self, *, creating: bool = False, dry_run: bool = False) -> None:
        """Refuse, in one line, a key this registry does not take, or its lack.

        ``creating`` (publish): an empty prefix published to with a key becomes an
        encrypted registry (its marker is written first, unless ``dry_run``); one
        that already holds plain models does not."""
        try:
            data = self.store.get(self.ref.key(MARKER))
        except NotFoundError:
            data = None
        if data is None:
            if self.key is None:
                return
            if not creating:
                raise UsageError(f"registry {self.ref} is not encrypted, but an encryption key was given "
                                 "(leave --encryption-key out)")
            if self.models() or next(self.chunks(), None) is not None:
                raise UsageError(f"registry {self.ref} already holds unencrypted models: an encrypted "
                                 "registry needs a prefix of its own")
            if dry_run:
                return
            doc = {"format": MARKER_FORMAT, "version": 1, "chunk_cipher": "AES-256-GCM",
                   "metadata_cipher": "AES-256-GCM", "chunk_ids": "BLAKE3-keyed", "kdf": "HKDF-SHA256",
                   "key_id": self.key.key_id}
            self.store.put(self.ref.key(MARKER), json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n",
                           "application/json")
            log.info("registry %s is now encrypted (key id %s)", self.ref, self.key.key_id)
            return
        try:
            doc = json.loads(data)
            key_id = doc["key_id"]
            if doc.get("format") != MARKER_FORMAT or not isinstance(key_id, str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ManifestError(f"the encryption marker of registry {self.ref} ({MARKER}) is malformed") \
                from None
        if doc.get("version") != 1:
            raise UsageError(f"registry {self.ref} uses encryption scheme version {doc.get('version')!r}, "
                             "which this modelfs does not know: upgrade modelfs")
        if self.key is None:
            raise UsageError(f"registry {self.ref} is encrypted: pass --encryption-key FILE "
                             f"(or $MODELFS_ENCRYPTION_KEY_FILE) with its key (key id {key_id})")
        if key_id != self.key.key_id:
            raise UsageError(f"wrong encryption key for registry {self.ref}: it was encrypted with key id "
                             f"{key_id}, the key given has id {self.key.key_id}")

    def _seal(self, data: bytes, key: str) -> bytes:
        return data if self._sealer is None else self._sealer.seal(data, self._where(key))

    def _open(self, blob: bytes, key: str) -> bytes:
        if self._sealer is not None:
            return self._sealer.open(blob, self._where(key))
        if is_sealed(blob):
            raise UsageError(f"{key} is encrypted: registry {self.ref} needs --encryption-key")
        return blob

    def seal_copy(self, key: str, data: bytes) -> bytes:
        """``data`` in the form this registry stores object ``key`` in (sealed if encrypted):
        how a sealed cache (``--encrypt-cache``) keeps manifests and signatures."""
        return self._seal(data, key)

    def open_copy(self, key: str, blob: bytes) -> bytes:
        """The plain bytes of a :meth:`seal_copy` (IntegrityError if tampered or misplaced)."""
        return self._open(blob, key)

    def _where(self, key: str) -> str:
        """An object's key under the prefix: what a sealed object is bound to (so a
        registry copied to another bucket or prefix still opens)."""
        base = self.ref.key("")
        return key[len(base) + 1:] if base and key.startswith(base + "/") else key

    # -- manifests and tags ----------------------------------------------------
    def put_manifest(self, m: Manifest) -> str:
        if not self.codec.reads(m.chunk_hash):
            raise UsageError(f"manifest of {m.name} names its chunks with {m.chunk_hash}, registry {self.ref} "
                             f"with {self.codec.hash_algorithm}")
        key = self.version_key(m.name, m.version_id)
        self.store.put(key, self._seal(m.to_bytes(), key),
                       "application/json" if self._sealer is None else "application/octet-stream")
        return m.version_id

    def manifest_bytes(self, name: str, version: str) -> bytes:
        """The manifest's plain bytes (opened, in an encrypted registry)."""
        key = self.version_key(name, version)
        try:
            return self._open(self.store.get(key), key)
        except NotFoundError:
            raise NotFoundError(f"no version {version} of model {name!r} in {self.ref}") from None

    def parse_manifest(self, name: str, version: str, data: bytes) -> Manifest:
        """Validate manifest bytes fetched (or cached) as ``name@version``."""
        m = loads(data, expected_version=version, source=f"{self.ref}/{name}@{version}")
        if m.name != name:
            raise IntegrityError(f"manifest {version} names model {m.name!r}, not {name!r}")
        self.check_chunk_names(m)
        self.learn(m)
        return m

    def check_chunk_names(self, m: Manifest) -> None:
        """A manifest whose chunk ids this registry's codec cannot verify is refused."""
        if self.codec.reads(m.chunk_hash):
            return
        if self.key is None:
            raise UsageError(f"{m.name}@{m.version_id} belongs to an encrypted registry: pass --encryption-key")
        raise UsageError(f"{m.name}@{m.version_id} is not from an encrypted registry, but an encryption "
                         "key was given")

    def get_manifest(self, name: str, version: str) -> Manifest:
        return self.parse_manifest(name, version, self.manifest_bytes(name, version))

    def tag_record(self, name: str, tag: str) -> TagRecord:
        key = self.tag_key(name, tag)
        try:
            data = self._open(self.store.get(key), key)
        except NotFoundError:
            if not self.model_exists(name):
                raise NotFoundError(f"no model {name!r} in {self.ref}") from None
            raise NotFoundError(f"model {name!r} has no tag {tag!r}") from None
        try:
            doc = json.loads(data)
            version, sequence, signature = doc["version"], doc.get("sequence", 0), doc.get("signature")
            if doc.get("format") != TAG_FORMAT or not VERSION_RE.match(version) \
                    or type(sequence) is not int or not 0 <= sequence < 1 << 63 \
                    or not isinstance(signature, (dict, type(None))):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ManifestError(f"tag {name}@{tag} in {self.ref} is malformed") from None
        return TagRecord(version, sequence, signature)

    def set_tag(self, name: str, tag: str, version: str, signer: SigningKey | None = None) -> TagRecord:
        """Point ``tag`` at ``version``; with ``signer``, a signed record. The sequence is
        strictly above the current record's (and at least the time in ms, so a record that
        cannot be read does not send it backwards)."""
        check_tag(tag)
        try:
            previous = self.tag_record(name, tag).sequence
        except (NotFoundError, ManifestError, IntegrityError):
            previous = 0
        sequence = max(previous + 1, time.time_ns() // 1_000_000)
        doc: dict[str, Any] = {"format": TAG_FORMAT, "version": version, "sequence": sequence,
                               "updated": utc_stamp()}
        if signer is not None:
            doc["signature"] = signer.sign_tag(name, tag, version, sequence)
        key = self.tag_key(name, tag)
        self.store.put(key, self._seal(json.dumps(doc, sort_keys=True).encode(), key),
                       "application/json" if self._sealer is None else "application/octet-stream")
        return TagRecord(version, sequence, doc.get("signature"))

    # -- signatures (docs/security.md) -------------------------------------------
    def signature_key(self, name: str, version: str) -> str:
        return self.ref.key("models", name, "signatures", f"{version}.sig")

    def put_signature(self, name: str, version: str, data: bytes) -> None:
        key = self.signature_key(name, version)
        self.store.put(key, self._seal(data, key),
                       "application/json" if self._sealer is None else "application/octet-stream")

    def get_signature(self, name: str, version: str) -> bytes | None:
        """The version's model_signing bundle, or None if it is not signed."""
        key = self.signature_key(name, version)
        try:
            return self._open(self.store.get(key), key)
        except NotFoundError:
            return None

    def delete_tag(self, name: str, tag: str) -> None:
        self.store.delete(self.tag_key(name, tag))

    def delete_version(self, name: str, version: str) -> None:
        """Remove a manifest, then its signature (its chunks stay until ``gc``)."""
        self.store.delete(self.version_key(name, version))
        self.store.delete(self.signature_key(name, version))

    # -- listings ------------------------------------------------------------
    def models(self) -> list[str]:
        base = self.ref.key("models") + "/"
        return sorted(p[len(base):].rstrip("/") for p in self.store.list(base, "/")
                      if isinstance(p, str))

    def model_exists(self, name: str) -> bool:
        base = self.ref.key("models", name) + "/"
        return any(True for _ in self.store.list(base, "/"))

    def tags(self, name: str) -> dict[str, str]:
        """Every tag of ``name`` → the version it points to (see ``tag_records``)."""
        return {tag: r.version for tag, r in self.tag_records(name).items()}

    def tag_records(self, name: str) -> dict[str, TagRecord]:
        """Every tag record of ``name``. A malformed tag object is skipped (with a warning);
        any other failure fails the whole listing, so that a mount keeps serving its
        last good listing instead of one with tags missing."""
        base = self.ref.key("models", name, "tags") + "/"
        out = {}
        for o in self.store.list(base):
            if isinstance(o, ObjectInfo) and o.key.endswith(".json"):
                tag = o.key[len(base):-5]
                try:
                    out[check_tag(tag)] = self.tag_record(name, tag)
                except (ManifestError, IntegrityError, UsageError) as e:
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

def open_registry(ref: RegistryRef, config: StoreConfig, key: RegistryKey | None = None, *,
                  creating: bool = False, dry_run: bool = False, check: bool = True,
                  offline_ok: bool = False, cache: BlockCache | None = None) -> Registry:
    """The registry at ``ref``, its encryption checked against ``key`` (one clear line
    for a missing or wrong key) unless ``check`` is false. With ``offline_ok`` (a
    mount, which may start from its cache) an unreachable store defers the check:
    whatever then needs the store fails on its own. With ``cache``, a check this host
    passed before with the same key is not asked of the store again (a registry's
    marker is written once, before its first model, and never changes)."""
    registry = Registry(Store(ref.bucket, config), ref, key)
    if not check:
        return registry
    fact = f"encryption {registry.store.endpoint} {ref}"
    passed = key.key_id if key is not None else "none"
    if cache is not None and not creating and cache.get_fact(fact) == passed:
        return registry
    try:
        registry.check_encryption(creating=creating, dry_run=dry_run)
    except StoreUnavailableError as e:
        if not offline_ok:
            raise
        log.warning("could not check the encryption of %s (%s)", ref, e)
        return registry
    if cache is not None:
        cache.put_fact(fact, passed)
    return registry


def read_manifest_file(path: str) -> Manifest:
    """A manifest file given where a ref is expected (inspect, pull, mount)."""
    if not Path(path).is_file():
        raise UsageError(f"{path!r} is neither an s3:// reference nor a manifest file")
    return loads(Path(path).read_bytes(), source=path)


def origin_registry(m: Manifest, registry_url: str | None, config: StoreConfig,
                    key: RegistryKey | None = None, *, offline_ok: bool = False,
                    cache: BlockCache | None = None) -> Registry:
    """Where a manifest file's chunks live: ``--registry``, else the manifest's origin."""
    url = registry_url or m.origin
    if not url:
        raise UsageError("this manifest names no origin registry: pass --registry s3://BUCKET/PREFIX")
    registry = open_registry(parse_registry(url), config, key, offline_ok=offline_ok, cache=cache)
    registry.check_chunk_names(m)
    registry.learn(m)
    return registry


def _is_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX

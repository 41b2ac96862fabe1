"""Where manifests and tag resolutions come from, on a host with a block cache: one owner.

A version's manifest: memory, then the LMDB cache (checked against its version
id, so a damaged record is dropped), then the store — and every one fetched is
recorded in the cache. A tag's version: the store, recorded in the cache, so that
when the store cannot be reached (``StoreUnavailableError``: connection refused,
timeouts, 5xx — not a denial) a mount can start from what this cache saw last: a
daemon restarted during an outage (``Restart=on-failure``) comes back with the
version it served, and its cached chunks read as before.

With trusted keys (``--trusted-key``) it is also where trust is enforced, once
for every command and the mount: a manifest is returned only if a trusted key
signed exactly its files, a tag only if its record is signed by a trusted key and
its sequence is not below the highest this cache has seen for it (a rollback).
Signatures come the way manifests do: memory → cache → store.

With ``sealed`` (a mount's ``--encrypt-cache``) the cache keeps manifests and
signatures as the encrypted registry stores them, sealed and bound to their
object key; only tag resolutions (names the bucket's keys show anyway) stay plain.

Blocking (store and LMDB calls): the mount calls it through
:class:`~modelfs.transfer.lanes.Lanes`' threads; the CLI calls it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..cache import BlockCache
from ..errors import IntegrityError, ManifestError, NotFoundError, StoreUnavailableError, TrustError, UsageError
from ..format.manifest import Manifest
from ..format.refs import NAME_RE, VERSION_RE, ModelRef
from .layout import Registry, TagRecord, VersionInfo
from ..format.trust import TrustedKeys

log = logging.getLogger(__name__)


class Catalog:
    """Manifests and tag resolutions of one registry, through one host's cache (optional).

    Invariants: a manifest returned was validated against the version id it was
    asked for (and, with ``trust``, against a trusted signature); a tag resolution
    is recorded only together with its manifest, and with its sequence.
    """

    def __init__(self, registry: Registry, cache: BlockCache | None = None, trust: TrustedKeys | None = None,
                 *, sealed: bool = False):
        if sealed and registry.key is None:
            raise UsageError(f"an encrypted cache needs an encrypted registry; {registry.ref} is not one")
        self.registry = registry
        self.cache = cache
        self.trust = trust
        self.sealed = sealed  # keep metadata in the cache sealed, as the store has it
        self._manifests: dict[str, Manifest] = {}
        self._signatures: dict[str, bytes | None] = {}
        self.signed_by: dict[str, str] = {}  # version → id of the trusted key that signed it

    def manifest(self, name: str, version: str) -> Manifest:
        """The manifest of ``name@version``: memory → cache → store (then cached)."""
        m = self._manifests.get(version)
        if m is not None and m.name == name:
            return m
        if not NAME_RE.match(name) or not VERSION_RE.match(version):
            raise NotFoundError(f"{name}@{version}")
        data = self._cached(lambda v: self.cache.get_manifest(v, sealed=self.sealed),
                            self.registry.version_key(name, version), version) if self.cache is not None else None
        fresh = data is None
        if fresh:
            data = self.registry.manifest_bytes(name, version)
        m = self.registry.parse_manifest(name, version, data)
        if fresh:
            self.keep_manifest(m, data)
        self.verify(m, version)
        self._manifests[version] = m
        return m

    def verify(self, m: Manifest, version: str) -> None:
        """With trusted keys: TrustError unless a trusted key signed exactly ``m``'s files."""
        if self.trust is None or version in self.signed_by:
            return
        self.signed_by[version] = self.trust.verify_version(m, self.signature(m.name, version),
                                                            f"{m.name}@{version}")

    def signature(self, name: str, version: str, *, fresh_for: float | None = None) -> bytes | None:
        """The version's signature bundle (None: unsigned): memory → cache → store.

        ``fresh_for`` (a mount's start): not the store, but an "unsigned" answer this
        cache recorded less than that many seconds ago counts (a version may be signed
        later); None then also means "not known here" (see :meth:`knows_signature`)."""
        if version in self._signatures:
            return self._signatures[version]
        key = self.registry.signature_key(name, version)
        data = self._cached(self.cache.get_signature, key, version) if self.cache is not None else None
        unsigned = f"unsigned {self.registry.store.endpoint} {key}"
        if data is None and fresh_for is not None:
            seen = self.cache.get_fact(unsigned) if self.cache is not None else None
            if seen is not None and _fresh(float(seen), fresh_for):
                self._signatures[version] = None
            return None
        if data is None:
            data = self.registry.get_signature(name, version)
            if data is not None:
                self._keep(self.cache.put_signature if self.cache is not None else None, key, version, data)
            elif self.cache is not None:
                self.cache.put_fact(unsigned, repr(time.time()))
        self._signatures[version] = data
        return data

    def knows_signature(self, version: str) -> bool:
        """Whether the version's signature, or that it has none, is known here now."""
        return version in self._signatures

    def keep_manifest(self, m: Manifest, data: bytes | None = None) -> None:
        """Record a validated manifest (its bytes ``data``) in the cache."""
        self._keep(self.cache.put_manifest if self.cache is not None else None,
                   self.registry.version_key(m.name, m.version_id), m.version_id,
                   m.to_bytes() if data is None else data)

    def _keep(self, put: Callable[[str, bytes], None] | None, key: str, version: str, data: bytes) -> None:
        """A record into the cache (sealed and bound to its object ``key``, with ``sealed``)."""
        if put is not None:
            put(version, self.registry.seal_copy(key, data) if self.sealed else data)

    def _cached(self, get: Callable[[str], bytes | None], key: str, version: str) -> bytes | None:
        """A cache record's plain bytes; a sealed one that does not open is a miss."""
        data = get(version)
        if data is None or not self.sealed:
            return data
        try:
            return self.registry.open_copy(key, data)
        except IntegrityError as e:
            log.warning("cached record of %s does not open (%s): fetching it again", key, e)
            return None

    def tags(self, name: str) -> dict[str, str]:
        """Every tag of ``name``; with trusted keys only those that verify (and whose
        version does), the others logged."""
        records = self.registry.tag_records(name)
        if self.trust is None:
            return {tag: r.version for tag, r in records.items()}
        out = {}
        for tag, r in records.items():
            ref = ModelRef(self.registry.ref, name, tag)
            try:
                self._trusted_tag(ref, r)
                self.manifest(name, r.version)
            except (TrustError, NotFoundError, ManifestError, IntegrityError) as e:
                log.warning("not showing %s: %s", ref, e)
                continue
            self._record(ref, r)
            out[tag] = r.version
        return out

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``; with trusted keys only those that verify, the others logged."""
        versions = self.registry.versions(name)
        if self.trust is None:
            return versions
        out = []
        for v in versions:
            try:
                self.manifest(name, v.version)
            except (TrustError, NotFoundError, ManifestError, IntegrityError) as e:
                log.warning("not showing %s/%s@%s: %s", self.registry.ref, name, v.version, e)
                continue
            out.append(v)
        return out

    def resolve(self, ref: ModelRef, *, fresh_for: float = 0.0) -> tuple[str, Manifest]:
        """``(version, manifest)`` of a tag or version ref; offline, what this cache saw last.
        ``fresh_for``: a tag this cache resolved less than that many seconds ago is not
        asked of the store again (a mount's start: its tag directories keep a resolution
        that long too)."""
        record = None
        try:
            if ref.is_version:
                version = ref.selector
            else:
                seen = self.cache.get_ref(self._ref_key(ref)) if self.cache is not None and fresh_for > 0 else None
                if seen is not None and _fresh(seen[1], fresh_for):
                    log.info("%s: version %s, as this host resolved it %.0f s ago (within the metadata TTL)",
                             ref, seen[0], time.time() - seen[1])
                    return seen[0], self.manifest(ref.name, seen[0])
                record = self.registry.tag_record(ref.name, ref.selector)
                self._trusted_tag(ref, record)
                version = record.version
            manifest = self.manifest(ref.name, version)
        except StoreUnavailableError as e:
            seen = self.cache.get_ref(self._ref_key(ref)) if self.cache is not None and not ref.is_version \
                else None
            if seen is None:
                raise StoreUnavailableError(f"{e} (and this cache has never served {ref.name}@{ref.selector}, "
                                            "so there is nothing to start from)") from None
            try:
                manifest = self.manifest(ref.name, seen[0])
            except StoreUnavailableError:
                raise StoreUnavailableError(f"{e} (and the manifest of {ref.name}@{seen[0]} is not cached)") \
                    from None
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seen[1]))
            log.warning("object store unreachable (%s): serving %s@%s as version %s, the last one seen (%s)",
                        e, ref.name, ref.selector, seen[0], when)
            return seen[0], manifest
        if record is not None:
            self._record(ref, record)
        return version, manifest

    def _trusted_tag(self, ref: ModelRef, r: TagRecord) -> None:
        """With trusted keys: the record is signed by one, and not older than what this
        cache has seen for the tag (an older record put back is a rollback)."""
        if self.trust is None:
            return
        self.trust.verify_tag(ref.name, ref.selector, r.version, r.sequence, r.signature)
        seen = self.cache.get_ref(self._ref_key(ref)) if self.cache is not None else None
        if seen is not None and (seen[2] > r.sequence or (seen[2] == r.sequence and seen[0] != r.version)):
            raise TrustError(f"tag {ref.name}@{ref.selector} went back from sequence {seen[2]} (version "
                             f"{seen[0]}) to {r.sequence} (version {r.version}): refused as a rollback")

    def _record(self, ref: ModelRef, r: TagRecord) -> None:
        """What ``ref`` resolved to now; the sequence kept is the highest ever seen."""
        if self.cache is None:
            return
        seen = self.cache.get_ref(self._ref_key(ref))
        self.cache.put_ref(self._ref_key(ref), r.version, max(r.sequence, seen[2] if seen else 0))

    def _ref_key(self, ref: ModelRef) -> str:
        return f"{self.registry.store.endpoint} {ref}"


def _fresh(at: float, fresh_for: float) -> bool:
    """Whether a record made at ``at`` (POSIX seconds) is younger than ``fresh_for`` (a clock
    that went back makes it stale)."""
    return 0 <= time.time() - at < fresh_for

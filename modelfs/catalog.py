"""Where manifests and tag resolutions come from, on a host with a block cache: one owner.

A version's manifest: memory, then the LMDB cache (checked against its version
id, so a damaged record is dropped), then the store — and every one fetched is
recorded in the cache. A tag's version: the store, recorded in the cache, so that
when the store cannot be reached (``StoreUnavailableError``: connection refused,
timeouts, 5xx — not a denial) a mount can start from what this cache saw last: a
daemon restarted during an outage (``Restart=on-failure``) comes back with the
version it served, and its cached chunks read as before.

Blocking (store and LMDB calls): the mount calls it through
:class:`~modelfs.lanes.Lanes`' threads; the CLI calls it directly.
"""

from __future__ import annotations

import logging
import time

from .cache import BlockCache
from .errors import NotFoundError, StoreUnavailableError
from .manifest import Manifest
from .refs import NAME_RE, VERSION_RE, ModelRef
from .registry import Registry

log = logging.getLogger(__name__)


class Catalog:
    """Manifests and tag resolutions of one registry, through one host's cache (optional).

    Invariants: a manifest returned was validated against the version id it was
    asked for; a tag resolution is recorded only together with its manifest.
    """

    def __init__(self, registry: Registry, cache: BlockCache | None = None):
        self.registry = registry
        self.cache = cache
        self._manifests: dict[str, Manifest] = {}

    def manifest(self, name: str, version: str) -> Manifest:
        """The manifest of ``name@version``: memory → cache → store (then cached)."""
        m = self._manifests.get(version)
        if m is not None and m.name == name:
            return m
        if not NAME_RE.match(name) or not VERSION_RE.match(version):
            raise NotFoundError(f"{name}@{version}")
        data = self.cache.get_manifest(version) if self.cache is not None else None
        fresh = data is None
        if fresh:
            data = self.registry.manifest_bytes(name, version)
        m = self.registry.parse_manifest(name, version, data)
        if fresh and self.cache is not None:
            self.cache.put_manifest(version, data)
        self._manifests[version] = m
        return m

    def resolve(self, ref: ModelRef) -> tuple[str, Manifest]:
        """``(version, manifest)`` of a tag or version ref; offline, what this cache saw last."""
        try:
            version = ref.selector if ref.is_version else self.registry.get_tag(ref.name, ref.selector)
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
        if not ref.is_version and self.cache is not None:
            self.cache.put_ref(self._ref_key(ref), version)
        return version, manifest

    def _ref_key(self, ref: ModelRef) -> str:
        return f"{self.registry.store.endpoint} {ref}"

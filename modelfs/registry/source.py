"""What a command names, resolved: a ref or a path → the catalog, and the version to show.

The one resolver every command uses (``inspect``, ``diff``, ``pull``, ``prefetch``,
``verify``, ``mount``). A source is

* a model ref, ``s3://BUCKET/PREFIX/NAME@TAG|VERSION`` (``s3://…/NAME``: ``@latest``);
* a manifest file (a ``*.modelfs.json`` pointer), whose chunks live in its origin
  registry or ``registry_url``;
* for a mount also a whole registry, ``s3://BUCKET/PREFIX`` (every model, tag and
  version), or a directory of pointer files (a git checkout);
* a DVC or Git LFS checkout whose objects were adopted into ``registry_url``: a version
  made from the checkout and the adoption table, never stored (``registry/adoption.py``).

With trusted keys a version, and a tag a ref names, resolves only if it verifies.
With a cache, what was resolved is recorded there, so a mount can start while the
store is down (``offline_ok``: a registry whose store does not answer is opened from
what the cache recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cache import BlockCache
from ..config import StoreConfig
from ..errors import NotFoundError, UsageError
from ..format.encryption import RegistryKey
from ..format.manifest import Manifest
from ..format.pointers import SUFFIX, PointerDir, registry_url_for
from ..format.refs import is_model_ref, parse_model, parse_registry
from ..format.trust import TrustedKeys
from .adoption import checkout_manifest, is_checkout
from .catalog import Catalog
from .layout import Registry, open_registry, origin_registry, read_manifest_file


@dataclass
class Source:
    catalog: Catalog | None  # None: a manifest file read on its own (no registry needed)
    model: str | None = None
    version: str | None = None
    manifest: Manifest | None = None  # None: a whole registry, or a directory of pointers
    pointers: PointerDir | None = None  # a directory of pointer files


def resolve(ref: str, config: StoreConfig, *, key: RegistryKey | None = None, trust: TrustedKeys | None = None,
            registry_url: str | None = None, cache: BlockCache | None = None, sealed: bool = False,
            need_registry: bool = False, whole_registry_ok: bool = False, offline_ok: bool = False,
            fresh_for: float = 0.0) -> Source:
    """``ref`` resolved (see the module's docstring). A manifest file gets its registry only
    when ``need_registry``, trusted keys or ``registry_url`` ask for one; ``sealed``: the
    cache's records are encrypted (``--encrypt-cache``); ``fresh_for``: a tag this cache
    resolved less than that many seconds ago is taken from it (a mount's metadata TTL)."""

    def catalog_of(registry: Registry) -> Catalog:
        return Catalog(registry, cache, trust, sealed=sealed)

    if ref.startswith("s3://"):
        if whole_registry_ok and not is_model_ref(ref):
            return _registry_or_model(ref, config, key, catalog_of)
        mref = parse_model(ref)
        catalog = catalog_of(open_registry(mref.registry, config, key, offline_ok=offline_ok, cache=cache))
        version, manifest = catalog.resolve(mref, fresh_for=fresh_for)
        return Source(catalog, mref.name, version, manifest)
    if Path(ref).is_dir() and is_checkout(Path(ref)) and not any(Path(ref).glob(f"**/*{SUFFIX}")):
        if not registry_url:
            raise UsageError(f"{ref} is a DVC or Git LFS checkout: pass --registry s3://BUCKET/PREFIX, the "
                             "registry it was adopted into")
        registry = open_registry(parse_registry(registry_url), config, key, offline_ok=offline_ok, cache=cache)
        manifest = checkout_manifest(registry, Path(ref))
        registry.learn(manifest)
        catalog = catalog_of(registry)
        catalog.keep_manifest(manifest)
        return Source(catalog, manifest.name, manifest.version_id, manifest)
    if whole_registry_ok and Path(ref).is_dir():
        url = registry_url_for(Path(ref), registry_url)
        registry = open_registry(parse_registry(url), config, key, offline_ok=offline_ok)
        registry.store.check_bucket()
        # with --registry every pointer is read from it; else only those whose origin it is
        pointers = PointerDir(Path(ref), None if registry_url else str(registry.ref))
        return Source(catalog_of(registry), pointers=pointers)
    manifest = read_manifest_file(ref)
    if not (need_registry or trust is not None or registry_url):
        return Source(None, manifest.name, manifest.version_id, manifest)
    catalog = catalog_of(origin_registry(manifest, registry_url, config, key, offline_ok=offline_ok, cache=cache))
    catalog.verify(manifest, manifest.version_id)
    catalog.keep_manifest(manifest)
    return Source(catalog, manifest.name, manifest.version_id, manifest)


def as_resolved(registry: Registry, name: str, version: str, *, trust: TrustedKeys | None = None,
                cache: BlockCache | None = None, sealed: bool = False) -> Source:
    """Model ``name`` of ``registry`` as another process of this host resolved a ref of it
    moments ago, to ``version``, with ``cache``: what :func:`resolve` returned there, made
    from the records it left (the manifest; with trusted keys, its signature). No store
    request while the cache holds them; the registry's encryption was checked there."""
    catalog = Catalog(registry, cache, trust, sealed=sealed)
    return Source(catalog, name, version, catalog.manifest(name, version))


def _registry_or_model(url: str, config: StoreConfig, key: RegistryKey | None, catalog_of) -> Source:
    """``s3://BUCKET/PREFIX``: a registry if it holds models (or is a bucket's root), else
    ``s3://…/NAME`` read as ``NAME@latest``, as pull and inspect do."""
    rref = parse_registry(url)
    registry = open_registry(rref, config, key, check=False)
    registry.store.check_bucket()
    if registry.models() or not rref.prefix:
        registry.check_encryption()
        return Source(catalog_of(registry))
    try:
        mref = parse_model(url)
    except UsageError:
        raise NotFoundError(f"no registry and no model at {url}") from None
    parent_registry = Registry(registry.store, mref.registry, key)
    parent_registry.check_encryption()  # its own line for a missing or wrong key
    parent = catalog_of(parent_registry)
    try:
        version, manifest = parent.resolve(mref)
    except NotFoundError:
        raise NotFoundError(f"no registry and no model at {url}") from None
    return Source(parent, mref.name, version, manifest)

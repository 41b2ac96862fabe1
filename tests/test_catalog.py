"""Catalog over an in-memory store and a real LMDB cache: memory → cache → store, and offline."""

import pytest

from fakes import MemoryStore
from modelfs.cache import BlockCache
from modelfs.errors import IntegrityError, NotFoundError, StoreUnavailableError
from modelfs.format.chunking import chunk_hash
from modelfs.format.manifest import FileEntry, Manifest
from modelfs.format.refs import ModelRef, RegistryRef
from modelfs.registry.catalog import Catalog
from modelfs.registry.layout import Registry

pytestmark = pytest.mark.unit


def version(registry: Registry, name: str, payload: bytes, tag: str | None = None) -> Manifest:
    h = chunk_hash(payload)
    m = Manifest(name=name, created="2026-12-01T00:00:00Z", chunking={}, directories=(),
                 files=(FileEntry(path="w.bin", size=len(payload), mode=0o644, sha256="0" * 64,
                                  chunks=((h, len(payload)),)),))
    registry.put_manifest(m)
    if tag:
        registry.set_tag(name, tag, m.version_id)
    return m


@pytest.fixture
def world(tmp_path):
    store = MemoryStore()
    registry = Registry(store, RegistryRef("bkt", "reg"))
    cache = BlockCache(tmp_path / "cache", 1 << 30)
    yield store, registry, cache
    cache.close()


def test_manifests_come_from_memory_then_the_cache_then_the_store(world):
    store, registry, cache = world
    m = version(registry, "llama", b"a" * 100, tag="prod")
    first = Catalog(registry, cache)
    before = store.requests
    assert first.manifest("llama", m.version_id) == m
    assert store.requests == before + 1  # from the store, and recorded
    assert first.manifest("llama", m.version_id) == m
    assert store.requests == before + 1  # memory
    second = Catalog(registry, cache)  # another process on this host
    assert second.manifest("llama", m.version_id) == m
    assert store.requests == before + 1  # the cache
    with pytest.raises(NotFoundError):
        Catalog(registry, cache).manifest("llama", "../tags/prod")  # not a version id: no request
    assert store.requests == before + 1
    with pytest.raises(NotFoundError):
        Catalog(registry, cache).manifest("llama", "0" * 20)  # a well-formed id the store lacks
    assert store.requests == before + 2


def test_a_damaged_cached_manifest_is_fetched_again(world):
    store, registry, cache = world
    m = version(registry, "llama", b"b" * 100)
    Catalog(registry, cache).manifest("llama", m.version_id)
    cache.put_manifest(m.version_id, m.to_bytes().replace(b"w.bin", b"x.bin"))  # bytes of another version
    before = store.requests
    assert Catalog(registry, cache).manifest("llama", m.version_id) == m  # checked against its id: dropped
    assert store.requests == before + 1  # and fetched again
    assert Catalog(registry, cache).manifest("llama", m.version_id) == m
    assert store.requests == before + 1  # the good copy was recorded
    store.objects[registry.version_key("llama", m.version_id)] = (b"{}", 0.0)
    with pytest.raises(IntegrityError):  # a store's damage is an error, never another manifest
        Catalog(registry, None).manifest("llama", m.version_id)


def test_offline_a_tag_resolves_to_what_this_cache_saw_last(world):
    store, registry, cache = world
    v1 = version(registry, "llama", b"c" * 100, tag="prod")
    ref = ModelRef(registry.ref, "llama", "prod")
    assert Catalog(registry, cache).resolve(ref) == (v1.version_id, v1)
    v2 = version(registry, "llama", b"d" * 100, tag="prod")  # moved while this host is away
    store.down = True
    assert Catalog(registry, cache).resolve(ref) == (v1.version_id, v1)  # the last one seen
    with pytest.raises(StoreUnavailableError, match="never served"):
        Catalog(registry, cache).resolve(ModelRef(registry.ref, "llama", "staging"))
    with pytest.raises(StoreUnavailableError, match="never served"):
        Catalog(registry, None).resolve(ref)  # no cache: nothing to start from
    store.down = False
    assert Catalog(registry, cache).resolve(ref) == (v2.version_id, v2)


def test_a_tag_resolved_here_within_fresh_for_is_not_asked_again(world):
    store, registry, cache = world
    v1 = version(registry, "llama", b"e" * 100, tag="prod")
    ref = ModelRef(registry.ref, "llama", "prod")
    assert Catalog(registry, cache).resolve(ref) == (v1.version_id, v1)
    v2 = version(registry, "llama", b"f" * 100, tag="prod")  # moved since
    asked = store.requests
    assert Catalog(registry, cache).resolve(ref, fresh_for=30) == (v1.version_id, v1)
    assert store.requests == asked  # tag and manifest from the cache: no request
    assert Catalog(registry, cache).resolve(ref) == (v2.version_id, v2)  # without: the store's
    seen = cache.get_ref(f"{store.endpoint} {ref}")
    cache.put_ref(f"{store.endpoint} {ref}", v1.version_id)  # as if resolved to v1 ...
    assert seen is not None
    assert Catalog(registry, cache).resolve(ref, fresh_for=1e-9) == (v2.version_id, v2)  # ... too long ago

"""Namespace over an in-memory store: listings kept for the TTL, a moved tag seen after it
with a new inode, and the last listing served while the store is down."""

import pytest
import trio

from fakes import MemoryStore
from modelfs.errors import ModelfsError
from modelfs.format.refs import RegistryRef
from modelfs.mount import namespace
from modelfs.mount.namespace import Namespace
from modelfs.registry.catalog import Catalog
from modelfs.registry.layout import Registry
from test_catalog import version

pytestmark = pytest.mark.unit


class InlineLanes:
    """Store calls run inline (the real Lanes runs them on threads, bounded in time)."""

    async def store_call(self, fn, *args):
        return fn(*args)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(namespace.time, "monotonic", clock)
    store = MemoryStore()
    registry = Registry(store, RegistryRef("bkt", "reg"))
    ns = Namespace(InlineLanes(), Catalog(registry), ttl=30.0)
    return clock, store, registry, ns


def names(entries):
    return [name for name, _ in entries]


def test_listings_are_kept_for_the_ttl_and_a_moved_tag_gets_a_new_inode(world):
    clock, store, registry, ns = world
    v1 = version(registry, "llama", b"a" * 100, tag="prod")

    async def main():
        root = ns.root_registry()
        assert names(await ns.children(root)) == ["llama"]
        version(registry, "qwen", b"q" * 100)
        asked = store.requests
        assert names(await ns.children(root)) == ["llama"]  # within the TTL: no request
        assert store.requests == asked
        model = await ns.lookup(root, "llama")
        prod = await ns.lookup(model, "prod")
        assert prod.version == v1.version_id
        assert names(await ns.children(prod)) == ["w.bin"]

        v2 = version(registry, "llama", b"b" * 100, tag="prod")
        assert (await ns.lookup(model, "prod")).inode == prod.inode  # still the cached listing
        clock.now += 31
        assert names(await ns.children(root)) == ["llama", "qwen"]
        moved = await ns.lookup(model, "prod")
        assert moved.version == v2.version_id and moved.inode != prod.inode
        assert ns.node(prod.inode).version == v1.version_id  # what is open keeps its version
        versions = await ns.lookup(model, "versions")
        assert sorted(names(await ns.children(versions))) == sorted([v1.version_id, v2.version_id])
        assert await ns.lookup(versions, "0" * 20) is None  # a well-formed id that does not exist
    trio.run(main)


def test_the_last_listing_is_served_while_the_store_is_down(world):
    clock, store, registry, ns = world
    version(registry, "llama", b"a" * 100, tag="prod")

    async def main():
        root = ns.root_registry()
        assert names(await ns.children(root)) == ["llama"]
        store.down = True
        clock.now += 31
        asked = store.requests
        assert names(await ns.children(root)) == ["llama"]  # stale beats empty
        assert store.requests == asked + 1
        clock.now += 5
        assert names(await ns.children(root)) == ["llama"]
        assert store.requests == asked + 1  # not asked again until another TTL passed
        model = ns.node((await ns.lookup(root, "llama")).inode)
        with pytest.raises(ModelfsError, match="listing tags/llama"):  # never listed: nothing to serve
            await ns.children(model)
        store.down = False
        clock.now += 31
        assert names(await ns.children(model)) == ["versions", "prod"]
    trio.run(main)

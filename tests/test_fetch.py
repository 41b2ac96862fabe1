"""The read path without FUSE: handlers and the reader called directly, over a fake chunk
source (a real LMDB cache in a temp dir), and the lanes against a store that never answers.
Fast; the real SeaweedFS + FUSE tier (test_mount, test_readpath) stays above it."""

import errno
import os

import pyfuse3
import pytest
import trio
import trio.testing

from modelfs.cache import BlockCache, CacheView
from modelfs.format.chunking import chunk_hash
from modelfs.config import StoreConfig, Timeouts
from modelfs.errors import IntegrityError, StoreError, StoreUnavailableError
from modelfs.mount.readahead import ReadaheadConfig, ReadOrder, Stream
from modelfs.mount.reader import Reader, Unsealer
from modelfs.mount.fs import ModelFS
from modelfs.transfer.lanes import FetchStats, Kind, LaneConfig, Lanes, _Flight
from modelfs.format.manifest import FileEntry, Manifest
from modelfs.format.refs import RegistryRef
from modelfs.registry.layout import Registry
from modelfs.registry.store import Store
from modelfs.mount.namespace import Namespace

from proxy import Gated, Silent

MiB = 1 << 20


class FakeSource:
    """A chunk source that writes known bytes into the cache (or garbage, or fails)."""

    def __init__(self, cache: BlockCache, chunks: dict[str, bytes]):
        self.cache, self.chunks = cache, chunks
        self.stats, self.generation = FetchStats(), 0
        self.loads: list[tuple[str, bool]] = []
        self.prefetched: list[str] = []
        self.paged_in: list[str] = []
        self.garbage: set[str] = set()
        self.failing: set[str] = set()
        self.peeks: list[tuple[str, int, int]] = []
        self.peekable = False

    async def load(self, h: str, size: int, *, urgent: bool = True, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> bytes | None:
        self.loads.append((h, refetch))
        await trio.sleep(0)
        if h in self.failing:
            raise StoreError(f"chunk {h}: the store said no")
        self.cache.write([(h, self.chunks[h])])
        if h in self.garbage:  # damaged on disk after it was written (its sums are right)
            data = bytearray(self.chunks[h])
            data[100] ^= 1
            with self.cache.env.begin(write=True) as txn:
                txn.put(bytes.fromhex(h), bytes(data), db=self.cache.chunks)
        self.generation += 1
        return None

    async def peek(self, h: str, size: int, lo: int, hi: int) -> bytes | None:
        self.peeks.append((h, lo, hi))
        await trio.sleep(0)
        return self.chunks[h][lo:hi] if self.peekable else None

    def load_ahead(self, h: str, size: int) -> None:
        self.prefetched.append(h)

    def recently_loaded(self, h: str) -> bool:
        return False

    def spilled(self, h: str) -> None:
        return None

    async def cache_call(self, fn, *args):
        if fn.__name__ == "page_in":
            self.paged_in.append(args[0])
        return fn(*args)


def make_file(sizes: list[int], seed: int = 1) -> tuple[FileEntry, bytes, dict[str, bytes]]:
    rnd = __import__("random").Random(seed)
    blobs = [rnd.randbytes(n) for n in sizes]
    chunks = {chunk_hash(b): b for b in blobs}
    entry = FileEntry(path="w.bin", size=sum(sizes), mode=0o644, sha256="0" * 64,
                      chunks=tuple((chunk_hash(b), len(b)) for b in blobs))
    return entry, b"".join(blobs), chunks


@pytest.fixture
def cache(tmp_path):
    c = BlockCache(tmp_path / "cache", 1 << 30)
    yield c
    c.close()


def reader(cache, chunks, **kw) -> tuple[Reader, FakeSource]:
    src = FakeSource(cache, chunks)
    return Reader(CacheView(cache), src, ReadaheadConfig(**kw)), src


def test_a_small_read_of_a_chunk_nobody_loads_gets_just_its_blocks(cache):
    """A lone small read (≤ PEEK_MAX, one chunk) of a file named by block digests is served
    from the source's ``peek``; a large read, one across chunks, one of an older file, or a
    peek the source cannot serve, load whole chunks."""
    import dataclasses

    from modelfs.mount.reader import PEEK_MAX
    old, data, chunks = make_file([MiB, MiB, MiB])
    entry = dataclasses.replace(old, by_blocks=True)
    fetcher, src = reader(cache, chunks)
    src.peekable = True
    (h0, _), (h1, _), (h2, _) = entry.chunks

    async def main():
        assert bytes(await fetcher.span(entry, 5000, 9096)) == data[5000:9096]
        assert src.peeks == [(h0, 5000, 9096)] and src.loads == []
        assert bytes(await fetcher.span(entry, MiB + 10, MiB + 10 + PEEK_MAX + 1)) == \
            data[MiB + 10:MiB + 10 + PEEK_MAX + 1]  # too large to peek
        assert bytes(await fetcher.span(entry, 3 * MiB - 100, 3 * MiB)) == data[-100:]
        assert [h for h, _ in src.loads] == [h1] and src.peeks[-1] == (h2, MiB - 100, MiB)
        assert bytes(await fetcher.span(entry, 2 * MiB - 10, 2 * MiB + 10)) == data[2 * MiB - 10:2 * MiB + 10]
        assert [h for h, _ in src.loads] == [h1, h2]  # across two chunks: whole ones
        assert bytes(await fetcher.span(old, 100, 200)) == data[100:200]  # no block digests
        assert [h for h, _ in src.loads] == [h1, h2, h0] and len(src.peeks) == 2
    trio.run(main)
    cache.clear()
    fetcher, src = reader(cache, chunks)  # peekable False: a chunk that cannot be read by blocks (zstd)
    assert bytes(trio.run(fetcher.span, entry, 10, 20)) == data[10:20]
    assert src.peeks == [(h0, 10, 20)] and src.loads == [(h0, False)]
    small, tiny, chunks = make_file([100_000])  # a small file's one chunk: whole at once
    fetcher, src = reader(cache, chunks)
    src.peekable = True
    assert bytes(trio.run(fetcher.span, dataclasses.replace(small, by_blocks=True), 10, 20)) == tiny[10:20]
    assert src.peeks == [] and len(src.loads) == 1


def test_spans_across_chunks_are_the_file_bytes(cache):
    entry, data, chunks = make_file([300_000, 1_000_000, 5, 700_000])
    fetcher, src = reader(cache, chunks)

    async def main():
        rnd = __import__("random").Random(3)
        for _ in range(200):
            off = rnd.randrange(entry.size)
            end = min(entry.size, off + rnd.choice([1, 4096, 131072, MiB, 3 * MiB]))
            assert bytes(await fetcher.span(entry, off, end)) == data[off:end]
        assert bytes(await fetcher.span(entry, 0, entry.size)) == data
    trio.run(main)
    assert {h for h, _ in src.loads} == set(chunks)  # each loaded, once the cache has it: never again
    assert len(src.loads) == len(chunks)
    assert src.stats.memory_hits > 0


def test_readahead_window_grows_and_resets(cache):
    entry, data, chunks = make_file([MiB] * 40)
    fetcher, src = reader(cache, chunks, max_bytes=16 * MiB, trigger_bytes=2 * MiB)
    stream = Stream(fetcher, entry)

    async def main():
        assert bytes(await stream.read(0, 4096)) == data[:4096]
        assert src.prefetched == []  # one small read loads only what it touches
        off = 4096
        for _ in range(24):  # sequential 1 MiB reads
            assert bytes(await stream.read(off, MiB)) == data[off:off + MiB]
            off += MiB
        grown = list(src.prefetched)
        assert stream.window == stream.max_window == 16
        assert len(grown) == len(set(grown))  # nothing asked twice
        index = {h: i for i, (h, _) in enumerate(entry.chunks)}
        assert max(index[h] for h in grown) >= 24 + 8  # well ahead of the reader
        src.prefetched.clear()
        await stream.read(2 * MiB, 4096)  # a jump back: no readahead, window back to 2
        assert src.prefetched == [] and stream.window == 2

        # warm: readahead of cached chunks pages them in, and asks the source to load nothing
        cache.write(list(chunks.items()))
        src.generation += 1
        loads = len(src.loads)
        warm = Stream(fetcher, entry)
        for off in range(0, 20 * MiB, MiB):
            assert bytes(await warm.read(off, MiB)) == data[off:off + MiB]
        assert src.prefetched == [] and len(src.loads) == loads
        await trio.testing.wait_all_tasks_blocked()
        assert len(src.paged_in) >= 8 and len(set(src.paged_in)) == len(src.paged_in)
        assert src.stats.paged_in == len(src.paged_in)

    async def running():
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)  # readahead's tasks (paging in)
            await main()
            nursery.cancel_scope.cancel()
    trio.run(running)


def _ops(entry: FileEntry, fetcher: Reader) -> tuple[ModelFS, int]:
    m = Manifest(name="m", created="2026-01-01T00:00:00Z", files=(entry,), directories=(), chunking={})
    ns = Namespace(None, None)
    root = ns.root_version("m", "v" * 20, m)
    ops = ModelFS(ns, fetcher)

    async def inode():
        return (await ns.lookup(root, "w.bin")).inode
    return ops, trio.run(inode)


def test_damaged_entry_is_refetched_and_lasting_damage_is_eio(cache):
    entry, data, chunks = make_file([MiB, MiB])
    fetcher, src = reader(cache, chunks)
    ops, ino = _ops(entry, fetcher)
    h0, h1 = entry.chunks[0][0], entry.chunks[1][0]

    async def main():
        fi = await ops.open(ino, os.O_RDONLY, None)
        src.garbage = {h0}
        with pytest.raises(pyfuse3.FUSEError) as e:  # garbage, refetched: garbage again
            await ops.read(fi.fh, 0, 4096)
        assert e.value.errno == errno.EIO
        assert (h0, True) in src.loads
        src.garbage = set()
        assert bytes(await ops.read(fi.fh, 0, 4096)) == data[:4096]  # a good copy heals it
        src.failing = {h1}
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh, MiB, 4096)
        assert e.value.errno == errno.EIO
        assert bytes(await ops.read(fi.fh, 4096, 4096)) == data[4096:8192]  # others still serve
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh + 100, 0, 1)
        assert e.value.errno == errno.EBADF
    trio.run(main)


class SealedSource(FakeSource):
    """A sealed cache (``--encrypt-cache``): entries are a stand-in ciphertext (the bytes
    reversed), which ``unseal`` checks against the chunk id as decryption would."""

    def __init__(self, cache: BlockCache, chunks: dict[str, bytes]):
        super().__init__(cache, {h: b[::-1] for h, b in chunks.items()})
        self.unseals: list[str] = []

    def holds(self, h: str) -> bool:
        return False

    async def unseal(self, h: str, size: int) -> bytes | None:
        self.unseals.append(h)
        stored = self.cache.with_chunk(h, bytes)
        if stored is None:
            return None
        if chunk_hash(stored[::-1]) != h:
            raise IntegrityError(f"chunk {h[:16]} does not decrypt")
        return stored[::-1]


def test_sealed_cache_spans_load_each_chunk_once_and_refetch_damage(cache):
    entry, data, chunks = make_file([300_000, MiB, 5, 700_000])
    src = SealedSource(cache, chunks)
    fetcher = Reader(CacheView(cache), src, unsealer=src)
    h1 = entry.chunks[1][0]

    async def main():
        rnd = __import__("random").Random(5)
        for _ in range(100):
            off = rnd.randrange(entry.size)
            end = min(entry.size, off + rnd.choice([1, 4096, 131072, MiB]))
            assert bytes(await fetcher.span(entry, off, end)) == data[off:end]
        assert bytes(await fetcher.span(entry, 0, entry.size)) == data
        assert len(src.loads) == len(chunks)  # once each: the cache holds them
        assert set(src.unseals) == set(chunks)
        # damaged on disk: refetched, and while every copy is damaged, an error, never its bytes
        cache.delete([h1])
        src.garbage = {h1}
        with pytest.raises(IntegrityError):
            await fetcher.span(entry, 300_000, 300_000 + 4096)
        assert (h1, True) in src.loads
        src.garbage = set()
        assert bytes(await fetcher.span(entry, 300_000, 300_000 + 4096)) == data[300_000:304_096]
    trio.run(main)


def test_lanes_single_flight_and_timeout_against_a_hung_store(cache, monkeypatch):
    silent = Silent()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = Store("b", StoreConfig(endpoint_url=f"http://127.0.0.1:{silent.port}", region="us-east-1"))
    lanes = Lanes(Registry(store, RegistryRef("b", "reg")), cache,
                  LaneConfig(workers=1, concurrency=2, fetch_timeout=30, timeouts=Timeouts(read=600, attempts=1)))
    errors: list[BaseException] = []

    async def reader():
        try:
            await lanes.load("ab" * 32, 1000)
        except StoreUnavailableError as e:
            errors.append(e)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(lanes.run)
            async with trio.open_nursery() as readers:
                for _ in range(16):
                    readers.start_soon(reader)
            n.cancel_scope.cancel()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.5))
    finally:
        lanes.close(grace=1)
        silent.close()
    assert len(errors) == 16 and "not fetched within 30 s" in str(errors[0])
    assert silent.requests == 1  # 16 readers, one GET


def test_readahead_waits_in_the_daemon_and_a_reader_s_chunk_goes_next(cache, monkeypatch):
    """Readahead's loads wait in ``Lanes``, not in the workers: a worker holds at most its
    allowance, so a chunk a reader comes to want is fetched next (promoted), ahead of
    those queued before it; every chunk is fetched once and its bytes are the ones stored."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    rnd = __import__("random").Random(3)
    registry_probe = Registry(Store("b", StoreConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1")),
                              RegistryRef("b", "reg"))
    raws = [rnd.randbytes(64 << 10) for _ in range(12)]
    named = [registry_probe.codec.name(r) for r in raws]
    objects = {h: b"".join(registry_probe.codec.encode_parts(r, h, False, d)) for r, (h, d) in zip(raws, named)}
    hs = [h for h, _ in named]
    store = Gated(objects)
    registry = Registry(Store("b", StoreConfig(endpoint_url=store.endpoint, region="us-east-1")), RegistryRef("b", "reg"))
    lanes = Lanes(registry, cache, LaneConfig(workers=1, concurrency=2, timeouts=Timeouts(attempts=1)))
    assert lanes.allowance == 3  # 2 threads and a spare

    async def main():
        async with trio.open_nursery() as n:
            await n.start(lanes.run)
            for h, r in zip(hs[:10], raws):
                lanes.load_ahead(h, len(r))
            assert lanes.queued == 10 - lanes.allowance  # the rest wait here
            while len(store.order) < 2:  # both threads are in a GET, held by the store
                await trio.sleep(0.01)
            async with trio.open_nursery() as readers:
                readers.start_soon(lambda: lanes.load(hs[8], len(raws[8])))  # queued: promoted
                readers.start_soon(lambda: lanes.load(hs[11], len(raws[11])))  # never asked: sent at once
                # both sent (not a fixed wait: on a loaded machine signing them may take longer),
                # then time for the worker to take them in before the store lets the GETs go
                while lanes.in_flight < 11 or lanes.queued > 6:
                    await trio.sleep(0.01)
                await trio.sleep(0.2)
                store.gate.set()
            while lanes.in_flight:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        lanes.close(grace=5)
        store.close()
    assert set(store.order[:2]) < set(hs[:3])  # the two GETs the store held (sends may cross)
    assert set(store.order[2:4]) == {hs[8], hs[11]}  # the readers' chunks next, before 2..7
    assert sorted(store.order) == sorted(hs[:10] + [hs[11]])  # each fetched once
    assert store.most_held <= 2  # never more GETs than threads
    for h, r in zip(hs, raws):
        if h != hs[10]:
            assert cache.with_chunk(h, bytes) == r


def test_an_upload_sent_again_after_its_worker_died_is_put_without_a_head(cache):
    """A worker killed in the middle of a PUT may leave a torn object behind (SeaweedFS kept
    a 0-byte one, which a HEAD then found 'present'): an upload sent again after its
    worker died is PUT again, never skipped on a HEAD; a first one may skip."""
    import socket

    from modelfs.transfer.lanes import _Proc
    from modelfs.transfer.protocol import Go, decode

    lanes = Lanes(None, cache)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    answers = []

    async def ask(retried: bool) -> None:
        flight = _Flight(Kind.UPLOAD, "", 10, out=(0, 0))
        flight.decide = lambda h: Go(0, head="http://s/head", put="http://s/put")
        flight.retried = retried
        p = _Proc(None, ours, trio.socket.from_stdlib_socket(ours), 0.0)
        await lanes._answer(p, 1, flight, "ab" * 32)
        answers.append(decode(theirs.recv(65536)))
    try:
        trio.run(ask, False)
        trio.run(ask, True)
    finally:
        ours.close()
        theirs.close()
    assert answers[0].head == "http://s/head" and answers[0].put == "http://s/put"
    assert answers[1].head is None and answers[1].put == "http://s/put" and not answers[1].skip


def _safetensors_entry(layers: int = 6) -> tuple[FileEntry, bytes, dict[str, bytes], list[str]]:
    """A safetensors file in a checkpoint's module order (q, k, v, o, gate, up, down per
    layer, 2 MiB each), cut into 1 MiB chunks; and its tensor names."""
    from modelfs.dev.sample import safetensors_bytes_header
    spec = {f"model.layers.{i}.{p}.weight": ("F16", [4096, 256]) for i in range(layers)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    head, size = safetensors_bytes_header(spec)
    data = head + __import__("random").Random(4).randbytes(size)
    blobs = [data[i:i + MiB] for i in range(0, len(data), MiB)]
    chunks = {chunk_hash(b): b for b in blobs}
    entry = FileEntry(path="model.safetensors", size=len(data), mode=0o644, sha256="1" * 64,
                      chunks=tuple((chunk_hash(b), len(b)) for b in blobs),
                      description={"format": "safetensors"})
    return entry, data, chunks, sorted(spec)


class LoadingSource(FakeSource):
    """Readahead completes at once (as if the workers were infinitely fast): what is left in
    ``loads`` are the reads that had to wait for a chunk nobody asked for in time."""

    def load_ahead(self, h: str, size: int) -> None:
        self.prefetched.append(h)
        if not self.cache.has(h):
            self.cache.write([(h, self.chunks[h])])
            self.generation += 1


@pytest.mark.parametrize("tensor_order", [True, False])
def test_readahead_follows_the_loaders_tensor_order(cache, tensor_order):
    """A loader walks sorted names (mlp.down, mlp.gate, …, self_attn.v; layers.1, layers.10, …):
    with tensor order almost no read waits for a chunk; in file order the window keeps
    resetting and the reader waits at most tensors."""
    entry, data, chunks, names = _safetensors_entry()
    src = LoadingSource(cache, chunks)
    fetcher = Reader(CacheView(cache), src, ReadaheadConfig(max_bytes=4 * MiB, trigger_bytes=MiB,
                                                           tensor_order=tensor_order))
    stream = Stream(fetcher, entry)
    n = int.from_bytes(data[:8], "little")
    header = __import__("json").loads(data[8:8 + n])
    step = 128 << 10

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)  # learns the order in the background
            await stream.read(0, 8 + n)
            for name in names:  # the loader's order
                lo, hi = (8 + n + x for x in header[name]["data_offsets"])
                for off in range(lo, hi, step):
                    assert bytes(await stream.read(off, min(step, hi - off))) == data[off:min(hi, off + step)]
                    while fetcher.readahead.read_order(entry) is False:  # learned in the background, after this
                        await trio.sleep(0.001)                # first read past the header's chunk
            nursery.cancel_scope.cancel()
    trio.run(main)
    waits = len(src.loads)
    assert isinstance(stream.order, ReadOrder) == tensor_order
    if tensor_order:
        assert waits <= 3, waits  # the header's chunk and the first tensor's start
    else:
        assert waits >= len(names) // 2, waits


class HeaderStuckSource(FakeSource):
    """The header's chunk (the file's first) never arrives."""

    async def load(self, h: str, size: int, *, urgent: bool = True, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> bytes | None:
        if h == self.stuck:
            await trio.sleep_forever()
        return await super().load(h, size, refetch=refetch, pin=pin)


def test_a_random_read_does_not_wait_for_the_reading_order(cache):
    """Learning a safetensors file's tensor order needs its header (the first chunk) and a
    parse: a read elsewhere in the file is served without waiting for either."""
    entry, data, chunks, _ = _safetensors_entry()
    src = HeaderStuckSource(cache, chunks)
    src.stuck = entry.chunks[0][0]
    fetcher = Reader(CacheView(cache), src)
    stream = Stream(fetcher, entry)
    off = entry.offsets[5] + 1000

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            with trio.fail_after(5):
                assert bytes(await stream.read(off, 4096)) == data[off:off + 4096]
            assert stream.order is None and not stream._order_known  # still being learned
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_read_order_from_a_hostile_header_is_none():
    assert ReadOrder.safetensors(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", 100) is None
    assert ReadOrder.safetensors(b"\x02\x00\x00\x00\x00\x00\x00\x00[]", 100) is None
    order = ReadOrder.safetensors(b"\x28\x00\x00\x00\x00\x00\x00\x00"
                                  b'{"b":{"data_offsets":[0,4]},"a":{"data_offsets":[4,999]}}', 200)
    assert order is None or all(0 <= lo < hi <= 200 for lo, hi in order.ranges)


class EvictingSource(FakeSource):
    """A cache too small for its readers: every chunk is evicted as soon as it lands."""

    async def load(self, h: str, size: int, *, urgent: bool = True, refetch: bool = False, pin: bool = False,
                   early: bool = False) -> bytes | None:
        self.loads.append((h, pin))
        await trio.sleep(0)
        if pin:
            return self.chunks[h]
        self.cache.write([(h, self.chunks[h])])
        self.generation += 1
        self.cache.delete([h])
        return None


def test_a_read_makes_progress_when_its_chunks_are_evicted_at_once(cache):
    entry, data, chunks = make_file([MiB, MiB, MiB])
    src = EvictingSource(cache, chunks)
    fetcher = Reader(CacheView(cache), src)

    async def main():
        assert bytes(await fetcher.span(entry, MiB - 10, 2 * MiB + 10)) == data[MiB - 10:2 * MiB + 10]
    trio.run(main)
    assert {h for h, pin in src.loads if pin} == {entry.chunks[0][0], entry.chunks[1][0], entry.chunks[2][0]}


def test_unsealer_decrypts_once_for_concurrent_readers_and_refuses_damage(cache):
    from modelfs.format.encryption import RegistryKey

    key = RegistryKey.generate()
    store = Store("b", StoreConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))  # never called
    registry = Registry(store, RegistryRef("b", "reg"), key)
    lanes = Lanes(registry, cache, LaneConfig(workers=1, sealed=True))
    unsealer = Unsealer(lanes, cache, registry.codec)
    raw = os.urandom(3 * MiB)
    h = registry.codec.hash(raw)
    cache.write([(h, registry.codec.encode(raw, h))])
    decrypts = []
    decode = registry.codec.decode
    registry.codec.decode = lambda *a, **kw: decrypts.append(a[1]) or decode(*a, **kw)

    async def _append(out, coro):
        out.append(await coro)

    async def main():
        got = []
        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(lambda: _append(got, unsealer.unseal(h, len(raw))))
        assert len(got) == 8 and all(bytes(g) == raw for g in got)
        assert decrypts == [h]  # once, for all eight
        assert await unsealer.unseal("ab" * 32, 10) is None  # not cached
        unsealer._plain.clear()
        with cache.env.begin(write=True) as txn:  # one bit flipped on disk
            blob = bytearray(txn.get(bytes.fromhex(h), db=cache.chunks))
            blob[len(blob) // 2] ^= 1
            txn.put(bytes.fromhex(h), bytes(blob), db=cache.chunks)
        with pytest.raises(IntegrityError, match="does not decrypt"):
            await unsealer.unseal(h, len(raw))
    trio.run(main)


def test_peeks_are_made_only_where_whole_chunks_arrive_slowly(tmp_path):
    """``Lanes.peek`` declines (the reader loads the whole chunk) when the last fetches
    say whole chunks arrive fast, or when the chunk is already loading and due soon."""
    import time

    reg = Registry(Store("b", StoreConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1")),
                   RegistryRef("b", "reg"))
    cache = BlockCache(tmp_path / "c", 1 << 30)
    lanes = Lanes(reg, cache)
    try:
        assert lanes.stats.whole_chunk_seconds() is None  # nothing known yet: peeks would be made
        lanes.stats.recent_latencies.extend([0.010] * 32)  # a store on this host
        assert trio.run(lanes.peek, "a" * 64, 4 * MiB, 0, 4096) is None
        assert lanes.in_flight == 0 and lanes.stats.errors == 0  # nothing was even tried
        lanes.stats.recent_latencies.extend([0.080] * 32)  # a far one
        assert lanes.stats.whole_chunk_seconds() == 0.080
        due = _Flight(Kind.LOAD, "b" * 64, 4 * MiB, urgent=False)
        due.started = time.monotonic() - 0.070  # due in ~10 ms: wait for it
        lanes._flights[due.h] = due
        assert trio.run(lanes.peek, due.h, 4 * MiB, 0, 4096) is None and lanes.stats.errors == 0
    finally:
        cache.close()


def test_readahead_survives_read_around_requests_answered_out_of_order(cache):
    """The kernel sends an mmap fault's read-around as several requests and they arrive in
    any order (seen: 6 MiB before 5 MiB): a reader moving forward like that is still
    sequential, and its window grows instead of resetting at every pair."""
    entry, data, chunks = make_file([MiB] * 48)
    fetcher, src = reader(cache, chunks, max_bytes=16 * MiB, trigger_bytes=2 * MiB)
    stream = Stream(fetcher, entry)

    async def main():
        for pair in range(0, 24, 2):  # (1, 0), (3, 2), (5, 4), … MiB
            for off in ((pair + 1) * MiB, pair * MiB):
                assert bytes(await stream.read(off, MiB)) == data[off:off + MiB]
        assert stream.window == stream.max_window == 16
        index = {h: i for i, (h, _) in enumerate(entry.chunks)}
        assert max(index[h] for h in src.prefetched) >= 24 + 8  # well ahead of the reader
    trio.run(main)


def _shards(n: int, chunks_each: int) -> tuple[Manifest, dict[str, bytes], list[bytes]]:
    rnd = __import__("random").Random(7)
    files, chunks, datas = [], {}, []
    for s in range(n):
        blobs = [rnd.randbytes(MiB) for _ in range(chunks_each)]
        chunks.update((chunk_hash(b), b) for b in blobs)
        datas.append(b"".join(blobs))
        files.append(FileEntry(path=f"w/model-{s + 1:05d}-of-{n:05d}.bin", size=len(datas[-1]), mode=0o644,
                               sha256=f"{s:064x}", chunks=tuple((chunk_hash(b), len(b)) for b in blobs)))
    files.append(FileEntry(path="w/config.json", size=0, mode=0o644, sha256="f" * 64, chunks=()))
    m = Manifest(name="m", created="2026-01-01T00:00:00Z", files=tuple(files), directories=("w",), chunking={})
    return m, chunks, datas


def test_a_reader_reaching_a_files_end_reads_ahead_into_the_next_shard(cache):
    """A loader moving from one shard to the next finds the next one's first chunks
    loading already, and its stream starts at the pace the last one ended at: no idle
    link between shards, no window ramping up again from two chunks."""
    m, chunks, datas = _shards(3, 12)
    fetcher, src = reader(cache, chunks, max_bytes=8 * MiB, trigger_bytes=2 * MiB)
    ahead = fetcher.readahead
    one, two, three = m.files[:3]
    assert ahead.successor(m, one) is two and ahead.successor(m, two) is three
    assert ahead.successor(m, three) is None and ahead.successor(m, m.files[3]) is None  # other suffix

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            stream = Stream(fetcher, one, m)
            nexts = {h: i for i, (h, _) in enumerate(two.chunks)}
            for off in range(0, one.size, MiB):
                assert bytes(await stream.read(off, MiB)) == datas[0][off:off + MiB]
                if off == 6 * MiB:  # read to 7 MiB: the window (8 MiB) reaches 3 MiB past the end, no further
                    await trio.testing.wait_all_tasks_blocked()
                    assert max(nexts[h] for h in src.prefetched if h in nexts) == 2
            await trio.testing.wait_all_tasks_blocked()
            asked = set(src.prefetched)
            assert {h for h, _ in two.chunks[:8]} <= asked  # the whole window, ahead of any read of it
            assert not {h for h, _ in three.chunks} & asked  # one file ahead, not two
            nxt = Stream(fetcher, two, m)
            assert nxt.window > fetcher.readahead.config.first_window and nxt.run_bytes >= MiB * 2
            before = len(src.prefetched)
            assert bytes(await nxt.read(0, MiB)) == datas[1][:MiB]
            assert len(src.prefetched) > before  # the first read already reads ahead
            nursery.cancel_scope.cancel()
    trio.run(main)

    # a reader that stops early, or jumps around, does not touch the next file
    fetcher, src = reader(cache, chunks, max_bytes=8 * MiB, trigger_bytes=2 * MiB)
    stream = Stream(fetcher, one, m)

    async def partial():
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            for off in (0, 5 * MiB, 2 * MiB, 9 * MiB, MiB):
                await stream.read(off, 4096)
            await trio.testing.wait_all_tasks_blocked()
            assert not {h for h, _ in two.chunks} & set(src.prefetched)
            nursery.cancel_scope.cancel()
    trio.run(partial)


def test_against_a_far_store_the_window_grows_with_the_fetch_rate(cache):
    """Near (chunks in ms) a window stops at --readahead; against a far store (chunks take
    tens of ms) it holds ~2 s of what the fetches bring lately, at most 4 × --readahead,
    so a loader busy copying tensors does not leave the link idle."""
    import time as _time
    entry, data, chunks = make_file([MiB] * 8)
    fetcher, src = reader(cache, chunks, max_bytes=16 * MiB)
    stream = Stream(fetcher, entry)
    st = src.stats
    assert fetcher.readahead.window_cap() == 16 * MiB and stream.max_window == 16  # nothing known yet
    now = _time.monotonic()
    for i in range(32):  # near: 5 ms a chunk, 400 MB/s
        st.recent_latencies.append(0.005)
        st.recent_fetches.append((now - i * 0.01, 4 * MiB))
    assert not st.far() and fetcher.readahead.window_cap() == 16 * MiB
    for _ in range(32):  # far: 300 ms a chunk; 60 MiB in the last 2 s
        st.recent_latencies.append(0.3)
    st.recent_fetches.clear()
    st.recent_fetches.extend((now - i * 0.1, 3 * MiB) for i in range(20))
    assert st.far() and fetcher.readahead.window_cap() == 60 * MiB
    st.recent_fetches.extend((now, 64 * MiB) for _ in range(8))  # very fast lately: capped
    assert fetcher.readahead.window_cap() == 64 * MiB and stream.max_window == 64

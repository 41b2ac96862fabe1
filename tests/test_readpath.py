"""The read path's promises on real FUSE + SeaweedFS: fetched is cached, single flight within a
mount and across mounts, a killed fetch worker never hangs or lies, bounded memory."""

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from modelfs.mount.metrics import read_stats
from modelfs.dev.sample import layer_tensors, write_safetensors

from conftest import _alive, cli, gets, ranged_gets

MiB = 1 << 20


def publish(env, bucket, src, name="m"):
    cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", name, "-q")
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/{name}").stdout)
    return {c[0] for f in doc["files"] for c in f["chunks"]}


@pytest.fixture
def model(tmp_path):
    """~72 MiB safetensors file: ~18 chunks."""
    d = tmp_path / "model"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(96, 256), seed=5)
    return d


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()


def settle(seaweed, bucket, timeout=5.0) -> int:
    """GET count once the server's counters stop moving (they update when requests finish)."""
    last, t = gets(seaweed, bucket), time.monotonic()
    while time.monotonic() - t < timeout:
        time.sleep(0.3)
        now = gets(seaweed, bucket)
        if now == last:
            return now
        last = now
    return last


def wait_gone(pids, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a daemon or worker outlived its stop"


@pytest.mark.parametrize("stop", ["unmount", "sigterm"])
def test_stop_right_after_a_cold_read_keeps_every_fetched_chunk(stop, env, bucket, model, mounts, seaweed):
    publish(env, bucket, model)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    want = sha(model / "model.safetensors")
    workers = read_stats(mnt).worker_pids
    assert workers and all(_alive(p) for p in workers)
    assert sha(mnt / "model.safetensors") == want
    pid = mounts.pid(mnt)
    if stop == "unmount":  # at once: readahead may still be in flight
        mounts.unmount(mnt)
    else:
        os.kill(pid, signal.SIGTERM)
    wait_gone([pid, *workers])
    mnt2 = mounts.mount(f"s3://{bucket}/reg/m")
    before = settle(seaweed, bucket)
    assert sha(mnt2 / "model.safetensors") == want
    assert settle(seaweed, bucket) == before  # every chunk came from the cache
    s = read_stats(mnt2)  # warm readahead pages cached chunks in on the daemon's threads, no worker
    assert s.paged_in > 0 and s.cache_hits == 0 and s.fetches == 0


def test_16_concurrent_readers_fetch_each_chunk_once(env, bucket, model, mounts, seaweed):
    chunks = publish(env, bucket, model)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    want = sha(model / "model.safetensors")
    before = settle(seaweed, bucket)
    with ThreadPoolExecutor(16) as ex:
        assert set(ex.map(lambda _: sha(mnt / "model.safetensors"), range(16))) == {want}
    assert settle(seaweed, bucket) - before == len(chunks)


def test_two_mounts_reading_at_once_fetch_a_shared_chunk_once(env, bucket, model, mounts, seaweed):
    chunks = publish(env, bucket, model)
    a = mounts.mount(f"s3://{bucket}/reg/m")
    b = mounts.mount(f"s3://{bucket}/reg")  # another daemon, same cache dir
    want = sha(model / "model.safetensors")
    before = settle(seaweed, bucket)
    with ThreadPoolExecutor(4) as ex:
        paths = [a / "model.safetensors", b / "m" / "latest" / "model.safetensors"] * 2
        assert set(ex.map(sha, paths)) == {want}
    # the registry mount's listing, tag and manifest GETs, plus each chunk exactly once
    assert settle(seaweed, bucket) - before <= len(chunks) + 3


def test_killed_worker_is_replaced_and_readers_get_bytes_or_eio(env, bucket, model, mounts):
    publish(env, bucket, model)
    mnt = mounts.mount(f"s3://{bucket}/reg/m", "--fetch-workers", "2")
    src = (model / "model.safetensors").read_bytes()
    victims = read_stats(mnt).worker_pids
    assert len(victims) == 2
    results: list = []

    def reader():
        try:
            with open(mnt / "model.safetensors", "rb") as f:
                results.append(f.read())
        except OSError as e:
            results.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    for p in victims:
        os.kill(p, signal.SIGKILL)
    t.join(90)
    assert not t.is_alive(), "a reader hung after its worker was killed"
    assert results[0] == src or (isinstance(results[0], OSError) and results[0].errno == 5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = read_stats(mnt)
        if len(s.worker_pids) == 2 and not set(s.worker_pids) & set(victims):
            break
        time.sleep(0.1)
    assert len(s.worker_pids) == 2 and not set(s.worker_pids) & set(victims) and s.worker_restarts >= 2
    # the replacements serve: a fresh read of the whole file is right
    os.posix_fadvise(os.open(mnt / "model.safetensors", os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    assert sha(mnt / "model.safetensors") == hashlib.sha256(src).hexdigest()


def _private_mib(pids) -> float:
    """Memory the processes own (anonymous pages), summed: what the bound is about.
    The cache's mapped file pages are the kernel's page cache, reclaimable, and not counted."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        except (FileNotFoundError, StopIteration):
            pass
    return total / 1024


def test_memory_stays_bounded_on_a_large_cold_read(env, bucket, tmp_path, mounts):
    d = tmp_path / "large"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(384, 256), seed=9)  # ~290 MiB
    publish(env, bucket, d)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    pids = [mounts.pid(mnt), *read_stats(mnt).worker_pids]
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _private_mib(pids))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        with ThreadPoolExecutor(4) as ex:  # four readers at once, cold
            assert len(set(ex.map(lambda _: sha(mnt / "model.safetensors"), range(4)))) == 1
    finally:
        done.set()
        t.join()
    assert 0 < peak[0] < 512, f"{peak[0]:.0f} MiB"


def _chunk_at(env, bucket, index, name="m"):
    """(id, size, file offset) of chunk ``index`` of model.safetensors."""
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/{name}").stdout)
    chunks = next(f for f in doc["files"] if f["path"] == "model.safetensors")["chunks"]
    return chunks[index][0], chunks[index][1], sum(n for _, n in chunks[:index])


def test_a_small_cold_read_gets_just_its_blocks_and_the_chunk_is_cached_behind_it(
        env, bucket, model, mounts, seaweed):
    publish(env, bucket, model)
    h, n, at = _chunk_at(env, bucket, 5)
    src = (model / "model.safetensors").read_bytes()
    off = at + n // 2 + 4321  # inside a block in the middle of the chunk
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    whole, ranged = gets(seaweed, bucket) - ranged_gets(seaweed, bucket), ranged_gets(seaweed, bucket)
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, off) == src[off:off + 4096]
    finally:
        os.close(fd)
    assert read_stats(mnt).peeks >= 1  # (and the header's first bytes, for the reading order)
    settle(seaweed, bucket)
    assert ranged_gets(seaweed, bucket) - ranged > 0
    assert gets(seaweed, bucket) - ranged_gets(seaweed, bucket) - whole >= 1  # the whole chunk, behind it
    mounts.unmount(mnt)
    again = mounts.mount(f"s3://{bucket}/reg/m")
    before = settle(seaweed, bucket)
    fd = os.open(again / "model.safetensors", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, off) == src[off:off + 4096]
        o = at + n // 4 + 17  # elsewhere in the chunk
        assert os.pread(fd, 4096, o) == src[o:o + 4096]
    finally:
        os.close(fd)
    assert settle(seaweed, bucket) == before and read_stats(again).peeks == 0  # from the cache


def test_a_damaged_block_is_eio_and_the_chunks_good_blocks_still_serve(env, bucket, model, mounts, s3):
    from modelfs.format.chunking import BLOCK
    from modelfs.format.codec import head_size

    publish(env, bucket, model)
    h, n, at = _chunk_at(env, bucket, 4)
    key = f"reg/chunks/{h}"
    blob = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[head_size(n) + 10 * BLOCK + 99] ^= 0x40  # block 10's payload
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(blob))
    src = (model / "model.safetensors").read_bytes()
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, at + 10 * BLOCK + 64)
        assert e.value.errno == 5  # EIO: neither the block nor the whole chunk passes its check
        good = at + 2 * BLOCK + 5
        assert os.pread(fd, 4096, good) == src[good:good + 4096]  # block 2 is checked on its own
    finally:
        os.close(fd)
    assert read_stats(mnt).peeks >= 1


def test_a_version_published_before_block_digests_still_reads(env, bucket, registry, model, mounts, seaweed):
    """Chunks named by BLAKE3 of their bytes, stored without digests (modelfs before
    2026-11-23): a mount reads them whole, byte-identical, and never asks for ranges."""
    from modelfs.format.chunking import DEFAULT_PARAMS, cut, plain_hash
    from modelfs.format.codec import encode_parts
    from modelfs.format.manifest import FileEntry, Manifest

    data = (model / "model.safetensors").read_bytes()
    chunks = []
    for o, k in cut(data, DEFAULT_PARAMS):
        raw = data[o:o + k]
        h = plain_hash(raw)
        registry.store.put(registry.chunk_key(h), b"".join(encode_parts(raw, digests=None)))
        chunks.append((h, k))
    entry = FileEntry(path="model.safetensors", size=len(data), mode=0o644,
                      sha256=hashlib.sha256(data).hexdigest(), chunks=tuple(chunks))
    m = Manifest(name="old", created="2026-11-01T00:00:00Z", files=(entry,), directories=(),
                 chunking=DEFAULT_PARAMS.as_json(), chunk_hash="blake3")
    registry.set_tag("old", "prod", registry.put_manifest(m))
    mnt = mounts.mount(f"s3://{bucket}/reg/old@prod")
    ranged = ranged_gets(seaweed, bucket)
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    try:
        off = chunks[0][1] + 5000
        assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    assert sha(mnt / "model.safetensors") == hashlib.sha256(data).hexdigest()
    assert read_stats(mnt).peeks == 0 and ranged_gets(seaweed, bucket) == ranged
    # publishing it again names its chunks by their blocks: every chunk is new to the store
    publish(env, bucket, model, name="old")
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/old").stdout)
    assert doc["hashes"]["chunk"] == "blake3-blocks"
    assert not {c[0] for f in doc["files"] for c in f["chunks"]} & {h for h, _ in chunks}


def test_a_cold_read_does_not_wait_for_the_cache_write(env, bucket, model, mounts):
    """A reader waits for its chunk's GET and id check, not for the LMDB commit: with the
    cache's one write lock held by another process, a cold read of a chunk still returns
    its bytes; the chunk lands in the cache once the lock is free (fetched is cached)."""
    from modelfs.cache import BlockCache

    publish(env, bucket, model)
    h, n, at = _chunk_at(env, bucket, 6)
    off, size = (at // 4096 + 2) * 4096, 512 * 1024  # within the chunk, whole pages; larger than a peek
    assert off + 2 * MiB <= at + n  # the kernel asks for up to 1 MiB more (readahead): all in this chunk
    src = (model / "model.safetensors").read_bytes()
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    cache = BlockCache(mounts.cache_dir, 1 << 30)
    ex = ThreadPoolExecutor(1)
    try:
        txn = cache.env.begin(write=True)  # LMDB's writer lock, shared by every process
        try:
            got = ex.submit(os.pread, fd, size, off)
            assert got.result(timeout=30) == src[off:off + size]
        finally:
            txn.abort()  # before waiting for the reader's thread: it may be stuck on this lock
            ex.shutdown()
        deadline = time.monotonic() + 30
        while not cache.has(h):
            assert time.monotonic() < deadline, "the chunk never reached the cache"
            time.sleep(0.05)
    finally:
        os.close(fd)
        cache.close()


def test_shards_read_in_turn_are_fetched_once_and_the_next_one_is_read_ahead(env, bucket, tmp_path, mounts, seaweed):
    """A loader's shards, one after another: every byte right, every chunk fetched once
    (readahead into the next shard included), and a reader finishing one shard has the
    next one's head loading before it opens it, not the one after."""
    d = tmp_path / "sharded"
    d.mkdir()
    for i in range(3):
        write_safetensors(d / f"model-{i + 1:05d}-of-00003.safetensors", layer_tensors(24, 256, first=i * 24), seed=i)
    cli(env, "publish", str(d), f"s3://{bucket}/reg", "--name", "m", "-q")
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    chunks = {f["path"]: [c[0] for c in f["chunks"]] for f in doc["files"]}
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    names = sorted(chunks)
    before = settle(seaweed, bucket) - ranged_gets(seaweed, bucket)

    def whole_gets() -> int:  # not a small read's ranged GETs (its blocks, before the chunk)
        return settle(seaweed, bucket) - ranged_gets(seaweed, bucket) - before

    assert sha(mnt / names[0]) == sha(d / names[0])  # read in order, like a copy
    fetched = whole_gets()
    first, second = set(chunks[names[0]]), set(chunks[names[1]])
    assert len(first) < fetched <= len(first | second)  # ahead into the next shard, not past it
    with ThreadPoolExecutor(2) as ex:  # the rest, and a reader jumping around at the same time
        jumps = ex.submit(lambda: [(n, o, _pread(mnt / n, o)) for n in names for o in (5 * MiB, 17, 3 * MiB)])
        assert [sha(mnt / n) for n in names[1:]] == [sha(d / n) for n in names[1:]]
        for n, o, got in jumps.result():
            assert got == _pread(d / n, o)
    assert whole_gets() == len(set().union(*map(set, chunks.values())))  # each chunk once


def _pread(path, off: int, n: int = 100_000) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, off)

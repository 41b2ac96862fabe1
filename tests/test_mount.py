"""Real FUSE mounts on a real SeaweedFS: bytes, laziness, cache, tags, corruption, lifecycle."""

import errno
import hashlib
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.cache import BlockCache
from modelfs.dev.sample import layer_tensors, write_safetensors

from conftest import cli, damage_cache_entry, gets, ranged_gets, settled_counts, tree_digest


def publish(env, bucket, src, name="m", *tags):
    out = cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", name, "-q",
              *[a for t in tags for a in ("--tag", t)]).stdout
    return out.split("@")[1].split()[0]


def test_three_forms_read_byte_identical(env, bucket, sample_model, mounts, tmp_path):
    version = publish(env, bucket, sample_model, "m", "prod")
    want = tree_digest(sample_model)
    one = mounts.mount(f"s3://{bucket}/reg/m@prod")
    assert tree_digest(one) == want
    reg = mounts.mount(f"s3://{bucket}/reg")
    # a documented attribute has its value whatever was accessed first (issue 13: it was empty)
    created = os.getxattr(reg / "m" / "prod", "user.modelfs.created").decode()
    assert created and created == os.getxattr(reg / "m" / "versions" / version, "user.modelfs.created").decode()
    assert sorted(os.listdir(reg)) == ["m"]
    assert sorted(os.listdir(reg / "m")) == ["latest", "prod", "versions"]
    assert os.listdir(reg / "m" / "versions") == [version]
    assert tree_digest(reg / "m" / "prod") == want
    assert tree_digest(reg / "m" / "versions" / version) == want
    assert not (reg / "m" / "versions" / ("0" * 20)).exists()
    manifest = tmp_path / "m.manifest.json"
    manifest.write_text(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m@prod").stdout)
    assert tree_digest(mounts.mount(str(manifest))) == want


def test_xattrs_and_read_only(env, bucket, sample_model, mounts):
    version = publish(env, bucket, sample_model)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    f = mnt / "model-00001-of-00002.safetensors"
    assert os.getxattr(f, "user.modelfs.version").decode() == version
    assert os.getxattr(f, "user.modelfs.sha256").decode() == hashlib.sha256(
        (sample_model / f.name).read_bytes()).hexdigest()
    desc = json.loads(os.getxattr(f, "user.modelfs.description"))
    assert desc["format"] == "safetensors" and desc["tensors"] > 0
    assert "user.modelfs.sha256" in os.listxattr(f)
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.nothing")
    assert e.value.errno == errno.ENODATA
    for attempt in (lambda: open(f, "r+b"), lambda: open(mnt / "new", "wb"), lambda: os.unlink(f),
                    lambda: os.chmod(f, 0o777), lambda: os.mkdir(mnt / "d"),
                    lambda: os.setxattr(f, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


@pytest.fixture
def big(tmp_path):
    """A ~72 MiB safetensors model of many chunks."""
    d = tmp_path / "big"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(96, 256), seed=11)
    (d / "small.json").write_text('{"a": 1}')
    return d


def test_random_preads_and_concurrent_readers(env, bucket, big, mounts):
    publish(env, bucket, big)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    src = (big / "model.safetensors").read_bytes()
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    entry = next(f for f in doc["files"] if f["path"] == "model.safetensors")
    bounds, pos = [], 0
    for _, n in entry["chunks"]:
        pos += n
        bounds.append(pos)
    assert len(bounds) >= 10
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    try:
        @settings(max_examples=150, deadline=None, database=None)
        @given(anchor=st.sampled_from([0, len(src)] + bounds), delta=st.integers(-300_000, 300_000),
               size=st.sampled_from([1, 4096, 131072, 1 << 20, 9 << 20]))
        def check(anchor, delta, size):
            off = max(0, anchor + delta)
            assert os.pread(fd, size, off) == src[off:off + size]
        check()
        assert os.pread(fd, 100, len(src) + 5) == b""
    finally:
        os.close(fd)

    # 16 threads: the same file at random places, and whole files, at once
    errors = []
    small = (big / "small.json").read_bytes()

    def reader(i):
        try:
            rng = random.Random(i)
            if i % 2:
                with open(mnt / "model.safetensors", "rb") as f:
                    for _ in range(20):
                        off = rng.randrange(len(src))
                        f.seek(off)
                        assert f.read(200_000) == src[off:off + 200_000]
            else:
                assert (mnt / "model.safetensors").read_bytes() == src
                assert (mnt / "small.json").read_bytes() == small
        except Exception as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_safe_open_through_mount(env, bucket, tmp_path, mounts):
    safetensors = pytest.importorskip("safetensors")
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(12, 128, dtype="F16"), seed=5)
    publish(env, bucket, d)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    with safetensors.safe_open(str(d / "model.safetensors"), "numpy") as a, \
            safetensors.safe_open(str(mnt / "model.safetensors"), "numpy") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == 12 * 6
        for k in a.keys():
            assert (a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes())


def test_lazy_first_bytes_fetch_one_chunk(env, bucket, tmp_path, mounts, seaweed, s3):
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(340, 256), seed=2)  # ~256 MiB
    assert (d / "model.safetensors").stat().st_size >= 250 << 20
    publish(env, bucket, d)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    before, ranged = gets(seaweed, bucket), ranged_gets(seaweed, bucket)
    with open(mnt / "model.safetensors", "rb") as f:
        head = f.read(4096)
    time.sleep(0.5)
    assert head == (d / "model.safetensors").read_bytes()[:4096]
    # the first chunk, whole; before it, perhaps its first blocks (one ranged GET): nothing else
    peeked = ranged_gets(seaweed, bucket) - ranged
    assert peeked <= 1 and gets(seaweed, bucket) - before - peeked == 1


def test_second_mount_reads_from_cache_with_zero_gets(env, bucket, big, sample_model, mounts, seaweed):
    publish(env, bucket, big)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    want = tree_digest(big)
    assert tree_digest(mnt) == want
    mounts.unmount(mnt)
    mnt2 = mounts.mount(f"s3://{bucket}/reg/m")
    before = gets(seaweed, bucket)
    assert tree_digest(mnt2) == want
    time.sleep(0.5)
    assert gets(seaweed, bucket) - before == 0


def test_a_remount_within_the_ttl_starts_from_the_cache_alone(env, bucket, sample_model, tmp_path, mounts, seaweed):
    """A warm start asks the store nothing before serving: the tag as this host resolved it
    within --metadata-ttl, the manifest and the registry's encryption check from the cache.
    A tag moved since is seen once the TTL is over."""
    v1 = publish(env, bucket, sample_model, "m", "prod")
    m2 = tmp_path / "m2"
    shutil.copytree(sample_model, m2)
    (m2 / "config.json").write_text('{"model_type": "llama", "version": 2}')
    v2 = publish(env, bucket, m2, "m", "staging")
    ref = f"s3://{bucket}/reg/m@prod"
    mnt = mounts.mount(ref)
    assert (mnt / "config.json").read_bytes() == (sample_model / "config.json").read_bytes()
    mounts.unmount(mnt)
    cli(env, "tag", f"s3://{bucket}/reg/m@{v2}", "prod")
    before = gets(seaweed, bucket)
    mnt = mounts.mount(ref, mnt=mnt)
    assert os.getxattr(mnt, "user.modelfs.version").decode() == v1
    assert (mnt / "config.json").read_bytes() == (sample_model / "config.json").read_bytes()
    time.sleep(0.5)
    assert gets(seaweed, bucket) == before  # no tag, manifest or chunk GET
    mounts.unmount(mnt)
    time.sleep(1.2)
    mnt = mounts.mount(ref, "--metadata-ttl", "1", mnt=mnt)
    assert os.getxattr(mnt, "user.modelfs.version").decode() == v2
    assert (mnt / "config.json").read_bytes() == (m2 / "config.json").read_bytes()


def test_a_cold_start_resolves_its_ref_once(env, bucket, sample_model, mounts, seaweed):
    """A cold start's helper resolves the tag beside the daemon's start (mount/resolving.py),
    and the daemon serves what it found from what it recorded: each record is asked for
    once, by the helper (the daemon asks for none, the signature included: what the helper
    found absent counts), and the mount shows that version."""
    v = publish(env, bucket, sample_model, "m", "prod")
    before = settled_counts(seaweed, bucket)
    mnt = mounts.mount(f"s3://{bucket}/reg/m@prod")
    after = settled_counts(seaweed, bucket)
    assert after[("GET", "200")] - before[("GET", "200")] == 2  # the tag, the manifest
    assert after[("GET", "404")] - before[("GET", "404")] == 2  # no encryption marker, no signature
    assert os.getxattr(mnt, "user.modelfs.version").decode() == v
    assert tree_digest(mnt) == tree_digest(sample_model)


def test_cache_smaller_than_model_stays_under_cap(env, bucket, big, mounts, tmp_path):
    publish(env, bucket, big)
    cap = 24 << 20
    cache_dir = tmp_path / "small-cache"
    mnt = mounts.mount(f"s3://{bucket}/reg/m", "--cache-size", str(cap), "--memory-cache", "16M",
                       cache_dir=cache_dir)
    assert tree_digest(mnt) == tree_digest(big)
    mounts.unmount(mnt)
    cache = BlockCache(cache_dir, cap)
    try:
        assert 0 < cache.used_bytes() <= cap
        assert oct(os.stat(cache_dir / "blocks").st_mode & 0o777) == oct(0o700)
    finally:
        cache.close()


def test_tag_move_is_seen_within_ttl_and_open_files_keep_bytes(env, bucket, sample_model, tmp_path, mounts):
    v1 = publish(env, bucket, sample_model, "m", "prod")
    m2 = tmp_path / "m2"
    shutil.copytree(sample_model, m2)
    (m2 / "config.json").write_text('{"model_type": "llama", "version": 2}')
    v2 = publish(env, bucket, m2, "m", "staging")
    mnt = mounts.mount(f"s3://{bucket}/reg", "--metadata-ttl", "1")
    old = (sample_model / "config.json").read_bytes()
    f = open(mnt / "m" / "prod" / "config.json", "rb")
    try:
        assert f.read() == old
        assert os.getxattr(mnt / "m" / "prod", "user.modelfs.version").decode() == v1
        cli(env, "tag", f"s3://{bucket}/reg/m@{v2}", "prod")
        time.sleep(2.5)
        assert (mnt / "m" / "prod" / "config.json").read_bytes() == (m2 / "config.json").read_bytes()
        assert os.getxattr(mnt / "m" / "prod", "user.modelfs.version").decode() == v2
        f.seek(0)
        assert f.read() == old  # the open file still reads the version it opened
    finally:
        f.close()


def test_corrupted_chunk_is_eio_and_other_files_still_serve(env, bucket, big, sample_model, mounts, s3):
    publish(env, bucket, big)
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    entry = next(f for f in doc["files"] if f["path"] == "model.safetensors")
    h, n = entry["chunks"][3]
    key = f"reg/chunks/{h}"
    blob = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[1000] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(blob))
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    offset = sum(c[1] for c in entry["chunks"][:3])
    fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, offset + 10)
        assert e.value.errno == errno.EIO
        src = (big / "model.safetensors").read_bytes()
        assert os.pread(fd, 4096, 0) == src[:4096]  # other chunks of the same file: fine
    finally:
        os.close(fd)
    assert (mnt / "small.json").read_bytes() == (big / "small.json").read_bytes()
    log = next((mounts.cache_dir / "logs").glob("*.log")).read_text()
    assert h in log and "does not match" in log


def test_big_directory_lists_fully(env, bucket, tmp_path, mounts):
    d = tmp_path / "many"
    (d / "shards").mkdir(parents=True)
    names = {f"f{i:05d}.bin" for i in range(10_000)}
    for name in names:
        (d / "shards" / name).write_bytes(b"")
    publish(env, bucket, d)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    assert set(os.listdir(mnt / "shards")) == names
    assert os.stat(mnt / "shards" / "f09999.bin").st_size == 0


def test_mount_failures_are_clear_and_leave_nothing(env, bucket, sample_model, mounts, tmp_path):
    publish(env, bucket, sample_model)
    cases = [
        (f"s3://{bucket}/reg/m", tmp_path / "missing", "does not exist"),
        (f"s3://{bucket}/reg/nope@prod", None, "no model 'nope'"),
        (f"s3://{bucket}/reg/m@nope", None, "no tag 'nope'"),
        ("s3://no-such-bucket/reg", None, "does not exist"),
        (str(tmp_path / "nothing.json"), None, "neither"),
    ]
    for source, mnt, needle in cases:
        if mnt is None:
            mnt = tmp_path / f"mp{len(needle)}"
            mnt.mkdir(exist_ok=True)
        r = mounts.mount(source, mnt=mnt, check=False)
        assert r.returncode != 0 and needle in r.stderr, (source, r.stderr)
        assert r.stderr.strip().startswith("modelfs: error:") and "Traceback" not in r.stderr
        assert not os.path.ismount(mnt)
    busy = mounts.mount(f"s3://{bucket}/reg/m")
    r = mounts.mount(f"s3://{bucket}/reg/m", mnt=busy, check=False)
    assert r.returncode != 0 and "already a mount point" in r.stderr
    mounts.unmount(busy)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    r = mounts.mount(f"s3://{bucket}/reg/m", mnt=full, check=False)
    assert r.returncode != 0 and "is not empty" in r.stderr and "--nonempty" in r.stderr
    assert not os.path.ismount(full)
    over = mounts.mount(f"s3://{bucket}/reg/m", "--nonempty", mnt=full)
    assert "keep.txt" not in os.listdir(over)
    mounts.unmount(over)
    assert (full / "keep.txt").read_text() == "mine"
    for target, needle in ((tmp_path / "mp0", "is not mounted"), (Path("/proc"), "is not a modelfs mount")):
        target.mkdir(exist_ok=True)
        r = cli(env, "unmount", str(target), check=False)
        assert r.returncode != 0 and needle in r.stderr and "Invalid argument" not in r.stderr, r.stderr


def test_two_mounts_share_one_cache_dir(env, bucket, big, sample_model, mounts, seaweed):
    publish(env, bucket, big, "big")
    publish(env, bucket, sample_model, "small")
    small_chunks = len({c[0] for f in json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/small").stdout)["files"]
                        for c in f["chunks"]})
    a = mounts.mount(f"s3://{bucket}/reg/big")
    b = mounts.mount(f"s3://{bucket}/reg")  # another daemon, same --cache-dir
    assert tree_digest(a) == tree_digest(big)
    time.sleep(1)  # the first daemon's cache writer commits in the background
    before = gets(seaweed, bucket)
    # the second daemon finds the chunks the first one fetched, in the shared LMDB
    assert tree_digest(b / "big" / "latest") == tree_digest(big)
    assert tree_digest(b / "small" / "latest") == tree_digest(sample_model)
    time.sleep(0.5)
    # only small's chunks, the two manifests and the two "latest" tags come from the store
    assert gets(seaweed, bucket) - before <= small_chunks + 4


def test_damaged_cache_entry_is_dropped_and_refetched(env, bucket, big, mounts, seaweed):
    publish(env, bucket, big)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    assert tree_digest(mnt) == tree_digest(big)
    mounts.unmount(mnt)
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    h = next(f for f in doc["files"] if f["path"] == "model.safetensors")["chunks"][2][0]
    damage_cache_entry(mounts.cache_dir, h)
    mnt2 = mounts.mount(f"s3://{bucket}/reg/m")
    before = gets(seaweed, bucket)
    assert tree_digest(mnt2) == tree_digest(big)  # right bytes, not the damaged ones
    time.sleep(0.5)
    assert gets(seaweed, bucket) - before == 1  # exactly the damaged chunk was fetched again
    log = next((mounts.cache_dir / "logs").glob(f"*_{mnt2.name}.log")).read_text()
    assert f"cache entry for chunk {h} is damaged" in log


def test_files_keep_their_mtimes_across_republish_and_pull(env, bucket, sample_model, mounts, tmp_path):
    """Issue 13 (6): a mount and a pull show each file's own mtime, recorded at publish, so
    ``rsync -a`` and build tools see a re-published, unchanged file as unchanged."""
    src = tmp_path / "src"
    shutil.copytree(sample_model, src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    want = {}
    for i, p in enumerate(files):
        t = 1_600_000_000_123_456_789 + i * 86_400 * 10**9  # distinct, old, with nanoseconds
        os.utime(p, ns=(t, t))
        want[str(p.relative_to(src))] = t
    v1 = publish(env, bucket, src, "m", "prod")
    time.sleep(1.1)  # a later publish: a per-version time would differ
    v2 = publish(env, bucket, src, "m", "prod")
    assert v1 != v2
    for ref in (f"s3://{bucket}/reg/m@{v1}", f"s3://{bucket}/reg/m@prod"):
        mnt = mounts.mount(ref)
        assert {rel: os.stat(mnt / rel).st_mtime_ns for rel in want} == want
    dest = tmp_path / "pulled"
    cli(env, "pull", f"s3://{bucket}/reg/m@prod", str(dest), "-q")
    assert {rel: os.stat(dest / rel).st_mtime_ns for rel in want} == want


def test_a_checkout_of_pointer_files_mounts_as_a_registry(env, bucket, sample_model, mounts, tmp_path):
    """Issue 12 (4): each *.modelfs.json in a directory tree is a model; a checkout that
    changes a pointer changes what the mount shows within the TTL; open files keep
    their version; bad pointers are skipped, not fatal."""
    repo = tmp_path / "repo"
    (repo / "team").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / ".git" / "x.modelfs.json").write_text("{}")  # hidden: never shown
    src2 = tmp_path / "v2"
    shutil.copytree(sample_model, src2)
    (src2 / "config.json").write_text('{"model_type": "llama", "changed": true}')
    for src, out in ((sample_model, "v1.json"), (src2, "v2.json")):
        cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", "m", "-q",
            "--manifest-out", str(tmp_path / out))
    shutil.copy(tmp_path / "v1.json", repo / "llama.modelfs.json")
    shutil.copy(tmp_path / "v1.json", repo / "team" / "llama-copy.modelfs.json")
    (repo / "broken.modelfs.json").write_text("{not json")
    (repo / "README.md").write_text("pointers")

    mnt = mounts.mount(str(repo), "--metadata-ttl", "1")
    assert sorted(os.listdir(mnt)) == ["llama", "team"]
    assert os.listdir(mnt / "team") == ["llama-copy"]
    assert tree_digest(mnt / "llama") == tree_digest(sample_model)
    assert tree_digest(mnt / "team" / "llama-copy") == tree_digest(sample_model)
    old_config = (sample_model / "config.json").read_bytes()
    with open(mnt / "llama" / "config.json", "rb") as held:
        # "git checkout": the pointer now names v2; the pointer in team/ is deleted
        tmp = repo / "llama.modelfs.json.tmp"
        shutil.copy(tmp_path / "v2.json", tmp)
        tmp.replace(repo / "llama.modelfs.json")
        (repo / "team" / "llama-copy.modelfs.json").unlink()
        deadline = time.monotonic() + 15
        while (mnt / "llama" / "config.json").read_bytes() == old_config and time.monotonic() < deadline:
            time.sleep(0.3)
        assert tree_digest(mnt / "llama") == tree_digest(src2)
        assert held.read() == old_config  # an open file keeps the version it opened
    assert os.listdir(mnt / "team") == []

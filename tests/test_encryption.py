"""Encrypted registries (issue 11): the codec and keys in-process, then real SeaweedFS + FUSE."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess

import pytest

from modelfs.format import codec
from modelfs.format.chunking import DEFAULT_PARAMS, chunk_hash, cut
from modelfs.format.codec import ChunkCodec
from pathlib import Path

from modelfs.cache import BlockCache
from modelfs.config import StoreConfig
from modelfs.format.encryption import MetadataSealer, RegistryKey
from modelfs.format.refs import RegistryRef
from modelfs.registry.layout import open_registry
from modelfs.errors import IntegrityError, UsageError

from conftest import cli, gets, one_line_error, settled_counts, tree_digest

MARKER = b"TOP-SECRET-WEIGHTS-MARKER-7f3a9c"


# -- in-process: codec, keys, sealed metadata ----------------------------------------------

@pytest.mark.parametrize("raw", [os.urandom(300_000), b'{"vocab": "' + MARKER * 20_000 + b'"}'])
def test_encrypted_chunks_round_trip_and_hide_their_bytes(raw):
    c = ChunkCodec(RegistryKey.generate())
    h = c.hash(raw)
    assert h != chunk_hash(raw) and len(h) == 64
    blob = c.encode(raw, h)
    assert MARKER not in blob and raw[:64] not in blob
    assert bytes(c.decode(blob, h, len(raw))) == raw
    assert c.encode(raw, h) != blob  # a fresh nonce each time: never the same ciphertext
    assert len(blob) <= c.max_stored_size(len(raw))
    if MARKER in raw:  # compressed before encryption: the stored object is small
        assert len(blob) < len(raw) // 10


def test_encrypted_chunks_refuse_tampering_moving_and_other_keys():
    key = RegistryKey.generate()
    c, raw = ChunkCodec(key), os.urandom(100_000)
    h = c.hash(raw)
    blob = c.encode(raw, h)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    other = c.hash(raw + b"x")
    cases = [
        (lambda: c.decode(bytes(flipped), h, len(raw)), "does not decrypt"),
        (lambda: c.decode(blob, other, len(raw)), "does not decrypt"),  # moved to another id
        (lambda: ChunkCodec(RegistryKey.generate()).decode(blob, h, len(raw)), "does not decrypt"),
        (lambda: c.decode(codec.encode(raw), h, len(raw)), "not encrypted"),  # written without the key
        (lambda: ChunkCodec().decode(blob, h, len(raw)), "needs its encryption key"),
        (lambda: c.decode(blob[:40], h, len(raw)), "truncated"),
    ]
    for call, needle in cases:
        with pytest.raises(IntegrityError, match=needle):
            call()
    # the same key always names the same bytes the same way (dedup), another key differently
    assert ChunkCodec(key).hash(raw) == h != ChunkCodec(RegistryKey.generate()).hash(raw)


def test_key_files(tmp_path):
    key = RegistryKey.generate()
    path = tmp_path / "registry.key"
    old = os.umask(0)
    try:
        key.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RegistryKey.load(path) == key and key.secret.hex() not in repr(key)
    with pytest.raises(UsageError, match="never overwritten"):
        RegistryKey.generate().save(path)
    assert RegistryKey.load(path) == key
    (tmp_path / "bad").write_text("modelfs-registry-key-v1:AAAA\n")
    (tmp_path / "other").write_text("hello\n")
    for name, needle in (("bad", "damaged"), ("other", "not a modelfs key file"), ("none", "cannot read")):
        with pytest.raises(UsageError, match=needle):
            RegistryKey.load(tmp_path / name)


def test_sealed_metadata_is_bound_to_its_place():
    s = MetadataSealer(RegistryKey.generate())
    blob = s.seal(b'{"version": "x"}', "models/m/tags/prod.json")
    assert s.open(blob, "models/m/tags/prod.json") == b'{"version": "x"}'
    with pytest.raises(IntegrityError, match="does not decrypt"):
        s.open(blob, "models/m/tags/staging.json")  # copied over another tag
    with pytest.raises(IntegrityError, match="not encrypted"):
        s.open(b'{"version": "x"}', "models/m/tags/prod.json")


# -- real store and mounts ---------------------------------------------------------------------

@pytest.fixture
def secret_model(sample_model, tmp_path):
    src = tmp_path / "secret-model"
    shutil.copytree(sample_model, src)
    (src / "notes.json").write_bytes(b'{"note": "' + MARKER * 1000 + b'"}')
    return src


@pytest.fixture
def keys(env, tmp_path):
    out = {}
    for name in ("key", "other"):
        r = cli(env, "keygen", str(tmp_path / f"{name}.key"))
        assert "key id" in r.stdout
        out[name] = str(tmp_path / f"{name}.key")
    return out


def _plain_chunk_ids(root) -> set[str]:
    ids = set()
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            ids |= {chunk_hash(data[o:o + n]) for o, n in cut(data, DEFAULT_PARAMS)}
    return ids


def test_encrypted_registry_keeps_no_plaintext_and_round_trips(env, bucket, s3, secret_model, keys, mounts,
                                                               tmp_path):
    reg = f"s3://{bucket}/enc"
    sign = tmp_path / "release.pem"  # signed too: the signature lists file names, so it is sealed as well
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(sign)],
                   check=True, capture_output=True)
    out = cli(env, "publish", str(secret_model), reg, "--name", "llama", "--tag", "prod", "-q",
              "--encryption-key", keys["key"], "--sign-key", str(sign),
              "--manifest-out", str(tmp_path / "llama.modelfs.json")).stdout
    version = out.split("@")[1].split()[0]
    # what the bucket's operator sees: no marker, no file or tensor name, no plaintext chunk id
    plain_ids = _plain_chunk_ids(secret_model)
    names = [p.name.encode() for p in secret_model.iterdir()] + [b"model.layers.0"]
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="enc/")["Contents"]
    assert any(o["Key"] == "enc/encryption.json" for o in listing)
    assert any(o["Key"].endswith(f"{version}.sig") for o in listing)
    for o in listing:
        assert not any(h in o["Key"] for h in plain_ids)
        body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert MARKER not in body, o["Key"]
        assert not any(n in body for n in names), o["Key"]
        assert not any(h.encode() in body for h in plain_ids), o["Key"]
    # the pointer written on request is readable (for review) and names keyed chunks
    pointer = json.loads((tmp_path / "llama.modelfs.json").read_text())
    assert pointer["hashes"]["chunk"] == "blake3-keyed" and pointer["name"] == "llama"
    want = tree_digest(secret_model)
    key = ("--encryption-key", keys["key"])
    cli(env, "pull", f"{reg}/llama@prod", str(tmp_path / "pulled"), "-q", *key)
    pulled = tree_digest(tmp_path / "pulled")
    assert pulled.pop("model.sig") and pulled == want
    one = mounts.mount(f"{reg}/llama@prod", *key)
    mounted = tree_digest(one)
    assert mounted.pop("model.sig") and mounted == want
    # a cold start gives its workers the key, then where to connect, before Lanes adopts them:
    # the key once (a second one would end the worker, and a new one would take its place)
    assert json.loads(os.getxattr(one, "user.modelfs.stats"))["worker_restarts"] == 0
    whole = mounts.mount(reg, *key)
    mounted = tree_digest(whole / "llama" / "versions" / version)
    assert mounted.pop("model.sig") and mounted == want
    assert f"{version}" in cli(env, "ls", reg, *key).stdout
    # dedup works under one key: publishing the same files again uploads no chunk
    again = cli(env, "publish", str(secret_model), reg, "--name", "llama", "-q", *key).stdout
    assert "uploaded  0 B in 0 chunks" in again
    # the cache keeps verified plaintext; its check knows keyed entries are fine
    verify = cli(env, "cache", "verify", "--cache-dir", str(mounts.cache_dir), "-q").stdout
    assert "all intact" in verify, verify


def test_missing_wrong_or_needless_keys_are_one_line_and_mount_nothing(env, bucket, secret_model, keys,
                                                                       mounts, tmp_path):
    enc, plain = f"s3://{bucket}/enc", f"s3://{bucket}/plain"
    cli(env, "publish", str(secret_model), enc, "--name", "m", "-q", "--encryption-key", keys["key"])
    cli(env, "publish", str(secret_model), plain, "--name", "m", "-q")
    cases = [
        ((), enc, "is encrypted: pass --encryption-key"),
        (("--encryption-key", keys["other"]), enc, "wrong encryption key"),
        (("--encryption-key", keys["key"]), plain, "is not encrypted"),
        (("--encryption-key", str(tmp_path / "nokey")), enc, "cannot read encryption key file"),
    ]
    for i, (key, reg, needle) in enumerate(cases):
        for args in (("inspect", f"{reg}/m"), ("ls", reg), ("pull", f"{reg}/m", str(tmp_path / f"p{i}")),
                     ("prefetch", f"{reg}/m", "--cache-dir", str(tmp_path / "c"))):
            one_line_error(cli(env, *args, *key, check=False), needle)
        assert not (tmp_path / f"p{i}").exists()
        for source in (f"{reg}/m", reg):
            mnt = tmp_path / f"mnt-{i}-{len(source)}"
            mnt.mkdir()
            r = mounts.mount(source, *key, mnt=mnt, check=False)
            assert r.returncode != 0 and needle in r.stderr, r.stderr
            assert not os.path.ismount(mnt)
    # a key never turns a plain registry into a mixed one, nor does its lack mix an encrypted one
    one_line_error(cli(env, "publish", str(secret_model), plain, "--name", "n", "--encryption-key",
                       keys["key"], check=False), "already holds unencrypted models")
    one_line_error(cli(env, "publish", str(secret_model), enc, "--name", "n", check=False), "is encrypted")
    # the environment variable and a mount config file carry the key too
    cli({**env, "MODELFS_ENCRYPTION_KEY_FILE": keys["key"]}, "inspect", f"{enc}/m")
    conf = tmp_path / "mount.toml"
    mnt = tmp_path / "from-config"
    mnt.mkdir()
    conf.write_text(f'source = "{enc}/m"\nmountpoint = "{mnt}"\nencryption_key_file = "{keys["key"]}"\n')
    r = mounts.run("mount", "--config", str(conf), "--cache-dir", str(mounts.cache_dir))
    assert r.returncode == 0, r.stderr
    assert tree_digest(mnt) == tree_digest(secret_model)


def test_tampered_ciphertext_is_eio_and_forged_metadata_is_refused(env, bucket, s3, secret_model, keys,
                                                                   mounts, tmp_path):
    reg = f"s3://{bucket}/enc"
    key = ("--encryption-key", keys["key"])
    cli(env, "publish", str(secret_model), reg, "--name", "m", "--tag", "prod", "-q", *key)
    doc = json.loads(cli(env, "inspect", "--json", f"{reg}/m", *key).stdout)
    entry = max(doc["files"], key=lambda f: f["size"])
    h, n = entry["chunks"][1]
    obj = f"enc/chunks/{h}"
    blob = bytearray(s3.get_object(Bucket=bucket, Key=obj)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=obj, Body=bytes(blob))
    mnt = mounts.mount(f"{reg}/m", *key)
    fd = os.open(mnt / entry["path"], os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, entry["chunks"][0][1] + 10)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == (secret_model / entry["path"]).read_bytes()[:4096]
    finally:
        os.close(fd)
    log = next((mounts.cache_dir / "logs").glob("*.log")).read_text()
    assert h[:16] in log and "does not decrypt" in log
    one_line_error(cli(env, "pull", f"{reg}/m", str(tmp_path / "p"), "-q", *key, check=False), "does not decrypt")
    # someone with write access but no key: a plain tag, or prod's sealed record copied to another tag
    s3.put_object(Bucket=bucket, Key="enc/models/m/tags/evil.json",
                  Body=json.dumps({"format": "modelfs-tag", "version": "0" * 20}).encode())
    one_line_error(cli(env, "inspect", f"{reg}/m@evil", *key, check=False), "not encrypted")
    sealed = s3.get_object(Bucket=bucket, Key="enc/models/m/tags/prod.json")["Body"].read()
    s3.put_object(Bucket=bucket, Key="enc/models/m/tags/staging.json", Body=sealed)
    one_line_error(cli(env, "inspect", f"{reg}/m@staging", *key, check=False), "does not decrypt")


def test_encrypted_cache_keeps_no_plaintext_on_disk(env, bucket, seaweed, secret_model, keys, mounts, tmp_path):
    reg = f"s3://{bucket}/enc"
    key = ("--encryption-key", keys["key"])
    cli(env, "publish", str(secret_model), reg, "--name", "m", "--tag", "prod", "-q", *key)
    one_line_error(mounts.mount(f"{reg}/m@prod", "--encrypt-cache", check=False),
                   "needs the registry's key")
    want = tree_digest(secret_model)
    mnt = mounts.mount(f"{reg}/m@prod", "--encrypt-cache", *key)
    assert tree_digest(mnt) == want
    mounts.unmount(mnt)
    # the host's disk: the sealed cache holds no marker, no file name, no plaintext chunk id
    sealed = mounts.cache_dir / "sealed"
    disk = b"".join(p.read_bytes() for p in sealed.rglob("*") if p.is_file() and p.suffix != ".log")
    assert len(disk) > sum(p.stat().st_size for p in secret_model.iterdir()) // 2  # it does hold the chunks
    assert MARKER not in disk and b"notes.json" not in disk and b"model.layers.0" not in disk
    assert not any(h.encode() in disk for h in _plain_chunk_ids(secret_model))
    assert not (mounts.cache_dir / "blocks").exists()  # the plain cache was never opened
    # a remount reads the sealed cache: byte-identical, no GET
    before = gets(seaweed, bucket)
    mnt = mounts.mount(f"{reg}/m@prod", "--encrypt-cache", *key)
    assert tree_digest(mnt) == want
    assert json.loads(cli(env, "stats", str(mnt), "--json").stdout)["fetches"] == 0
    assert gets(seaweed, bucket) - before <= 2  # the tag and the marker; no manifest, no chunk
    mounts.unmount(mnt)
    verify = cli(env, "cache", "verify", "--cache-dir", str(sealed), "-q").stdout  # by the entries' sums
    assert "all intact" in verify, verify
    # an entry damaged on disk (its sums fixed up, as a malicious writer would) is refetched, not served
    from modelfs.cache import BlockCache, block_sums
    c = BlockCache(sealed, 1 << 30)
    try:
        with c.env.begin(write=True) as txn:
            k, blob = next(iter(txn.cursor(db=c.chunks)))
            bad = bytearray(blob)
            bad[len(bad) // 2] ^= 1
            txn.put(k, bytes(bad), db=c.chunks)
            txn.put(k, block_sums(bytes(bad)), db=c.sums)
    finally:
        c.close()
    before = gets(seaweed, bucket)
    mnt = mounts.mount(f"{reg}/m@prod", "--encrypt-cache", *key)
    assert tree_digest(mnt) == want
    assert gets(seaweed, bucket) - before >= 1
    logs = "".join(p.read_text() for p in (mounts.cache_dir / "logs").glob("*.log"))
    assert "does not decrypt" in logs
    # prefetch warms the same sealed cache
    out = cli(env, "prefetch", f"{reg}/m@prod", "--encrypt-cache", "--cache-dir", str(tmp_path / "c2"), "-q",
              *key).stdout
    assert "prefetched m@" in out
    disk = (tmp_path / "c2" / "sealed" / "blocks" / "data.mdb").read_bytes()
    assert MARKER not in disk and b"notes.json" not in disk
    mnt = mounts.mount(f"{reg}/m@prod", "--encrypt-cache", *key, cache_dir=tmp_path / "c2")
    assert tree_digest(mnt) == want
    assert json.loads(cli(env, "stats", str(mnt), "--json").stdout)["fetches"] == 0


def test_a_registry_checked_here_is_not_asked_for_its_marker_again(seaweed, bucket, tmp_path, keys, monkeypatch):
    """The marker never changes once written: a check this host's cache passed with the same
    key (or none) is not repeated; another key is checked, and refused, again."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    cfg = StoreConfig(endpoint_url=seaweed.endpoint, region="us-east-1")
    ref = RegistryRef(bucket, "enc")
    key = RegistryKey.load(Path(keys["key"]))
    open_registry(ref, cfg, key, creating=True)  # writes the marker
    cache = BlockCache(tmp_path / "cache", 1 << 30)
    try:
        def marker_gets() -> int:
            c = settled_counts(seaweed, bucket)
            return c[("GET", "200")] + c[("GET", "404")]
        open_registry(ref, cfg, key, cache=cache)
        n = marker_gets()
        open_registry(ref, cfg, key, cache=cache)
        assert marker_gets() == n
        with pytest.raises(UsageError):
            open_registry(ref, cfg, None, cache=cache)  # no key: asked, and refused
        assert marker_gets() == n + 1
    finally:
        cache.close()

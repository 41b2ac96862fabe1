"""Publish / pull / ls / inspect / tag against a real SeaweedFS, asserted from the store's side."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from modelfs.format.chunking import DEFAULT_PARAMS
from modelfs.dev.devserver import free_ports
from modelfs.dev.sample import write_safetensors, layer_tensors
from modelfs.units import fmt_bytes

from conftest import cli, damage_cache_entry, gets, objects, one_line_error, settled_counts, tree_digest

AVG = DEFAULT_PARAMS.avg_size


def chunk_objects(s3, bucket):
    return objects(s3, bucket, "reg/chunks/")


def test_round_trip_publish_pull(env, bucket, sample_model, tmp_path, s3):
    r = cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "tiny", "--tag", "prod",
            "--manifest-out", str(tmp_path / "tiny.manifest.json"))
    assert "published tiny@" in r.stdout
    out = tmp_path / "out"
    cli(env, "pull", f"s3://{bucket}/reg/tiny@prod", str(out))
    assert tree_digest(out) == tree_digest(sample_model)  # bytes, modes, empty file and dir
    assert (out / "empty_dir").is_dir() and (out / "extra" / "empty.txt").stat().st_size == 0
    assert not list(out.rglob("*.modelfs-partial"))
    # the manifest file written locally is the one in the store, byte for byte
    keys = [k for k in objects(s3, bucket, "reg/models/tiny/versions/")]
    assert len(keys) == 1
    stored = s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    assert stored == (tmp_path / "tiny.manifest.json").read_bytes()
    # a manifest file works as a ref too, with the registry given
    out2 = tmp_path / "out2"
    cli(env, "pull", str(tmp_path / "tiny.manifest.json"), str(out2))  # chunks found via "origin"
    assert tree_digest(out2) == tree_digest(sample_model)


def test_pull_verify_checks_each_whole_file_against_its_sha256(env, bucket, sample_model, tmp_path):
    """Every chunk is checked against its id either way; ``--verify`` also reads each
    file back and checks its SHA-256: a manifest whose SHA-256 does not match the bytes
    its chunks make is refused in one line, and no file is left under its real name."""
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "--manifest-out",
        str(tmp_path / "m.json"))
    doc = json.loads((tmp_path / "m.json").read_text())
    big = max(doc["files"], key=lambda f: f["size"])
    big["sha256"] = "0" * 64
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    one_line_error(cli(env, "pull", str(tmp_path / "bad.json"), str(out), "-q", "--verify", check=False),
                   "SHA-256 of the assembled file")
    assert not (out / big["path"]).exists() and not list(out.rglob("*.modelfs-partial"))
    cli(env, "pull", str(tmp_path / "m.json"), str(out), "-q", "--verify")
    assert tree_digest(out) == tree_digest(sample_model)


def test_pull_resumes_and_repairs(env, bucket, sample_model, tmp_path, seaweed):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    out = tmp_path / "out"
    cli(env, "pull", f"s3://{bucket}/reg/m", str(out))
    (out / "config.json").unlink()
    shard = out / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.seek(1000)
        f.write(b"garbage")
    before = settled_counts(seaweed, bucket)[("GET", "200")]
    r = cli(env, "pull", f"s3://{bucket}/reg/m", str(out))
    assert "2 files written" in r.stdout
    assert tree_digest(out) == tree_digest(sample_model)
    gets = settled_counts(seaweed, bucket)[("GET", "200")] - before
    shard_chunks = sum(1 for _ in json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
                       ["files"][3]["chunks"])
    assert gets <= shard_chunks + 1 + 4  # the broken shard, config.json, tag + manifest lookups


def test_pull_of_a_lost_chunk_fails_in_one_line_and_leaves_nothing_half_written(env, bucket, sample_model,
                                                                               tmp_path, s3):
    """The workers write chunks straight into the partial file: a chunk the store lost
    ends the pull with one line naming it, and no partial or broken file is left."""
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    files = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)["files"]
    big = max(files, key=lambda f: f["size"])
    lost = big["chunks"][len(big["chunks"]) // 2][0]  # [hash, size]
    key = next(k for k in objects(s3, bucket, "reg/chunks/") if k.endswith(lost))
    s3.delete_object(Bucket=bucket, Key=key)
    out = tmp_path / "out"
    one_line_error(cli(env, "pull", f"s3://{bucket}/reg/m", str(out), "-q", check=False), lost)
    assert not list(out.rglob("*.modelfs-partial"))
    assert not (out / big["path"]).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")
def test_pull_copies_what_the_hosts_cache_holds_and_fetches_a_damaged_entry(env, bucket, sample_model,
                                                                            tmp_path, seaweed):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "-q")
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    pieces = [(h, n) for f in doc["files"] for h, n in f["chunks"]]
    cache = tmp_path / "cache"
    cli(env, "prefetch", f"s3://{bucket}/reg/m", "--cache-dir", str(cache), "-q")
    damaged, size = max((p for p in pieces if pieces.count(p) == 1), key=lambda p: p[1])
    damage_cache_entry(cache, damaged)
    before = gets(seaweed, bucket)
    r = cli(env, "pull", f"s3://{bucket}/reg/m", str(tmp_path / "out"), "--cache-dir", str(cache), "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(sample_model)  # the damaged entry was not used
    time.sleep(0.5)
    assert gets(seaweed, bucket) - before == 1 + 2  # that one chunk, the tag and the manifest
    assert f"{fmt_bytes(size)} fetched, {fmt_bytes(sum(n for _, n in pieces) - size)} from the host's cache" in r.stdout
    # --no-cache fetches everything; with no cache at all (this env's default is empty) too
    r = cli(env, "pull", f"s3://{bucket}/reg/m", str(tmp_path / "all"), "--cache-dir", str(cache), "--no-cache")
    assert "0 B from the host's cache" in r.stdout and tree_digest(tmp_path / "all") == tree_digest(sample_model)


def test_pull_onto_a_full_disk_says_so_and_leaves_nothing_half_written(env, bucket, sample_model, tmp_path):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        out = small / "out"
        one_line_error(cli(env, "pull", f"s3://{bucket}/reg/m", str(out), "-q", check=False),
                       "No space left on device")
        assert not list(out.rglob("*.modelfs-partial"))
        written = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
        want = {p.relative_to(sample_model).as_posix(): p for p in sample_model.rglob("*") if p.is_file()}
        for rel, p in written.items():  # what is there under a real name is whole
            assert p.read_bytes() == want[rel].read_bytes(), rel
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_republish_unchanged_uploads_no_chunk(env, bucket, sample_model, s3, seaweed):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    before, puts = chunk_objects(s3, bucket), settled_counts(seaweed, bucket)[("PUT", "200")]
    r = cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod")
    assert chunk_objects(s3, bucket) == before
    # server side: exactly the publish's lease, the manifest and the two tags were written, no chunk
    assert settled_counts(seaweed, bucket)[("PUT", "200")] - puts == 4
    assert not objects(s3, bucket, "reg/leases/")  # the lease is gone with the publish
    assert "uploaded  0 B in 0 chunks" in r.stdout


@pytest.fixture
def big_model(tmp_path):
    """A 72 MiB single-shard model (≥ 64 MiB: many chunks)."""
    d = tmp_path / "big"
    d.mkdir()
    tensors = layer_tensors(96, 256)
    write_safetensors(d / "model.safetensors", tensors, seed=7, metadata={"format": "pt"})
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d, tensors


def _new_chunks(s3, bucket, before):
    after = chunk_objects(s3, bucket)
    new = {k: v for k, v in after.items() if k not in before}
    return new


def test_dedup_tensor_change_and_header_growth(env, bucket, big_model, s3, seaweed):
    d, tensors = big_model
    path = d / "model.safetensors"
    assert path.stat().st_size >= 64 << 20
    cli(env, "publish", str(d), f"s3://{bucket}/reg", "--name", "m")
    total_chunks = len(chunk_objects(s3, bucket))
    assert total_chunks >= 10

    # 1. one tensor's bytes changed in place
    before = chunk_objects(s3, bucket)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x01" * 100_000)
    cli(env, "publish", str(d), f"s3://{bucket}/reg", "--name", "m")
    new = _new_chunks(s3, bucket, before)
    assert 1 <= len(new) <= 2 and sum(new.values()) <= 2 * AVG + 64

    # 2. the header grows by a few hundred bytes: every tensor offset shifts
    before = chunk_objects(s3, bucket)
    data = path.read_bytes()
    (n,) = __import__("struct").unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["note"] = "fine-tuned " * 30
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    assert len(js) - n >= 300
    path.write_bytes(__import__("struct").pack("<Q", len(js)) + js + data[8 + n:])
    cli(env, "publish", str(d), f"s3://{bucket}/reg", "--name", "m")
    new = _new_chunks(s3, bucket, before)
    assert 1 <= len(new) <= 3 and sum(new.values()) <= 3 * AVG + 64


def test_killed_publish_leaves_no_dangling_manifest_and_resumes(env, bucket, tmp_path, s3, seaweed):
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(200, 256), seed=3)  # ~150 MiB
    proc = subprocess.Popen([sys.executable, "-m", "modelfs", "-j", "2", "publish", str(d),
                             f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "--no-compress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(chunk_objects(s3, bucket)) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "publish finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(1.5)  # a PUT in flight at the kill may still land on the server
    assert not objects(s3, bucket, "reg/models/"), "a manifest or tag was written before its chunks"
    done = chunk_objects(s3, bucket)
    assert done
    puts = settled_counts(seaweed, bucket)[("PUT", "200")]
    r = cli(env, "publish", str(d), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "--no-compress")
    after = chunk_objects(s3, bucket)
    missing = len(after) - len(done)
    assert missing > 0 and f"reused    {len(done)} chunks" in r.stdout
    # server side: only the missing chunks, its lease, one manifest and two tags were PUT
    assert settled_counts(seaweed, bucket)[("PUT", "200")] - puts == missing + 4
    out = tmp_path / "out"
    cli(env, "pull", f"s3://{bucket}/reg/m@prod", str(out))
    assert tree_digest(out) == tree_digest(d)


def _worker_pids() -> list[int]:
    """This process's fetch worker children (a publish's, here)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return [p for p in pids if b"modelfs.transfer.worker" in open(f"/proc/{p}/cmdline", "rb").read()]


def test_publish_goes_on_when_a_worker_dies_under_it(registry, bucket, tmp_path, env):
    """A worker killed while it holds uploads is replaced, what it held is sent again, and
    the version reads back whole."""
    from modelfs.ops.publish import Publisher, scan

    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(60, 256), seed=5)  # ~45 MiB, ~11 chunks
    killed: list[int] = []

    def kill_one(n, stats):
        if not killed:
            killed.append(_worker_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    result = Publisher(registry, concurrency=4, on_progress=kill_one).run(scan(d), "m", ["latest"])
    assert killed and result.stats.chunks >= 8
    out = tmp_path / "out"
    cli(env, "pull", f"s3://{bucket}/reg/m", str(out), "-q")
    assert tree_digest(out) == tree_digest(d)


def test_a_file_changed_after_the_scan_is_refused_before_any_manifest(registry, bucket, tmp_path, s3):
    from modelfs.errors import UsageError
    from modelfs.ops.publish import Publisher, scan

    d = tmp_path / "m"
    d.mkdir()
    f = d / "model.safetensors"
    write_safetensors(f, layer_tensors(12, 256), seed=6)
    tree = scan(d)
    with open(f, "r+b") as fh:  # same size, other bytes, later time: a checkpoint being rewritten
        fh.seek(1 << 20)
        fh.write(b"x" * 4096)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(UsageError, match="model.safetensors changed while being published"):
        Publisher(registry, concurrency=4).run(tree, "m", ["latest"])
    assert not objects(s3, bucket, "reg/models/")


def test_dry_run_writes_nothing(env, bucket, sample_model, s3, seaweed):
    puts = settled_counts(seaweed, bucket)[("PUT", "200")]
    r = cli(env, "publish", "--dry-run", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    assert r.stdout.startswith("dry run: would publish m@")
    assert not objects(s3, bucket)
    assert settled_counts(seaweed, bucket)[("PUT", "200")] == puts


def test_ls_inspect_and_tag(env, bucket, sample_model, tmp_path):
    reg = f"s3://{bucket}/reg"
    v1 = cli(env, "publish", str(sample_model), reg, "--name", "alpha", "--tag", "prod").stdout.split("@")[1].split()[0]
    m2 = tmp_path / "m2"
    shutil.copytree(sample_model, m2)
    (m2 / "config.json").write_text('{"model_type": "llama", "v": 2}')
    v2 = cli(env, "publish", str(m2), reg, "--name", "alpha", "--tag", "staging").stdout.split("@")[1].split()[0]
    cli(env, "publish", str(sample_model), reg, "--name", "beta")
    out = cli(env, "ls", reg).stdout
    assert "alpha" in out and "beta" in out and v1 in out and v2 in out
    assert "[prod]" in out and "[latest, staging]" in out
    text = cli(env, "inspect", f"{reg}/alpha@prod").stdout
    assert f"alpha@{v1}" in text and "safetensors:" in text and "params" in text
    assert "LlamaForCausalLM" in text
    cli(env, "tag", f"{reg}/alpha@{v2}", "prod")
    assert f"alpha@{v2}" in cli(env, "inspect", f"{reg}/alpha@prod").stdout
    doc = json.loads(cli(env, "inspect", "--json", f"{reg}/alpha@{v1}").stdout)
    assert doc["format_version"] == 1 and doc["name"] == "alpha"


def test_tampered_manifest_is_refused(env, bucket, sample_model, s3):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m")
    key = next(iter(objects(s3, bucket, "reg/models/m/versions/")))
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body.replace(b'"0644"', b'"0666"', 1))
    r = cli(env, "inspect", f"s3://{bucket}/reg/m", check=False)
    assert r.returncode != 0 and "do not match version id" in r.stderr


def test_clear_errors(env, bucket, sample_model, tmp_path):
    reg = f"s3://{bucket}/reg"
    cli(env, "publish", str(sample_model), reg, "--name", "m")
    one_line_error(cli(env, "inspect", f"{reg}/nope@prod", check=False), "no model 'nope'")
    one_line_error(cli(env, "inspect", f"{reg}/m@nope", check=False), "no tag 'nope'")
    one_line_error(cli(env, "inspect", f"{reg}/m@0123456789abcdef0123", check=False), "no version")
    one_line_error(cli(env, "ls", "s3://no-such-bucket/reg", check=False), "does not exist")
    one_line_error(cli(env, "publish", str(sample_model), "s3://no-such-bucket/r", "--name", "m", check=False),
                    "does not exist")
    one_line_error(cli(env, "inspect", "s3://Bad_Bucket/x@y", check=False), "invalid bucket")
    one_line_error(cli(env, "publish", str(sample_model), reg, "--name", "../x", check=False), "invalid model name")
    one_line_error(cli(env, "tag", f"{reg}/m", "bad/tag", check=False), "invalid tag")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "modelfs-manifest", "format_version": 9}')
    one_line_error(cli(env, "inspect", str(bad), check=False), "unsupported format_version")
    dead = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports(1)[0]}")
    r = cli(dead, "--concurrency", "2", "ls", reg, check=False, timeout=120)
    one_line_error(r, "cannot reach")


def test_pull_hashes_chunks_in_file_order_whatever_order_they_land(tmp_path):
    """pull checks a file's SHA-256 from the chunks it wrote, each read back once every
    chunk before it landed: chunks landing in any order give the file's hash."""
    import hashlib
    import random

    import trio

    from modelfs.format.chunking import chunk_hash
    from modelfs.format.manifest import FileEntry
    from modelfs.ops.pull import _InOrderHash

    chunks = [random.Random(i).randbytes(1000 + i) for i in range(50)]
    entry = FileEntry(path="f", size=sum(map(len, chunks)), mode=0o644, sha256="0" * 64,
                      chunks=tuple((chunk_hash(c), len(c)) for c in chunks))
    order = list(range(50))
    random.Random(7).shuffle(order)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)

    async def main():
        h = _InOrderHash(fd, entry)
        async with trio.open_nursery() as nursery:
            for i in order:  # each lands, then its landing is said, some side by side
                os.pwrite(fd, chunks[i], entry.offsets[i])
                nursery.start_soon(h.landed, i)
                if i % 3:
                    await trio.sleep(0)
        return h
    h = trio.run(main)
    os.close(fd)
    assert h.next == 50 and h.sha.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


# -- found by trying publish as a new user would (issue 31) --------------------------------

def test_an_unwritable_manifest_out_is_refused_before_anything_is_uploaded(env, bucket, sample_model, s3, tmp_path):
    reg = f"s3://{bucket}/reg"
    (tmp_path / "a-file").write_text("")
    for out, why in ((tmp_path / "no-such-dir" / "m.modelfs.json", "does not exist"),
                     (tmp_path / "a-file" / "m.modelfs.json", "does not exist")):
        r = cli(env, "publish", str(sample_model), reg, "--name", "m", "--tag", "prod",
                "--manifest-out", str(out), check=False)
        one_line_error(r, "--manifest-out", why)
        assert not objects(s3, bucket), "nothing may be uploaded, published or tagged"
    r = cli(env, "publish", "--dry-run", str(sample_model), reg, "--name", "m",
            "--manifest-out", str(tmp_path / "nope" / "m.json"), check=False)
    one_line_error(r, "does not exist")  # a dry run says what the real run would hit


def test_an_empty_source_is_refused_unless_asked_for(env, bucket, sample_model, s3, tmp_path):
    reg = f"s3://{bucket}/reg"
    v1 = cli(env, "publish", str(sample_model), reg, "--name", "m", "--tag", "prod").stdout.split("@")[1].split()[0]
    empty = tmp_path / "build-output"
    (empty / "only" / "dirs").mkdir(parents=True)
    before = objects(s3, bucket)
    one_line_error(cli(env, "publish", str(empty), reg, "--name", "m", "--tag", "prod", check=False),
                   "holds no files", "--allow-empty")
    assert objects(s3, bucket) == before
    assert f"m@{v1}" in cli(env, "inspect", f"{reg}/m@prod").stdout  # prod did not move
    r = cli(env, "publish", str(empty), reg, "--name", "m", "--tag", "prod", "--allow-empty")
    assert r.stdout.startswith("published m@") and "files     0" in r.stdout


def test_symlinks_that_leave_the_source_are_listed_or_refused(env, bucket, sample_model, s3, tmp_path):
    reg = f"s3://{bucket}/reg"
    src = tmp_path / "snapshot"
    shutil.copytree(sample_model, src)
    (src / "blobs").mkdir()
    (src / "blobs" / "b1").write_text("inside")
    (src / "inside.txt").symlink_to(src / "blobs" / "b1")  # a link that stays inside: not listed
    secret = tmp_path / "elsewhere" / "hostname"
    secret.parent.mkdir()
    secret.write_text("not part of the model\n")
    (src / "host.txt").symlink_to(secret)
    dry = cli(env, "publish", "--dry-run", str(src), reg, "--name", "m").stdout
    assert f"host.txt -> {secret}" in dry and "would be published" in dry and "inside.txt" not in dry
    one_line_error(cli(env, "publish", str(src), reg, "--name", "m", "--refuse-outside-links", check=False),
                   "1 symlink", f"host.txt -> {secret}", "--refuse-outside-links")
    assert not objects(s3, bucket)
    out = cli(env, "publish", str(src), reg, "--name", "m").stdout
    assert f"host.txt -> {secret}" in out and "were published as files" in out

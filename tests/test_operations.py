"""Operating a mount: config file, live stats and Prometheus, cache tools, prefetch, the fstab helper."""

import json
import os
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from modelfs.cache import BlockCache
from modelfs.dev.devserver import free_ports

from conftest import cli, gets, one_line_error, tree_digest

SAFETENSORS = "model-00001-of-00002.safetensors"


def publish(env, bucket, src, name="m"):
    cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", name, "-q")
    return json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/{name}").stdout)


def unique_chunks(doc, path=None):
    return {h: n for f in doc["files"] if path in (None, f["path"]) for h, n in f["chunks"]}


def stats(env, mnt):
    return json.loads(cli(env, "stats", "--json", str(mnt)).stdout)


def test_stats_and_prometheus_report_what_was_read(env, bucket, sample_model, mounts):
    doc = publish(env, bucket, sample_model)
    (port,) = free_ports(1)
    mnt = mounts.mount(f"s3://{bucket}/reg/m", "--metrics-port", str(port))
    last = "model-00002-of-00002.safetensors"  # the last shard: no readahead into a next one
    data = (mnt / last).read_bytes()
    assert data == (sample_model / last).read_bytes()
    chunks = unique_chunks(doc, last)
    s = stats(env, mnt)
    assert s["bytes_served"] >= len(data) and s["errors"] == 0
    assert s["bytes_fetched"] == sum(chunks.values()) and s["fetches"] == len(chunks)
    assert s["memory_hits"] > 0 and 0 < s["hit_ratio"] < 1
    assert 0 < s["fetch_p50_ms"] <= s["fetch_p99_ms"]
    assert s["fetches_in_flight"] == 0 and s["pid"] == mounts.pid(mnt)
    assert s["cache_cap_bytes"] == 16 << 30
    deadline = time.monotonic() + 10  # the cache writer batches behind the reads
    while stats(env, mnt)["cache_used_bytes"] < s["bytes_fetched"]:
        assert time.monotonic() < deadline, "the cache size in stats never reached the bytes fetched"
        time.sleep(0.2)
    assert stats(env, mnt / "config.json")["pid"] == s["pid"]  # any path on the mount will do
    human = cli(env, "stats", str(mnt)).stdout
    assert "served" in human and f"in {len(chunks)} GETs" in human

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    value = lambda name, **labels: next(x.value for x in families[name].samples  # noqa: E731
                                        if x.name.endswith(("_total", name)) and x.labels == labels)
    assert value("modelfs_served_bytes") == s["bytes_served"]
    assert value("modelfs_fetched_bytes") == s["bytes_fetched"]
    assert value("modelfs_chunk_loads", **{"from": "store"}) == len(chunks)
    assert value("modelfs_errors") == 0
    (info,) = families["modelfs_info"].samples  # which version this host serves, for dashboards
    assert info.labels["version"] == s["version"] == os.getxattr(mnt / SAFETENSORS, "user.modelfs.version").decode()
    lat = {x.labels.get("quantile"): x.value for x in families["modelfs_fetch_latency_seconds"].samples}
    assert abs(lat["0.5"] * 1000 - s["fetch_p50_ms"]) < 1e-6
    # loopback only by default
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f if line.split()[1].endswith(f":{port:04X}")
                     and line.split()[3] == "0A"]
    assert listening == [f"0100007F:{port:04X}"]

    # a port in use is a clear error before anything is mounted
    r = mounts.mount(f"s3://{bucket}/reg/m", "--metrics-port", str(port), check=False)
    one_line_error(r, f"cannot serve metrics on 127.0.0.1:{port}")
    assert not os.path.ismount(mounts.tmp / "mnt2")
    one_line_error(cli(env, "stats", str(mounts.tmp), check=False), "is not on a running modelfs mount")


def test_config_file_drives_the_mount_and_flags_win(env, bucket, sample_model, mounts, tmp_path):
    publish(env, bucket, sample_model)
    mnt = tmp_path / "models"
    mnt.mkdir()
    conf = tmp_path / "models.toml"
    conf.write_text(f'source = "s3://{bucket}/reg/m"\nmountpoint = "{mnt}"\ncache_dir = "{tmp_path / "c"}"\n'
                    'cache_size = "1G"\n')
    r = mounts.run("mount", "--config", str(conf))
    assert r.returncode == 0, r.stderr
    assert tree_digest(mnt) == tree_digest(sample_model)
    assert stats(env, mnt)["cache_cap_bytes"] == 1 << 30  # from the file
    mounts.unmount(mnt)
    assert mounts.run("mount", "--config", str(conf), "--cache-size", "2G").returncode == 0
    assert stats(env, mnt)["cache_cap_bytes"] == 2 << 30  # the flag wins
    mounts.unmount(mnt)

    conf.write_text(conf.read_text() + "cache_sise = 5\n")
    one_line_error(mounts.run("mount", "--config", str(conf)), "unknown key 'cache_sise'",
                   "did you mean 'cache_size'")
    assert not os.path.ismount(mnt)
    conf.write_text(f'source = "s3://{bucket}/reg/m"\nmountpoint = "{mnt}"\naws_secret_access_key = "x"\n')
    one_line_error(mounts.run("mount", "--config", str(conf)), "looks like a credential")
    assert not os.path.ismount(mnt)


def test_prefetch_by_ref_then_mount_reads_with_zero_chunk_gets(env, bucket, sample_model, mounts, seaweed,
                                                              tmp_path):
    doc = publish(env, bucket, sample_model)
    chunks = unique_chunks(doc)
    cache = tmp_path / "cache"
    before = gets(seaweed, bucket)
    out = cli(env, "prefetch", f"s3://{bucket}/reg/m@latest", "--cache-dir", str(cache)).stdout
    assert f"in {len(chunks)} chunks, 0 chunks already cached" in out
    assert gets(seaweed, bucket) - before == len(chunks) + 2  # + the tag and the manifest
    st = json.loads(cli(env, "cache", "stats", "--json", "--cache-dir", str(cache)).stdout)
    assert st["entries"] == len(chunks) and st["chunk_bytes"] == sum(chunks.values())
    assert st["manifests"] == 1

    mnt = mounts.mount(f"s3://{bucket}/reg/m", cache_dir=cache)
    before = gets(seaweed, bucket)
    assert tree_digest(mnt) == tree_digest(sample_model)
    time.sleep(0.5)
    assert gets(seaweed, bucket) - before == 0
    mounts.unmount(mnt)
    again = cli(env, "prefetch", f"s3://{bucket}/reg/m", "--cache-dir", str(cache)).stdout
    assert "0 B fetched in 0 chunks" in again
    manifest = tmp_path / "m.manifest.json"  # a manifest file works as the ref too
    manifest.write_text(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m").stdout)
    again = cli(env, "prefetch", str(manifest), "--cache-dir", str(cache)).stdout
    assert "0 B fetched in 0 chunks" in again


def test_prefetch_says_what_failed_in_one_line(env, bucket, sample_model, s3, tmp_path):
    doc = publish(env, bucket, sample_model)
    ok = cli(env, "prefetch", f"s3://{bucket}/reg/m", "--cache-dir", str(tmp_path / "c1"), "-q")
    assert ok.stderr == ""  # nothing but the result: no warnings
    gone = sorted(unique_chunks(doc))[0]
    s3.delete_object(Bucket=bucket, Key=f"reg/chunks/{gone}")
    r = cli(env, "prefetch", f"s3://{bucket}/reg/m", "--cache-dir", str(tmp_path / "c2"), "-q", check=False)
    one_line_error(r, gone[:16])


def test_prefetch_through_a_mount(env, bucket, sample_model, mounts, seaweed):
    doc = publish(env, bucket, sample_model)
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    # a .json file on a mount is a file to read, not a manifest
    assert "prefetched 1 files" in cli(env, "prefetch", str(mnt / "config.json")).stdout
    out = cli(env, "prefetch", str(mnt)).stdout
    total = sum(f["size"] for f in doc["files"])
    assert f"prefetched {len(doc['files'])} files" in out
    s = stats(env, mnt)
    assert s["bytes_served"] == total and s["bytes_fetched"] == sum(unique_chunks(doc).values())
    before = gets(seaweed, bucket)
    assert tree_digest(mnt) == tree_digest(sample_model)
    assert gets(seaweed, bucket) - before == 0
    one_line_error(cli(env, "prefetch", str(mnt / "nope"), check=False), "no such file or directory")


def test_cache_verify_and_prune(env, bucket, sample_model, tmp_path):
    doc = publish(env, bucket, sample_model)
    cache_dir = tmp_path / "cache"
    cli(env, "prefetch", f"s3://{bucket}/reg/m", "--cache-dir", str(cache_dir))
    n = len(unique_chunks(doc))
    assert f"verified {n} chunks" in cli(env, "cache", "verify", "--cache-dir", str(cache_dir)).stdout
    h = doc["files"][0]["chunks"][0][0]
    cache = BlockCache(cache_dir, 1 << 30)
    try:
        with cache.env.begin(write=True) as txn:
            value = bytearray(txn.get(bytes.fromhex(h), db=cache.chunks))
            value[len(value) // 2] ^= 0x01
            txn.put(bytes.fromhex(h), bytes(value), db=cache.chunks)
    finally:
        cache.close()
    r = cli(env, "cache", "verify", "--cache-dir", str(cache_dir), check=False)
    assert r.returncode == 1 and "1 damaged, dropped" in r.stdout and h in r.stderr
    r = cli(env, "cache", "verify", "--cache-dir", str(cache_dir))
    assert f"verified {n - 1} chunks" in r.stdout and "all intact" in r.stdout

    used = json.loads(cli(env, "cache", "stats", "--json", "--cache-dir", str(cache_dir)).stdout)["used_bytes"]
    cli(env, "cache", "prune", "--cache-dir", str(cache_dir), "--max-size", str(used // 2))
    st = json.loads(cli(env, "cache", "stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert st["used_bytes"] <= used // 2 and st["entries"] < n - 1
    cli(env, "cache", "prune", "--cache-dir", str(cache_dir), "--all")
    st = json.loads(cli(env, "cache", "stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert st["entries"] == 0 and st["manifests"] == 0
    one_line_error(cli(env, "cache", "prune", "--cache-dir", str(cache_dir), check=False), "exactly one of")
    one_line_error(cli(env, "cache", "stats", "--cache-dir", str(tmp_path / "none"), check=False),
                   "no modelfs cache in")


def test_mount_helper_as_mount8_calls_it(env, bucket, sample_model, mounts, tmp_path):
    publish(env, bucket, sample_model)
    mnt = tmp_path / "models"
    mnt.mkdir()
    opts = f"ro,_netdev,nofail,cache_dir={tmp_path / 'c'},cache_size=1G,endpoint_url={env['AWS_ENDPOINT_URL']}"
    r = mounts.run("mount.modelfs", f"s3://{bucket}/reg/m", str(mnt), "-o", opts)
    assert r.returncode == 0, r.stderr
    assert tree_digest(mnt) == tree_digest(sample_model)
    assert stats(env, mnt)["cache_cap_bytes"] == 1 << 30
    mounts.unmount(mnt)
    r = mounts.run("mount.modelfs", f"s3://{bucket}/reg/m", str(mnt), "-o", "rw")
    assert r.returncode == 1 and "read-only" in r.stderr and not os.path.ismount(mnt)

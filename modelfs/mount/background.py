"""``modelfs mount`` without ``--foreground``: start the daemon detached, return once it serves.

The parent runs this program again with ``--foreground --ready-fd N`` in a new session
and waits on the pipe: ``READY`` (the daemon serves files) or ``ERROR <message>`` (it
failed, and has exited). This module imports nothing heavy (no FUSE, no boto3), so the
waiting parent costs a fraction of the daemon's start-up.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from typing import Any

from ..cache import cache_root, default_cache_dir
from ..config import Timeouts
from ..errors import ModelfsError
from ..transfer.spawn import Spawned, spawn, worker_config


def start_timeout(timeouts: Timeouts) -> float:
    """How long ``modelfs mount`` waits for its daemon: long enough for the daemon's own
    start-up requests (a tag, a manifest) to fail with their error on a hung store, so
    the user sees that error rather than a bare timeout."""
    return 3 * timeouts.request_bound() + 30.0


def prestart_workers(settings: dict[str, Any]) -> list[Spawned]:
    """Start a mount daemon's fetch workers first thing, from its settings alone, so their
    start-up (~0.13 s of imports each) overlaps the daemon's own imports and the resolution
    of its source instead of following them. ``Lanes`` adopts those that match what it
    would start (it ends the others); the daemon ends them if it fails before."""
    cache_dir = cache_root((settings["cache_dir"] or default_cache_dir()).absolute(), sealed=settings["encrypt_cache"])
    n, config = worker_config(str(cache_dir), settings["cache_size"], workers=settings["fetch_workers"],
                              concurrency=settings["concurrency"],
                              timeouts=Timeouts(settings["connect_timeout"], settings["read_timeout"],
                                                settings["attempts"]),
                              encrypted=settings["encryption_key_file"] is not None,
                              sealed=settings["encrypt_cache"])
    return [spawn(config) for _ in range(n)]


def log_path(cache_dir: Path, mountpoint: Path) -> Path:
    """Where a background mount's daemon logs: ``<cache_dir>/logs/mount-<mountpoint>.log``."""
    slug = str(mountpoint).strip("/").replace("/", "_") or "root"
    return cache_dir / "logs" / f"mount-{slug}.log"


def start_background(argv: list[str], log_path: Path, timeout: float) -> int:
    """Start ``modelfs … mount … --foreground`` detached; return its PID once it serves."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    r, w = os.pipe()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "modelfs", *argv, "--foreground",
                                 "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    os.close(w)
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                proc.kill()
                proc.wait()
                raise ModelfsError(f"the mount daemon did not become ready in {timeout:g} s; see {log_path}")
            chunk = pipe.read(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.decode(errors="replace").strip()
    if line == "READY":
        return proc.pid
    if line.startswith("ERROR "):
        proc.wait(30)
        raise ModelfsError(line[6:])
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    raise ModelfsError(f"the mount daemon exited ({proc.returncode}) before serving; see {log_path}")

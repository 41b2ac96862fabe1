"""``modelfs mount`` without ``--foreground``: start the daemon detached, return once it serves.

The command forks; the child becomes the daemon (a session of its own, its output in
``<cache_dir>/logs/mount-<mountpoint>.log``) and the parent waits on a pipe: ``READY``
(the daemon serves files) or ``ERROR <message>`` (it failed, and has exited). This
module imports nothing heavy (no FUSE, no boto3), so the waiting parent costs a
fraction of the daemon's start-up and the child starts from a clean process.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import logs
from ..cache import cache_root
from ..config import Timeouts
from ..errors import ModelfsError
from ..transfer.spawn import Spawned, spawn, worker_config
from .resolving import Ahead, resolve_ahead
from .settings import cache_dir_of, lanes_of


def start_timeout(timeouts: Timeouts) -> float:
    """How long ``modelfs mount`` waits for its daemon: long enough for the daemon's own
    start-up requests (a tag, a manifest) to fail with their error on a hung store, so
    the user sees that error rather than a bare timeout."""
    return 3 * timeouts.request_bound() + 30.0


def prestart_workers(settings: dict[str, Any]) -> list[Spawned]:
    """Start a mount daemon's fetch workers from its settings alone, before it resolves its
    source, so their start-up (~0.13 s of imports each) overlaps that and the mount instead
    of following them. ``Lanes`` adopts those that match what it
    would start (it ends the others); the daemon ends them if it fails before."""
    cache_dir = cache_root(cache_dir_of(settings), sealed=settings["encrypt_cache"])
    n, wc = worker_config(lanes_of(settings), str(cache_dir), settings["cache_size"],
                          encrypted=settings["encryption_key_file"] is not None)
    return [spawn(wc) for _ in range(n)]


def log_path(cache_dir: Path, mountpoint: Path) -> Path:
    """Where a background mount's daemon logs: ``<cache_dir>/logs/mount-<mountpoint>.log``."""
    slug = str(mountpoint).strip("/").replace("/", "_") or "root"
    return cache_dir / "logs" / f"mount-{slug}.log"


def start_background(settings: dict[str, Any], log_path: Path, timeout: float) -> int:
    """Start the daemon for ``settings`` detached; return its PID once it serves.

    The daemon is this process, forked (no new interpreter, no second import of the CLI:
    ~0.14 s of a start), in a session of its own, its output in ``log_path``; a model
    ref's helper (:func:`~.resolving.resolve_ahead`) is forked first, to resolve it while
    the daemon imports. Nothing heavy is imported before the forks, and no thread or
    LMDB environment exists yet, so the children start clean."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ahead = resolve_ahead(settings, log_path=log_path)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon: never returns into the command line
        os.close(r)
        _become_daemon(settings, log_path, w, ahead.in_sibling() if ahead is not None else None)
    os.close(w)
    if ahead is None:
        return _wait_ready(pid, r, log_path, timeout)
    ahead.forget()  # the daemon reads the answer
    try:
        pid = _wait_ready(pid, r, log_path, timeout)
    except BaseException:
        ahead.abandon()  # the daemon failed, maybe before it read the answer: nobody will
        raise
    ahead.reap()  # it has answered: it exits at once
    return pid


def _wait_ready(pid: int, r: int, log_path: Path, timeout: float) -> int:
    """Wait for the daemon ``pid``'s line on pipe ``r``: its PID once READY, else the error it
    said (it has exited then) or one for its silence (it is ended)."""
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                _end(pid, kill=True)
                raise ModelfsError(f"the mount daemon did not become ready in {timeout:g} s; see {log_path}")
            chunk = pipe.read(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.decode(errors="replace").strip()
    if line == "READY":
        return pid
    if line.startswith("ERROR "):
        _end(pid, grace=30)
        raise ModelfsError(line[6:])
    code = _end(pid, grace=5, kill=True)
    raise ModelfsError(f"the mount daemon exited ({code}) before serving; see {log_path}")


def _become_daemon(settings: dict[str, Any], log_path: Path, ready_fd: int, ahead: Ahead | None) -> None:
    """In the forked child: detach, log to ``log_path``, serve; exit, never return."""
    code = 1
    try:
        os.setsid()
        logs.to_file(log_path, settings["log_level"])
        from .daemon import run_foreground

        # after the daemon's imports, not before: on a small host the workers' imports would
        # compete with them for the cores; now they overlap resolving the source and mounting
        early = prestart_workers(settings)
        run_foreground(settings, ready_fd, early, ahead)
        code = 0
    except ModelfsError as e:  # said through the ready pipe; the log says it too
        print(f"modelfs: error: {e}", file=sys.stderr)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _end(pid: int, *, grace: float = 0.0, kill: bool = False) -> int | None:
    """Reap the daemon child within ``grace`` seconds (``kill``: then SIGKILL it); its exit status."""
    deadline = time.monotonic() + grace
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            if not kill:
                return None
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.05)

"""Starting fetch worker processes: the one place their command line, environment and
configuration are made. Light on purpose (no trio, no boto3), so a mount daemon can
start its workers as soon as its own imports are done and let their start overlap
resolving its source and mounting.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from ..config import Timeouts
from .protocol import WorkerConfig


def default_workers() -> int:
    """Half the cores, at least 2 and at most 8: the store and the FUSE loop need the rest."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def worker_config(cache_dir: str, cache_cap: int, *, workers: int, concurrency: int, timeouts: Timeouts,
                  encrypted: bool, sealed: bool, tiers: tuple[str, ...] = ()) -> tuple[int, WorkerConfig]:
    """How many workers (``workers`` 0: the default) and the configuration each starts with:
    ``concurrency`` GETs shared out among them."""
    n = workers or default_workers()
    return n, WorkerConfig(cache_dir=cache_dir, cache_cap=cache_cap, threads=max(1, -(-concurrency // n)),
                           timeouts=timeouts, encrypted=encrypted, sealed=sealed, tiers=tiers)


@dataclass(eq=False)
class Spawned:
    """A worker process and the daemon's end of its socket, not yet adopted by ``Lanes``."""
    proc: subprocess.Popen
    sock: socket.socket
    config: WorkerConfig
    adopted: bool = False  # Lanes owns it now (and ends it)

    def abandon(self, grace: float = 5.0) -> None:
        """End it (it exits on end of file; an encrypted one waiting for its key too)."""
        self.adopted = True  # nobody else may use it
        self.sock.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn(config: WorkerConfig) -> Spawned:
    """Start one worker. It gets no credentials (every URL comes signed): ``AWS_*`` variables
    are not passed on, but ``AWS_CA_BUNDLE``."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfs.transfer.worker", config.to_json(), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return Spawned(proc, mine, config)

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
from base64 import b64encode
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import TRANSFER_CONCURRENCY, Timeouts
from .protocol import Connect, Key, WorkerConfig, encode

if TYPE_CHECKING:  # not imported: lmdb is not needed to start a worker
    from ..cache import BlockCache


def default_workers() -> int:
    """Half the cores, at least 2 and at most 8: the store and the FUSE loop need the rest."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class LaneConfig:
    """How :class:`~.lanes.Lanes` run: their workers (made here) and the daemon's side."""
    workers: int = 0  # fetch worker processes; 0: default_workers()
    concurrency: int = TRANSFER_CONCURRENCY  # parallel GETs over all workers (a mount passes its own)
    cache_threads: int = 4  # parallel LMDB calls from this process
    fetch_timeout: float = 60.0  # a chunk not loaded by then is EIO for its reader
    timeouts: Timeouts = Timeouts()  # each store request's (the workers' and boto3's)
    spill_bytes: int = 64 << 20  # verified chunks kept in memory when the cache cannot store them
    sealed: bool = False  # --encrypt-cache: the cache holds chunks encrypted (no early hand-over)
    tiers: tuple[str, ...] = ()  # --cache-tier: nodes the workers ask for chunks before the store


def worker_config(config: LaneConfig, cache_dir: str, cache_cap: int, *, encrypted: bool
                  ) -> tuple[int, WorkerConfig]:
    """How many workers lanes of ``config`` over the cache in ``cache_dir`` ("": none) start
    (``workers`` 0: the default), and the configuration each starts with: ``concurrency``
    GETs shared out among them."""
    n = config.workers or default_workers()
    return n, WorkerConfig(cache_dir=cache_dir, cache_cap=cache_cap, threads=max(1, -(-config.concurrency // n)),
                           timeouts=config.timeouts, encrypted=encrypted, sealed=config.sealed, tiers=config.tiers)


def lanes_workers(config: LaneConfig, cache: BlockCache | None, *, encrypted: bool) -> tuple[int, WorkerConfig]:
    """:func:`worker_config` of lanes over ``cache`` (an open one, or None)."""
    if cache is None:
        return worker_config(config, "", 0, encrypted=encrypted)
    return worker_config(config, str(cache.path.parent), cache.cap, encrypted=encrypted)


def prestart(config: LaneConfig, cache: BlockCache | None, *, encrypted: bool) -> list[Spawned]:
    """Start the workers lanes of ``config`` over ``cache`` will want, before a command knows
    its registry: their start-up (~0.3 s of imports each, on the other cores) then
    overlaps the command's own (boto3, resolving a ref) instead of following it.
    ``Lanes(…, spawned=…)`` adopts those whose configuration matches; whoever started
    them ends those never adopted (``abandon``)."""
    n, wc = lanes_workers(config, cache, encrypted=encrypted)
    return [spawn(wc) for _ in range(n)]


def end_unadopted(spawned: Iterable[Spawned]) -> None:
    """End the workers started early that no ``Lanes`` adopted (a command or daemon that
    failed, or finished, before it needed them; ``Lanes`` ends those it adopted)."""
    for s in spawned:
        if not s.adopted:
            s.abandon()


@dataclass(eq=False)
class Spawned:
    """A worker process and the daemon's end of its socket, not yet adopted by ``Lanes``."""
    proc: subprocess.Popen
    sock: socket.socket
    config: WorkerConfig
    adopted: bool = False  # Lanes owns it now (and ends it)
    keyed: bool = False  # it has its registry key (an encrypted registry's worker waits for it first)

    def give_key(self, secret: bytes) -> None:
        """Send the registry key: an encrypted registry's worker's first message, once."""
        if not self.keyed:
            self.keyed = True
            self.sock.send(encode(Key(b64encode(secret).decode())))

    def connect(self, url: str, secret: bytes | None = None) -> None:
        """Have it open its connections to ``url``'s origin now, so the first requests wait
        for no handshake (``secret``: an encrypted registry's key, which must come first)."""
        try:
            if secret is not None:
                self.give_key(secret)
            self.sock.send(encode(Connect(url)))
        except OSError:
            pass  # it died: Lanes replaces it

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

"""The mount daemon's life: resolve what to show, mount, signal readiness, serve, and on
SIGTERM/SIGINT or an external unmount, close (``modelfs unmount`` is :mod:`.mountpoint`'s).

Started in the foreground (systemd, ``--foreground``), or by :mod:`.background` for a
waiting ``modelfs mount``: then it writes ``READY`` to its ready pipe once a file on
the mount can be stat'ed from another thread, or ``ERROR <message>`` if anything
failed first (a bad setting, ref, key or mount point), and a failed mount leaves no
process behind.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .. import malloc
from ..cache import BlockCache, CacheView, cache_root
from ..errors import ModelfsError
from ..registry.source import Source
from ..transfer.lanes import LaneConfig, Lanes
from ..transfer.spawn import Spawned, end_unadopted
from . import xattrs
from .fs import ModelFS
from .metrics import Reporter
from .mountpoint import check_mountpoint, set_kernel_readahead
from .namespace import Namespace
from .readahead import ReadaheadConfig
from .reader import Reader, Unsealer
from .resolving import Ahead, resolve_source, root_signature, start_signature
from .settings import SourceSpec, cache_dir_of, lanes_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    spec: SourceSpec  # what to show, and what resolving it takes
    mountpoint: Path
    cache_dir: Path
    cache_size: int
    allow_other: bool = False
    nonempty: bool = False  # mount over a directory that has entries
    kernel_readahead_kb: int | None = 1024
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_address: str = "127.0.0.1"
    readahead: ReadaheadConfig = field(default_factory=ReadaheadConfig)
    lanes: LaneConfig = field(default_factory=LaneConfig)

    @classmethod
    def from_settings(cls, s: dict[str, Any]) -> MountConfig:
        """From :func:`modelfs.config.resolve`'s merged, parsed settings."""
        return cls(
            spec=SourceSpec.of(s), mountpoint=s["mountpoint"].absolute(),
            cache_dir=cache_dir_of(s), cache_size=s["cache_size"],
            allow_other=s["allow_other"], nonempty=s["nonempty"],
            kernel_readahead_kb=s["kernel_readahead_kb"] or None,
            metrics_port=s["metrics_port"], metrics_address=s["metrics_address"],
            readahead=ReadaheadConfig(max_bytes=s["readahead"], trigger_bytes=s["readahead_trigger"],
                                      tensor_order=s["readahead_order"] == "tensors"),
            lanes=lanes_of(s))


# -- the daemon ----------------------------------------------------------------------

def _bound_malloc() -> None:
    """Make glibc return freed multi-MiB chunk buffers to the OS.

    By default glibc raises its mmap threshold each time a large mmap'd block is
    freed, after which 4 MiB chunk buffers come from per-thread heaps and fragment
    them: the daemon's RSS then grows far past its memory budget.
    """
    malloc.tune(mmap_threshold=1 << 20, arena_max=4)


def serve(cfg: MountConfig, on_ready: Callable[[], None] = lambda: None, early: Sequence[Spawned] = (),
          ahead: Ahead | None = None) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT: clean unmount).
    ``early``: fetch workers already started (``background.prestart_workers``); ``ahead``:
    the helper resolving the source meanwhile (:mod:`.resolving`)."""
    _bound_malloc()
    cache = BlockCache(cache_root(cfg.cache_dir, sealed=cfg.spec.sealed), cfg.cache_size)
    try:
        _serve(cfg, cache, on_ready, list(early), ahead)
    finally:
        cache.close()
    log.info("unmounted %s", cfg.mountpoint)


def _serve(cfg: MountConfig, cache: BlockCache, on_ready: Callable[[], None], early: list[Spawned],
           ahead: Ahead | None) -> None:
    def connect_workers(origin: str) -> None:  # the helper went to the store: so will the first reads
        for s in early:
            s.connect(origin, cfg.spec.key.secret if cfg.spec.key is not None else None)
    source = resolve_source(cfg.spec, cache, ahead, on_store=connect_workers)
    check_mountpoint(cfg.mountpoint, cfg.nonempty)
    lanes = Lanes(source.catalog.registry if source.catalog else None, cache, cfg.lanes, spawned=early)
    view = CacheView(cache)
    unsealer = Unsealer(lanes, cache, lanes.registry.codec) if cfg.spec.sealed and lanes.registry else None
    reader = Reader(view, lanes, cfg.readahead, unsealer=unsealer)
    ns = Namespace(lanes, source.catalog, ttl=cfg.spec.ttl)
    if source.pointers is not None:
        ns.root_pointers(source.pointers)
    elif source.manifest is not None:
        # with trusted keys the catalog has the signature already
        ns.root_version(source.model, source.version, source.manifest,
                        start_signature(source, cfg.spec.ttl, ahead))
    else:
        ns.root_registry()
    ops = ModelFS(ns, reader)
    reporter = Reporter(lanes, cache, cfg.spec.source, cfg.mountpoint, source.version)
    ops.root_xattrs[xattrs.key_of(xattrs.PID)] = lambda: str(os.getpid()).encode()
    ops.root_xattrs[xattrs.key_of(xattrs.STATS)] = reporter.refreshed_json
    metrics_server = reporter.serve_http(cfg.metrics_address, cfg.metrics_port) if cfg.metrics_port else None
    options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
    if cfg.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(cfg.mountpoint), options)
        # what exists now (imports, botocore's models, manifests) lives as long as the
        # mount: keep it out of the collector's full passes, each of which would
        # otherwise walk it all (~60 ms here) while every reader waits on the FUSE loop;
        # `modelfs mount` turned the collector off for the start (cli/host.py)
        gc.freeze()
        gc.enable()
        try:
            # a cold start (its helper went to the store) makes the daemon's S3 client once serving
            cold = ahead is not None and ahead.went_to_store
            trio.run(_main, cfg, source, lanes, ns, reader, view, reporter, on_ready, cold)
        finally:
            pyfuse3.close(unmount=True)
            view.close()
            lanes.close()  # the workers finish and commit what they hold: fetched is cached
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


async def _main(cfg: MountConfig, source: Source, lanes: Lanes, ns: Namespace, reader: Reader, view: CacheView,
                reporter: Reporter, on_ready: Callable[[], None], cold: bool) -> None:
    async with trio.open_nursery() as nursery:
        # workers still starting take requests in their sockets: READY does not wait for them
        await nursery.start(partial(lanes.run, ready_first=False))
        await nursery.start(reader.run)
        nursery.start_soon(_record_uses, lanes, view)
        nursery.start_soon(_on_signals)
        nursery.start_soon(_when_serving, cfg, source, ns, lanes, reporter, on_ready, cold)
        await pyfuse3.main()  # returns on terminate() or an external unmount
        nursery.cancel_scope.cancel()


async def _record_uses(lanes: Lanes, view: CacheView, period: float = 5.0) -> None:
    """Write the last-use times of chunks served from the cache (for its LRU), in batches."""
    while True:
        await trio.sleep(period)
        if view.touched:
            batch, view.touched = view.touched, {}
            await lanes.cache_call(lanes.cache.touch, batch)


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            return


async def _when_serving(cfg: MountConfig, source: Source, ns: Namespace, lanes: Lanes, reporter: Reporter,
                        on_ready: Callable[[], None], cold: bool) -> None:
    # From a worker thread, never the trio thread: the loop must be free to answer.
    await trio.to_thread.run_sync(os.stat, cfg.mountpoint)
    if cfg.kernel_readahead_kb:
        await trio.to_thread.run_sync(set_kernel_readahead, cfg.mountpoint, cfg.kernel_readahead_kb)
    log.info("serving %s at %s", cfg.spec.source, cfg.mountpoint)
    on_ready()
    await _after_ready(source, ns, lanes, cold)
    await reporter.run(sd_notify)  # then STATUS= figures for systemctl status, until unmounted


async def _after_ready(source: Source, ns: Namespace, lanes: Lanes, cold: bool) -> None:
    """What the start left for later. ``cold`` (the helper went to the store): the S3
    client, which the cold reads past the helper's signed URLs need (mount/resolving.py),
    made now beside the first reads rather than before serving. Else it is made when first
    needed: its ~0.3 s of imports would compete with a warm host's first reads for the CPU
    and the GIL (measured: the first 64 MiB read 0.26 s instead of 0.18 s). Then a
    single-version mount's signature the cache did not know (model.sig)."""
    if cold and lanes.registry is not None and not lanes.registry.store.connected:
        try:
            await lanes.store_call(lanes.registry.store.connect)
            gc.freeze()  # botocore's models live as long as the mount (see serve)
        except ModelfsError as e:  # the first read that needs it meets it again, with its error
            log.warning("S3 client: %s", e)
    cat = source.catalog
    if cat is None or source.manifest is None or source.version is None or cat.knows_signature(source.version):
        return
    signature = await lanes.store_call(root_signature, source)
    gc.freeze()  # botocore's models, now loaded, live as long as the mount, like the rest (see serve)
    if signature is not None:
        ns.add_signature(source.version, signature)


# -- readiness: systemd (Type=notify) and the background start ---------------------------

def sd_notify(message: str) -> None:
    """Send a state line to systemd when it asked for one ($NOTIFY_SOCKET); else nothing."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


def run_foreground(settings: dict[str, Any], ready_fd: int | None, early: Sequence[Spawned] = (),
                   ahead: Ahead | None = None) -> None:
    """Serve in this process (``settings``: :func:`modelfs.config.resolve`'s); tell systemd
    and/or a waiting parent once files are readable, or the parent what failed first.
    ``early``, ``ahead``: see :func:`serve`."""
    def ready() -> None:
        sd_notify(f"READY=1\nSTATUS=serving {cfg.spec.source} at {cfg.mountpoint}")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
    try:
        cfg = MountConfig.from_settings(settings)
        serve(cfg, ready, early, ahead)
    except ModelfsError as e:
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"ERROR {e}\n".encode())
            except OSError:
                pass
        raise
    finally:
        end_unadopted(early)  # those the daemon failed before adopting
        if ahead is not None:
            ahead.abandon()  # a daemon that failed before it read the helper's answer

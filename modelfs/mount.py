"""The mount daemon's life: resolve what to show, mount, signal readiness, serve, unmount.

``modelfs mount`` (without ``--foreground``) starts this same program again in
the background with ``--foreground --ready-fd N`` and waits: the child writes
``READY`` to that pipe only once a file on the mount can be stat'ed from another
thread, or ``ERROR <message>`` if anything failed first (bad ref, busy mount
point, ...), so the parent returns success only for a mount that serves files,
and a failed mount leaves no process behind.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .cache import BlockCache, CacheView, default_cache_dir
from .config import StoreConfig
from .errors import ModelfsError, NotFoundError, StoreUnavailableError, UsageError
from .fetch import Fetcher
from .fs import XATTR_PREFIX, ModelFS
from .lanes import LaneConfig, Lanes
from .manifest import Manifest
from .metrics import Reporter
from .refs import ModelRef, is_model_ref, parse_model, parse_registry
from .registry import Registry, open_registry, origin_registry, read_manifest_file
from .tree import Namespace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    source: str  # s3://bucket/prefix (registry), s3://…/name@sel (model) or a manifest file
    mountpoint: Path
    cache_dir: Path
    cache_size: int
    registry_url: str | None = None  # chunks of a manifest file (default: its origin)
    allow_other: bool = False
    metadata_ttl: float = 30.0
    kernel_readahead_kb: int | None = 1024
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_address: str = "127.0.0.1"
    readahead_bytes: int = 64 << 20  # largest readahead window per sequential reader
    store: StoreConfig = field(default_factory=StoreConfig)
    lanes: LaneConfig = field(default_factory=LaneConfig)

    @classmethod
    def from_settings(cls, s: dict[str, Any]) -> MountConfig:
        """From :func:`modelfs.config.resolve`'s merged, parsed settings."""
        store = StoreConfig(endpoint_url=s["endpoint_url"], region=s["region"], profile=s["profile"],
                            concurrency=s["concurrency"])
        return cls(
            source=s["source"], mountpoint=s["mountpoint"].absolute(), registry_url=s["registry"],
            cache_dir=(s["cache_dir"] or default_cache_dir()).absolute(), cache_size=s["cache_size"],
            allow_other=s["allow_other"], metadata_ttl=s["metadata_ttl"],
            kernel_readahead_kb=s["kernel_readahead_kb"] or None,
            metrics_port=s["metrics_port"], metrics_address=s["metrics_address"], store=store,
            readahead_bytes=s["readahead"],
            lanes=LaneConfig(workers=s["fetch_workers"], concurrency=store.concurrency,
                             fetch_timeout=s["fetch_timeout"], connect_timeout=store.connect_timeout,
                             read_timeout=store.read_timeout, max_attempts=store.max_attempts))


# -- the mount point -------------------------------------------------------------

def unmount(mountpoint: Path, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().removeprefix("fusermount3: ")
        if "busy" in msg.lower():
            msg += " (files are open on it; close them, or use --lazy)"
        raise ModelfsError(f"cannot unmount {mountpoint}: {msg}")


@dataclass(frozen=True)
class Unmounted:
    pid: int | None  # the daemon's, when the mount answered
    still_running: bool  # the daemon outlived the wait
    other_mounts: list[str]  # bind mounts of the same filesystem still in place (this namespace)


def mounts_of_device(dev: int) -> list[str]:
    """Mount points in this mount namespace of the filesystem with st_dev ``dev``."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] == want:
                out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def unmount_and_wait(mountpoint: Path, lazy: bool = False, timeout: float = 30.0) -> Unmounted:
    """Unmount, then wait for the daemon to exit — unless a bind mount of the same
    filesystem keeps it serving (the kernel ends a FUSE session only with its last mount)."""
    try:
        pid: int | None = int(os.getxattr(mountpoint, XATTR_PREFIX + "pid"))
        dev: int | None = os.stat(mountpoint).st_dev
    except (OSError, ValueError):
        pid = dev = None
    unmount(mountpoint, lazy)
    others = mounts_of_device(dev) if dev is not None else []
    if pid is None:
        return Unmounted(None, False, others)
    deadline = time.monotonic() + (0 if lazy or others else timeout)
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Unmounted(pid, _alive(pid), others)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's daemon: alive
        return True
    return True


def check_mountpoint(mountpoint: Path) -> None:
    """A usable, not-yet-mounted directory; a dead FUSE mount there is cleared first."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # "Transport endpoint is not connected": a dead daemon
            _clear_dead_mount(mountpoint)
        elif e.errno == errno.ENOENT:
            raise UsageError(f"mount point {mountpoint} does not exist") from None
        else:
            raise UsageError(f"mount point {mountpoint}: {e.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        # stat may be answered from the kernel's attribute cache even when the daemon
        # is gone; listing the directory always asks the daemon
        try:
            os.listdir(mountpoint)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                _clear_dead_mount(mountpoint)
                return
        raise UsageError(f"{mountpoint} is already a mount point (busy); unmount it first")


def _clear_dead_mount(mountpoint: Path) -> None:
    log.warning("%s: clearing the stale mount of a daemon that died", mountpoint)
    unmount(mountpoint, lazy=True)


def _set_kernel_readahead(mountpoint: Path, kb: int) -> None:
    """Bigger kernel reads per request (CernVM-FS does the same); root only, best effort."""
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("could not set %s: %s", path, e)


# -- what to show ------------------------------------------------------------------

@dataclass
class Source:
    registry: Registry | None
    model: str | None = None
    version: str | None = None
    manifest: Manifest | None = None  # None: the whole registry


def resolve_source(cfg: MountConfig, cache: BlockCache | None = None) -> Source:
    src = cfg.source
    if src.startswith("s3://"):
        if is_model_ref(src):
            ref = parse_model(src)
            registry = open_registry(ref.registry, cfg.store)
            version, manifest = _resolve_model(registry, ref, cache)
            return Source(registry, ref.name, version, manifest)
        rref = parse_registry(src)
        registry = open_registry(rref, cfg.store)
        registry.store.check_bucket()
        if registry.models() or not rref.prefix:
            return Source(registry)
        # not a registry: read s3://…/NAME as NAME@latest, as pull and inspect do
        try:
            ref = parse_model(src)
            parent = Registry(registry.store, ref.registry)
            version, manifest = parent.resolve(ref)
        except (UsageError, NotFoundError):
            raise NotFoundError(f"no registry and no model at {src}") from None
        return Source(parent, ref.name, version, manifest)
    manifest = read_manifest_file(src)
    return Source(origin_registry(manifest, cfg.registry_url, cfg.store), manifest.name,
                  manifest.version_id, manifest)


def _resolve_model(registry: Registry, ref: ModelRef, cache: BlockCache | None) -> tuple[str, Manifest]:
    """From the store; if it cannot be reached, from what this cache saw last.

    So a daemon restarted during a store outage (Restart=on-failure after a crash)
    comes back with the version it served, and its cached chunks read as before.
    """
    try:
        version, manifest = registry.resolve(ref)
    except StoreUnavailableError as e:
        if cache is None:
            raise
        seen = (ref.selector, 0.0) if ref.is_version else cache.get_ref(_ref_key(registry, ref))
        data = cache.get_manifest(seen[0]) if seen else None
        if seen is None or data is None:
            raise StoreUnavailableError(f"{e} (and this cache has never served {ref.name}@{ref.selector}, "
                                        "so there is nothing to start from)") from None
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seen[1])) if seen[1] else "immutable"
        log.warning("object store unreachable (%s): serving %s@%s as version %s, the last one seen (%s)",
                    e, ref.name, ref.selector, seen[0], when)
        return seen[0], registry.parse_manifest(ref.name, seen[0], data)
    if cache is not None:
        cache.put_manifest(version, manifest.to_bytes())
        remember_tag(cache, registry, ref, version)
    return version, manifest


def _ref_key(registry: Registry, ref: ModelRef) -> str:
    return f"{registry.store.endpoint} {ref}"


def remember_tag(cache: BlockCache, registry: Registry, ref: ModelRef, version: str) -> None:
    """Keep what a tag ref resolved to, so a mount of it can start while the store is down
    (its manifest must be cached too: a mount and ``warm_cache`` put it there)."""
    if not ref.is_version:
        cache.put_ref(_ref_key(registry, ref), version)


# -- the daemon ----------------------------------------------------------------------

def _bound_malloc() -> None:
    """Make glibc return freed multi-MiB chunk buffers to the OS.

    By default glibc raises its mmap threshold each time a large mmap'd block is
    freed, after which 4 MiB chunk buffers come from per-thread heaps and fragment
    them: the daemon's RSS then grows far past its memory budget.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MiB
        libc.mallopt(-8, 4)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def serve(cfg: MountConfig, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT: clean unmount)."""
    _bound_malloc()
    cache = BlockCache(cfg.cache_dir, cfg.cache_size)
    try:
        _serve(cfg, cache, on_ready)
    finally:
        cache.close()
    log.info("unmounted %s", cfg.mountpoint)


def _serve(cfg: MountConfig, cache: BlockCache, on_ready: Callable[[], None]) -> None:
    source = resolve_source(cfg, cache)
    check_mountpoint(cfg.mountpoint)
    lanes = Lanes(source.registry, cache, cfg.lanes)
    view = CacheView(cache)
    fetcher = Fetcher(view, lanes, readahead_bytes=cfg.readahead_bytes)
    ns = Namespace(lanes, source.registry, ttl=cfg.metadata_ttl)
    if source.manifest is not None:
        ns.root_version(source.model, source.version, source.manifest)
    else:
        ns.root_registry()
    ops = ModelFS(ns, fetcher)
    reporter = Reporter(lanes, cache, cfg.source, cfg.mountpoint, source.version)
    ops.root_xattrs["pid"] = lambda: str(os.getpid()).encode()
    ops.root_xattrs["stats"] = reporter.refreshed_json
    metrics_server = reporter.serve_http(cfg.metrics_address, cfg.metrics_port) if cfg.metrics_port else None
    options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
    if cfg.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(cfg.mountpoint), options)
        try:
            trio.run(_main, cfg, lanes, view, reporter, on_ready)
        finally:
            pyfuse3.close(unmount=True)
            view.close()
            lanes.close()  # the workers finish and commit what they hold: fetched is cached
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


async def _main(cfg: MountConfig, lanes: Lanes, view: CacheView, reporter: Reporter,
                on_ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(lanes.run)
        nursery.start_soon(_record_uses, lanes, view)
        nursery.start_soon(_on_signals)
        nursery.start_soon(_when_serving, cfg, reporter, on_ready)
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


async def _when_serving(cfg: MountConfig, reporter: Reporter, on_ready: Callable[[], None]) -> None:
    # From a worker thread, never the trio thread: the loop must be free to answer.
    await trio.to_thread.run_sync(os.stat, cfg.mountpoint)
    if cfg.kernel_readahead_kb:
        await trio.to_thread.run_sync(_set_kernel_readahead, cfg.mountpoint, cfg.kernel_readahead_kb)
    log.info("serving %s at %s", cfg.source, cfg.mountpoint)
    on_ready()
    await reporter.run(sd_notify)  # then STATUS= figures for systemctl status, until unmounted


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


def run_foreground(cfg: MountConfig, ready_fd: int | None) -> None:
    """Serve in this process; tell systemd and/or a waiting parent once files are readable."""
    def ready() -> None:
        sd_notify(f"READY=1\nSTATUS=serving {cfg.source} at {cfg.mountpoint}")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
    try:
        serve(cfg, ready)
    except ModelfsError as e:
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"ERROR {e}\n".encode())
            except OSError:
                pass
        raise


def start_background(argv: list[str], log_path: Path, timeout: float = 120.0) -> int:
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

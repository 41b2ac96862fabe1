"""The mount daemon's life: resolve what to show, mount, signal readiness, serve, unmount.

``modelfs mount`` (without ``--foreground``) starts this same program again in
the background with ``--foreground --ready-fd N`` and waits: the child writes
``READY`` to that pipe only once a file on the mount can be stat'ed from another
thread, or ``ERROR <message>`` if anything failed first (bad ref, busy mount
point, ...), so the parent returns success only for a mount that serves files,
and a failed mount leaves no process behind.
"""

from __future__ import annotations

import gc
import logging
import os
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

from .. import malloc
from ..cache import BlockCache, CacheView, cache_root, default_cache_dir
from ..registry.catalog import Catalog
from ..config import StoreConfig
from ..errors import ModelfsError, NotFoundError, UsageError
from .reader import Fetcher
from .fs import XATTR_PREFIX, ModelFS
from ..transfer.lanes import LaneConfig, Lanes
from ..format.manifest import Manifest
from .metrics import Reporter
from .mountpoint import PID_XATTR, check_mountpoint, set_kernel_readahead
from ..format.pointers import PointerDir, registry_url_for
from ..format.refs import is_model_ref, parse_model, parse_registry
from ..format.encryption import RegistryKey
from ..format.trust import TrustedKeys
from ..registry.layout import Registry, open_registry, origin_registry, read_manifest_file
from .namespace import Namespace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    source: str  # s3://bucket/prefix (registry), s3://…/name@sel (model) or a manifest file
    mountpoint: Path
    cache_dir: Path
    cache_size: int
    registry_url: str | None = None  # chunks of a manifest file (default: its origin)
    allow_other: bool = False
    nonempty: bool = False  # mount over a directory that has entries
    metadata_ttl: float = 30.0
    kernel_readahead_kb: int | None = 1024
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_address: str = "127.0.0.1"
    readahead_bytes: int = 64 << 20  # largest readahead window per sequential reader
    readahead_order: str = "tensors"  # follow the loader's tensor order where a format says it
    store: StoreConfig = field(default_factory=StoreConfig)
    lanes: LaneConfig = field(default_factory=LaneConfig)
    encryption_key: RegistryKey | None = None  # an encrypted registry's key (never shown)
    trust: TrustedKeys | None = None  # serve only versions (and tags) these keys signed
    encrypt_cache: bool = False  # keep chunks encrypted in the cache (under <cache_dir>/sealed)

    @classmethod
    def from_settings(cls, s: dict[str, Any]) -> MountConfig:
        """From :func:`modelfs.config.resolve`'s merged, parsed settings."""
        store = StoreConfig(endpoint_url=s["endpoint_url"], region=s["region"], profile=s["profile"],
                            concurrency=s["concurrency"], connect_timeout=s["connect_timeout"],
                            read_timeout=s["read_timeout"], max_attempts=s["attempts"])
        key_file = s["encryption_key_file"]
        if s["encrypt_cache"] and key_file is None:
            raise UsageError("encrypt_cache needs the registry's key: pass --encryption-key FILE too")
        return cls(
            encrypt_cache=s["encrypt_cache"],
            encryption_key=RegistryKey.load(key_file) if key_file is not None else None,
            trust=TrustedKeys(s["trusted_keys"]) if s["trusted_keys"] else None,
            source=s["source"], mountpoint=s["mountpoint"].absolute(), registry_url=s["registry"],
            cache_dir=(s["cache_dir"] or default_cache_dir()).absolute(), cache_size=s["cache_size"],
            allow_other=s["allow_other"], nonempty=s["nonempty"], metadata_ttl=s["metadata_ttl"],
            kernel_readahead_kb=s["kernel_readahead_kb"] or None,
            metrics_port=s["metrics_port"], metrics_address=s["metrics_address"], store=store,
            readahead_bytes=s["readahead"], readahead_order=s["readahead_order"],
            lanes=LaneConfig(workers=s["fetch_workers"], concurrency=store.concurrency,
                             fetch_timeout=s["fetch_timeout"], connect_timeout=store.connect_timeout,
                             read_timeout=store.read_timeout, max_attempts=store.max_attempts,
                             sealed=s["encrypt_cache"]))


    def start_timeout(self) -> float:
        """How long ``modelfs mount`` waits for its daemon: long enough for the daemon's
        own start-up requests (a tag, a manifest) to fail with their error on a hung
        store, so the user sees that error rather than a bare timeout."""
        return 3 * self.store.request_bound() + 30.0


# -- what to show ------------------------------------------------------------------

@dataclass
class Source:
    catalog: Catalog | None
    model: str | None = None
    version: str | None = None
    manifest: Manifest | None = None  # None: the whole registry
    pointers: PointerDir | None = None  # a directory of pointer files (a git checkout)


def resolve_source(cfg: MountConfig, cache: BlockCache | None = None) -> Source:
    """What the mount shows; with trusted keys, a version is resolved only if it verifies."""
    src = cfg.source

    def catalog_of(registry: Registry) -> Catalog:
        return Catalog(registry, cache, cfg.trust, sealed=cfg.encrypt_cache)

    if src.startswith("s3://"):
        if is_model_ref(src):
            ref = parse_model(src)
            catalog = catalog_of(open_registry(ref.registry, cfg.store, cfg.encryption_key, offline_ok=True))
            version, manifest = catalog.resolve(ref)
            return Source(catalog, ref.name, version, manifest)
        rref = parse_registry(src)
        registry = open_registry(rref, cfg.store, cfg.encryption_key, check=False)
        registry.store.check_bucket()
        if registry.models() or not rref.prefix:
            registry.check_encryption()
            return Source(catalog_of(registry))
        # not a registry: read s3://…/NAME as NAME@latest, as pull and inspect do
        try:
            ref = parse_model(src)
        except UsageError:
            raise NotFoundError(f"no registry and no model at {src}") from None
        parent_registry = Registry(registry.store, ref.registry, cfg.encryption_key)
        parent_registry.check_encryption()  # its own line for a missing or wrong key
        parent = catalog_of(parent_registry)
        try:
            version, manifest = parent.resolve(ref)
        except NotFoundError:
            raise NotFoundError(f"no registry and no model at {src}") from None
        return Source(parent, ref.name, version, manifest)
    if Path(src).is_dir():
        url = registry_url_for(Path(src), cfg.registry_url)
        registry = open_registry(parse_registry(url), cfg.store, cfg.encryption_key, offline_ok=True)
        registry.store.check_bucket()
        # with --registry every pointer is read from it; else only those whose origin it is
        pointers = PointerDir(Path(src), None if cfg.registry_url else str(registry.ref))
        return Source(catalog_of(registry), pointers=pointers)
    manifest = read_manifest_file(src)
    registry = origin_registry(manifest, cfg.registry_url, cfg.store, cfg.encryption_key, offline_ok=True)
    catalog = catalog_of(registry)
    catalog.verify(manifest, manifest.version_id)
    return Source(catalog, manifest.name, manifest.version_id, manifest)


def root_signature(source: Source) -> bytes | None:
    """The signature of a single-version mount's version, for model.sig (None: unsigned or,
    without trusted keys, not reachable now)."""
    assert source.catalog is not None and source.model is not None and source.version is not None
    try:
        return source.catalog.signature(source.model, source.version)
    except ModelfsError as e:
        log.info("signature of %s@%s: %s", source.model, source.version, e)
        return None


# -- the daemon ----------------------------------------------------------------------

def _bound_malloc() -> None:
    """Make glibc return freed multi-MiB chunk buffers to the OS.

    By default glibc raises its mmap threshold each time a large mmap'd block is
    freed, after which 4 MiB chunk buffers come from per-thread heaps and fragment
    them: the daemon's RSS then grows far past its memory budget.
    """
    malloc.tune(mmap_threshold=1 << 20, arena_max=4)


def serve(cfg: MountConfig, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT: clean unmount)."""
    _bound_malloc()
    cache = BlockCache(cache_root(cfg.cache_dir, sealed=cfg.encrypt_cache), cfg.cache_size)
    try:
        _serve(cfg, cache, on_ready)
    finally:
        cache.close()
    log.info("unmounted %s", cfg.mountpoint)


def _serve(cfg: MountConfig, cache: BlockCache, on_ready: Callable[[], None]) -> None:
    source = resolve_source(cfg, cache)
    check_mountpoint(cfg.mountpoint, cfg.nonempty)
    lanes = Lanes(source.catalog.registry if source.catalog else None, cache, cfg.lanes)
    view = CacheView(cache)
    fetcher = Fetcher(view, lanes, readahead_bytes=cfg.readahead_bytes,
                      tensor_order=cfg.readahead_order == "tensors", sealed=cfg.encrypt_cache)
    ns = Namespace(lanes, source.catalog, ttl=cfg.metadata_ttl)
    if source.pointers is not None:
        ns.root_pointers(source.pointers)
    elif source.manifest is not None:
        ns.root_version(source.model, source.version, source.manifest, root_signature(source))
    else:
        ns.root_registry()
    ops = ModelFS(ns, fetcher)
    reporter = Reporter(lanes, cache, cfg.source, cfg.mountpoint, source.version)
    ops.root_xattrs[PID_XATTR.removeprefix(XATTR_PREFIX)] = lambda: str(os.getpid()).encode()
    ops.root_xattrs["stats"] = reporter.refreshed_json
    metrics_server = reporter.serve_http(cfg.metrics_address, cfg.metrics_port) if cfg.metrics_port else None
    options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
    if cfg.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(cfg.mountpoint), options)
        # what exists now (imports, botocore's models, manifests) lives as long as the
        # mount: keep it out of the collector's full passes, each of which would
        # otherwise walk it all (~60 ms here) while every reader waits on the FUSE loop
        gc.freeze()
        try:
            trio.run(_main, cfg, lanes, fetcher, view, reporter, on_ready)
        finally:
            pyfuse3.close(unmount=True)
            view.close()
            lanes.close()  # the workers finish and commit what they hold: fetched is cached
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


async def _main(cfg: MountConfig, lanes: Lanes, fetcher: Fetcher, view: CacheView, reporter: Reporter,
                on_ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(lanes.run)
        await nursery.start(fetcher.run)
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
        await trio.to_thread.run_sync(set_kernel_readahead, cfg.mountpoint, cfg.kernel_readahead_kb)
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

"""Live figures of a running mount, for people (``modelfs stats``), systemd (STATUS=) and Prometheus.

The lanes and the reader count; this module turns its counters into one snapshot. Snapshots
are built on the trio thread (the counters' owner): an xattr read is answered
there (after reading the cache's size in a worker thread), and a Prometheus scrape (prometheus_client's own HTTP thread) asks the
trio thread for one with ``trio.from_thread``, so no counter is read from two
threads. The cache's size needs an LMDB read, so ``Reporter.run`` refreshes it
every second from a worker thread rather than on every request.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..cache import BlockCache
from ..errors import ModelfsError, UsageError
from ..units import fmt_bytes
from .xattrs import STATS as STATS_XATTR

if TYPE_CHECKING:
    from ..transfer.lanes import Lanes


@dataclass(frozen=True)
class Snapshot:
    source: str
    version: str | None  # the version a model mount serves (None: a registry mount)
    mountpoint: str
    pid: int
    uptime_seconds: float
    bytes_served: int
    bytes_fetched: int
    fetches: int
    memory_hits: int
    cache_hits: int
    paged_in: int  # cached chunks read from disk ahead of readers (readahead of a warm file)
    hit_ratio: float  # chunk loads answered from memory or the disk cache, not the store
    errors: int
    fetches_in_flight: int
    fetch_seconds_total: float
    fetch_p50_ms: float | None  # over the last (up to) 4096 GETs
    fetch_p99_ms: float | None
    cache_used_bytes: int  # the LMDB cache's used pages (shared by every mount on it)
    cache_cap_bytes: int
    worker_pids: list[int]  # the fetch worker processes now
    worker_restarts: int  # workers that died and were replaced
    peeks: int = 0  # small cold reads served from a few verified blocks (ranged GETs) before their chunk
    tier_chunks: int = 0  # fetched chunks a cache tier node answered (the rest: store_chunks)
    tier_bytes: int = 0
    tier_hits: int = 0  # ... from its cache
    store_chunks: int = 0
    tier_fallbacks: int = 0  # tier nodes that failed to answer (the next node or the store did)
    tier_bad: int = 0  # copies from the tier that failed verification (never served)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        return cls(**json.loads(data))

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by ``systemctl status``)."""
        what = f"{self.source} ({self.version})" if self.version else self.source
        return (f"serving {what}: {fmt_bytes(self.bytes_served)} served, "
                f"{fmt_bytes(self.bytes_fetched)} fetched, {self.hit_ratio:.0%} chunk hits, "
                f"cache {fmt_bytes(self.cache_used_bytes)} of {fmt_bytes(self.cache_cap_bytes)}, "
                f"{self.errors} errors")


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Reporter:
    """Owns the mount's snapshot: builds it, refreshes the cache size, tells systemd."""

    def __init__(self, lanes: Lanes, cache: BlockCache, source: str, mountpoint: Path,
                 version: str | None = None):
        self.lanes = lanes
        self.cache = cache
        self.source = source
        self.version = version
        self.mountpoint = str(mountpoint)
        self.started = time.monotonic()
        self.cache_used = 0
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.latest = self.snapshot()

    def snapshot(self) -> Snapshot:
        st = self.lanes.stats
        loads = st.memory_hits + st.cache_hits + st.fetches
        lat = sorted(st.recent_latencies)
        p50, p99 = _quantile(lat, 0.50), _quantile(lat, 0.99)
        snap = Snapshot(
            source=self.source, version=self.version, mountpoint=self.mountpoint, pid=os.getpid(),
            uptime_seconds=round(time.monotonic() - self.started, 3),
            bytes_served=st.bytes_served, bytes_fetched=st.bytes_fetched, fetches=st.fetches,
            memory_hits=st.memory_hits, cache_hits=st.cache_hits, paged_in=st.paged_in,
            hit_ratio=(st.memory_hits + st.cache_hits) / loads if loads else 0.0,
            errors=st.errors, fetches_in_flight=self.lanes.in_flight,
            fetch_seconds_total=st.fetch_seconds,
            fetch_p50_ms=None if p50 is None else round(p50 * 1000, 3),
            fetch_p99_ms=None if p99 is None else round(p99 * 1000, 3),
            cache_used_bytes=self.cache_used, cache_cap_bytes=self.cache.cap,
            worker_pids=self.lanes.worker_pids, worker_restarts=st.worker_restarts, peeks=st.peeks,
            tier_chunks=st.tier_chunks, tier_bytes=st.tier_bytes, tier_hits=st.tier_hits,
            store_chunks=st.fetches - st.tier_chunks, tier_fallbacks=st.tier_fallbacks, tier_bad=st.tier_bad)
        self.latest = snap
        return snap

    async def refreshed_json(self) -> bytes:
        """For the stats xattr: the cache size read now, then a snapshot."""
        await self._refresh_cache_size()
        return self.snapshot().to_json()

    async def _refresh_cache_size(self) -> None:
        try:
            self.cache_used = await trio.to_thread.run_sync(self.cache.used_bytes)
        except Exception:  # a failing cache disk is logged by the cache; figures go on
            pass

    async def run(self, notify: Callable[[str], None], period: float = 5.0, refresh: float = 1.0) -> None:
        """Refresh the cache size every ``refresh`` s and systemd's STATUS= every ``period`` s."""
        self._trio_token = trio.lowlevel.current_trio_token()
        last_status = -period
        while True:
            await self._refresh_cache_size()
            if trio.current_time() - last_status >= period:
                notify("STATUS=" + self.snapshot().status_line())
                last_status = trio.current_time()
            await trio.sleep(refresh)

    def _fresh_from_thread(self) -> Snapshot:
        """A snapshot built on the trio thread (the counters' owner) for a scrape thread."""
        if self._trio_token is not None:
            try:
                return trio.from_thread.run_sync(self.snapshot, trio_token=self._trio_token)
            except trio.RunFinishedError:
                pass
        return self.latest

    # -- Prometheus (called from prometheus_client's thread) ------------------------
    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        s = self._fresh_from_thread()
        info = GaugeMetricFamily("modelfs_info", "What this mount serves", labels=["source", "version", "mountpoint"])
        info.add_metric([s.source, s.version or "", s.mountpoint], 1)
        yield info
        yield CounterMetricFamily("modelfs_served_bytes", "Bytes returned to readers", value=s.bytes_served)
        yield CounterMetricFamily("modelfs_fetched_bytes", "Chunk bytes fetched from the store",
                                  value=s.bytes_fetched)
        hits = CounterMetricFamily("modelfs_chunk_loads", "Chunk loads by where they were answered",
                                   labels=["from"])
        hits.add_metric(["memory"], s.memory_hits)
        hits.add_metric(["cache"], s.cache_hits)
        hits.add_metric(["store"], s.store_chunks)
        hits.add_metric(["tier"], s.tier_chunks)
        yield hits
        yield CounterMetricFamily("modelfs_tier_hits", "Chunks a cache tier node answered from its cache",
                                  value=s.tier_hits)
        yield CounterMetricFamily("modelfs_tier_bytes", "Chunk bytes from the cache tier", value=s.tier_bytes)
        yield CounterMetricFamily("modelfs_tier_fallbacks", "Cache tier nodes that failed to answer (the next "
                                  "node or the store did)", value=s.tier_fallbacks)
        yield CounterMetricFamily("modelfs_tier_bad_chunks", "Copies from the cache tier that failed "
                                  "verification (never served)", value=s.tier_bad)
        yield CounterMetricFamily("modelfs_block_reads", "Small cold reads served from a few verified blocks "
                                  "of their chunk (ranged GETs)", value=s.peeks)
        yield CounterMetricFamily("modelfs_paged_in_chunks", "Cached chunks read from disk ahead of readers",
                                  value=s.paged_in)
        yield CounterMetricFamily("modelfs_errors", "Chunk loads that failed (readers got EIO)", value=s.errors)
        yield GaugeMetricFamily("modelfs_hit_ratio", "Share of chunk loads not sent to the store",
                                value=s.hit_ratio)
        yield GaugeMetricFamily("modelfs_fetches_in_flight", "Chunk loads under way", value=s.fetches_in_flight)
        yield GaugeMetricFamily("modelfs_cache_used_bytes", "Used bytes of the block cache",
                                value=s.cache_used_bytes)
        yield GaugeMetricFamily("modelfs_cache_capacity_bytes", "Cap of the block cache", value=s.cache_cap_bytes)
        yield GaugeMetricFamily("modelfs_fetch_workers", "Fetch worker processes running", value=len(s.worker_pids))
        yield CounterMetricFamily("modelfs_fetch_worker_restarts", "Fetch workers that died and were replaced",
                                  value=s.worker_restarts)
        lat = Metric("modelfs_fetch_latency_seconds", "Chunk GET latency (quantiles over the last 4096)",
                     "summary")
        for q, v in (("0.5", s.fetch_p50_ms), ("0.99", s.fetch_p99_ms)):
            if v is not None:
                lat.add_sample("modelfs_fetch_latency_seconds", {"quantile": q}, v / 1000)
        lat.add_sample("modelfs_fetch_latency_seconds_count", {}, s.fetches)
        lat.add_sample("modelfs_fetch_latency_seconds_sum", {}, s.fetch_seconds_total)
        yield lat
        yield GaugeMetricFamily("modelfs_uptime_seconds", "Seconds since the mount started",
                                value=s.uptime_seconds)

    def serve_http(self, address: str, port: int):
        """Start the /metrics endpoint; a port in use is a clear error before mounting."""
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        try:
            server, _thread = start_http_server(port, addr=address, registry=registry)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {address}:{port}: {e.strerror or e}") from None
        return server


def read_stats(path: Path) -> Snapshot:
    """The live snapshot of the daemon serving ``path`` (its mount root or anything under it).

    The daemon answers an xattr on the mount root; from a deeper path, walk up while
    still on the same filesystem.
    """
    p = Path(path).absolute()
    try:
        dev = os.stat(p).st_dev
        while True:
            try:
                return Snapshot.from_json(os.getxattr(p, STATS_XATTR))
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
            if p.parent == p or os.stat(p.parent).st_dev != dev:
                raise UsageError(f"{path} is not on a running modelfs mount")
            p = p.parent
    except OSError as e:
        raise ModelfsError(f"cannot read stats of {path}: {e.strerror}") from None

"""Warming a host's cache before traffic moves to a new version.

Two ways, for two situations:

* ``warm_cache`` — by ref, no mount needed: fetch every chunk of a manifest the
  block cache lacks through the mount's own fetch workers (:mod:`modelfs.transfer.lanes`),
  verified, straight into the LMDB cache a mount will use (the cache is shared by
  every mount on the host and safe to write while they run). The next mount of
  that version reads with zero GETs.
* ``read_through`` — paths on a running mount: read the files through it, so the
  daemon fetches and caches them and the kernel's page cache holds them too.
* ``warm_tier`` — by ref, for a fleet: every chunk passes through the cache tier
  (``--cache-tier``, ``docs/fleet.md``) into its nodes' caches, verified on the way, and
  nowhere else on this host, before a rollout sends every host to it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import trio

from ..cache import BlockCache
from ..config import TRANSFER_CONCURRENCY
from ..errors import ModelfsError
from ..transfer.lanes import LaneConfig, Lanes, run_with
from ..format.manifest import Manifest
from ..progress import Counters
from ..registry.layout import Registry


@dataclass
class PrefetchStats(Counters):
    files: int = 0
    bytes: int = 0  # bytes covered (already cached or fetched)
    fetched_bytes: int = 0
    fetched_chunks: int = 0
    cached_chunks: int = 0  # already in the cache
    tier_hits: int = 0  # warm_tier: chunks a node held already
    from_store: int = 0  # warm_tier: chunks no node gave (fallbacks, bad copies): taken from the store


def chunks_to_fetch(manifest: Manifest, cache: BlockCache) -> tuple[dict[str, int], int]:
    """The unique chunks of ``manifest`` the cache lacks, and the bytes it already has."""
    missing: dict[str, int] = {}
    have = 0
    for entry in manifest.files:
        for h, n in entry.chunks:
            if h in missing:
                continue
            if cache.has(h):
                have += n
            else:
                missing[h] = n
    return missing, have


def warm_cache(registry: Registry, manifest: Manifest, cache: BlockCache, *, concurrency: int = TRANSFER_CONCURRENCY,
               workers: int = 0, sealed: bool = False,
               on_progress: Callable[[int], None] = lambda n: None, tiers: tuple[str, ...] = ()) -> PrefetchStats:
    """Load the missing chunks through the same fetch workers a mount uses (GET, verify,
    write to LMDB in other processes; host-wide single flight with running mounts).
    At most ``2 × concurrency`` loads are pending at a time, whatever the model's size.
    ``sealed``: ``cache`` is a sealed cache (``--encrypt-cache``), chunks kept encrypted."""
    stats = PrefetchStats(files=len(manifest.files))
    missing, have = chunks_to_fetch(manifest, cache)
    stats.add(bytes=have, cached_chunks=sum(len(e.chunks) for e in manifest.files) - len(missing))
    on_progress(have)
    lanes = Lanes(registry, cache, LaneConfig(workers=workers, concurrency=concurrency, sealed=sealed, tiers=tiers,
                                              timeouts=registry.store.config.timeouts))

    _each_chunk(lanes, missing, lanes.load, concurrency, stats, on_progress)
    stats.add(fetched_bytes=lanes.stats.bytes_fetched, fetched_chunks=lanes.stats.fetches)
    return stats


def warm_tier(registry: Registry, manifest: Manifest, tiers: tuple[str, ...], *, concurrency: int = TRANSFER_CONCURRENCY,
              workers: int = 0, on_progress: Callable[[int], None] = lambda n: None) -> PrefetchStats:
    """Pass every chunk of ``manifest`` through the cache tier ``tiers`` so its nodes hold it:
    workers without a cache GET each through its node (a bad copy is refreshed there) and
    verify it, then drop it (written into /dev/null). Nothing is kept on this host."""
    if not tiers:
        raise ModelfsError("warming the tier needs the tier: pass --cache-tier URL")
    chunks = {h: n for e in manifest.files for h, n in e.chunks}
    stats = PrefetchStats(files=len(manifest.files))
    lanes = Lanes(registry, None, LaneConfig(workers=workers, concurrency=concurrency, tiers=tiers,
                                             timeouts=registry.store.config.timeouts))
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        _each_chunk(lanes, chunks, lambda h, n: lanes.deliver(h, n, sink, 0), concurrency, stats, on_progress)
    finally:
        os.close(sink)
    st = lanes.stats
    stats.add(fetched_bytes=st.bytes_fetched, fetched_chunks=st.fetches, tier_hits=st.tier_hits,
              from_store=st.fetches - st.tier_chunks)
    return stats


def _each_chunk(lanes: Lanes, chunks: dict[str, int], fn: Callable[[str, int], Awaitable[object]], concurrency: int,
                stats: PrefetchStats, on_progress: Callable[[int], None]) -> None:
    """``fn(h, n)`` for every chunk beside ``lanes``' workers, at most ``2 × concurrency``
    pending at a time, whatever the model's size; progress as each ends."""
    async def one(h: str, n: int, slots: trio.Semaphore) -> None:
        try:
            await fn(h, n)
        finally:
            slots.release()
        stats.add(bytes=n)
        on_progress(n)

    async def main() -> None:
        slots = trio.Semaphore(2 * concurrency)
        async with trio.open_nursery() as jobs:
            for h, n in chunks.items():
                await slots.acquire()
                jobs.start_soon(one, h, n, slots)

    run_with(lanes, main)


def files_under(paths: Iterable[Path]) -> list[tuple[Path, int]]:
    """Every regular file named or under a named directory, with its size."""
    out: list[tuple[Path, int]] = []
    for p in paths:
        if p.is_dir():
            for root, _dirs, names in os.walk(p):
                for name in sorted(names):
                    f = Path(root) / name
                    out.append((f, f.stat().st_size))
        elif p.is_file():
            out.append((p, p.stat().st_size))
        else:
            raise ModelfsError(f"{p}: no such file or directory")
    return out


def read_through(files: list[tuple[Path, int]], *, concurrency: int = 4,
                 on_progress: Callable[[int], None] = lambda n: None) -> PrefetchStats:
    """Read whole files through the mount (sequential reads: the daemon's readahead applies)."""
    stats = PrefetchStats()

    def read(path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(1 << 20)
            while n := f.readinto(buf):
                stats.add(bytes=n)
                on_progress(n)
        stats.add(files=1)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="prefetch") as pool:
        for fut in [pool.submit(read, p) for p, _ in files]:
            try:
                fut.result()
            except OSError as e:
                raise ModelfsError(f"cannot read {e.filename or 'a file'}: {e.strerror}") from None
    return stats

"""Warming a host's cache before traffic moves to a new version.

Two ways, for two situations:

* ``warm_cache`` — by ref, no mount needed: fetch every chunk of a manifest the
  block cache lacks through the mount's own fetch workers (:mod:`modelfs.transfer.lanes`),
  verified, straight into the LMDB cache a mount will use (the cache is shared by
  every mount on the host and safe to write while they run). The next mount of
  that version reads with zero GETs.
* ``read_through`` — paths on a running mount: read the files through it, so the
  daemon fetches and caches them and the kernel's page cache holds them too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import trio

from ..cache import BlockCache
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


def warm_cache(registry: Registry, manifest: Manifest, cache: BlockCache, *, concurrency: int = 16,
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

    async def one(h: str, n: int, slots: trio.Semaphore) -> None:
        try:
            await lanes.load(h, n)
        finally:
            slots.release()
        stats.add(bytes=n)
        on_progress(n)

    async def main() -> None:
        slots = trio.Semaphore(2 * concurrency)
        async with trio.open_nursery() as jobs:
            for h, n in missing.items():
                await slots.acquire()
                jobs.start_soon(one, h, n, slots)

    run_with(lanes, main)
    stats.add(fetched_bytes=lanes.stats.bytes_fetched, fetched_chunks=lanes.stats.fetches)
    return stats


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

"""Warming a host's cache before traffic moves to a new version.

Two ways, for two situations:

* ``warm_cache`` — by ref, no mount needed: fetch every chunk of a manifest the
  block cache lacks, verified, straight into the LMDB cache a mount will use
  (the cache is shared by every mount on the host and safe to write while they
  run). The next mount of that version reads with zero GETs.
* ``read_through`` — paths on a running mount: read the files through it, so the
  daemon fetches and caches them and the kernel's page cache holds them too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .cache import BlockCache
from .errors import ModelfsError
from .manifest import Manifest
from .progress import Counters
from .registry import Registry


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
               on_progress: Callable[[int], None] = lambda n: None) -> PrefetchStats:
    """Fetch the missing chunks in parallel; this thread is the cache's one writer."""
    stats = PrefetchStats(files=len(manifest.files))
    missing, have = chunks_to_fetch(manifest, cache)
    stats.add(bytes=have, cached_chunks=sum(len(e.chunks) for e in manifest.files) - len(missing))
    on_progress(have)
    cache.put_manifest(manifest.version_id, manifest.to_bytes())
    window = threading.BoundedSemaphore(2 * concurrency)  # bounded memory: ≤ 2×N chunks held

    def fetch(h: str, n: int) -> tuple[str, bytes]:
        try:
            return h, registry.get_chunk(h, n)
        finally:
            window.release()

    with ThreadPoolExecutor(concurrency, thread_name_prefix="prefetch") as pool:
        try:
            pending: list[Future] = []
            for h, n in missing.items():
                window.acquire()
                pending.append(pool.submit(fetch, h, n))
                pending = _drain(pending, cache, stats, on_progress, block=False)
            _drain(pending, cache, stats, on_progress, block=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed GET (or ^C) stops the rest
            raise
    return stats


def _drain(pending: list, cache: BlockCache, stats: PrefetchStats, on_progress: Callable[[int], None],
           block: bool) -> list:
    done = [f for f in pending if block or f.done()]
    batch = [f.result() for f in done]  # a failed GET raises here, after the pool has drained
    if batch:
        cache.write(batch)
        n = sum(len(d) for _, d in batch)
        stats.add(fetched_bytes=n, bytes=n, fetched_chunks=len(batch))
        on_progress(n)
    return [f for f in pending if f not in done]


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

"""Materializing a model version on local disk, for places that cannot use FUSE.

Chunks are fetched in parallel and verified (BLAKE3) as they arrive, written
in place into ``<file>.modelfs-partial`` and hashed in file order as they
become contiguous, and each finished file is checked against its SHA-256 (of
the bytes written, without reading the file again) before it is renamed into place — so a destination never
holds a half-written file under its real name, and a re-run skips files that
are already complete.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, UsageError
from .manifest import FileEntry, Manifest, all_directories
from .progress import Counters
from .registry import Registry
from .trust import SIGNATURE_FILE

PARTIAL = ".modelfs-partial"


@dataclass
class PullStats(Counters):
    files: int = 0
    skipped_files: int = 0
    bytes: int = 0
    fetched_bytes: int = 0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _inside(dest: Path, rel: str) -> Path:
    """``dest/rel``, refusing anything that resolves outside ``dest`` (planted symlinks)."""
    target = dest / rel
    real_dest = os.path.realpath(dest)
    if os.path.commonpath([real_dest, os.path.realpath(target.parent)]) != real_dest:
        raise UsageError(f"refusing to write {rel!r}: it resolves outside {dest}")
    return target


def pull(registry: Registry, manifest: Manifest, dest: Path, *, concurrency: int = 16,
         on_progress: Callable[[int], None] | None = None, signature: bytes | None = None) -> PullStats:
    """Write ``manifest``'s files under ``dest`` (each verified, complete ones skipped) and,
    for a signed version, its signature as ``model.sig`` (what ``model_signing verify`` reads)."""
    on_progress = on_progress or (lambda n: None)
    stats = PullStats()
    dest.mkdir(parents=True, exist_ok=True)
    for rel, mode in sorted(all_directories(manifest).items()):
        d = _inside(dest, rel)
        d.mkdir(exist_ok=True)
        os.chmod(d, mode | 0o700)  # keep it writable for us while filling it
    slots = threading.BoundedSemaphore(2 * concurrency)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="pull") as pool:
        for entry in manifest.files:
            target = _inside(dest, entry.path)
            if target.is_file() and target.stat().st_size == entry.size \
                    and file_sha256(target) == entry.sha256:
                if entry.mtime_ns is not None:
                    os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))
                stats.add(skipped_files=1, bytes=entry.size)
                on_progress(entry.size)
                continue
            _pull_file(registry, entry, target, pool, slots, stats, on_progress)
    if signature is not None and manifest.file(SIGNATURE_FILE) is None:
        partial = dest / (SIGNATURE_FILE + PARTIAL)
        partial.write_bytes(signature)
        os.chmod(partial, 0o644)
        os.replace(partial, dest / SIGNATURE_FILE)
    for rel, mode in sorted(all_directories(manifest).items(), reverse=True):
        os.chmod(dest / rel, mode)
    return stats


class _InOrderHash:
    """The SHA-256 of a file whose chunks arrive in any order: a chunk is hashed once every
    chunk before it was, from the bytes just written (no second read of the file). A
    chunk's slot is given back when it is hashed, so at most the slots' worth of chunks
    wait in memory for a slow one before them."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self.sha = hashlib.sha256()
        self.slots = slots
        self.next = 0
        self.waiting: dict[int, bytes] = {}
        self.lock = threading.Lock()

    def add(self, i: int, data: bytes) -> None:
        with self.lock:
            self.waiting[i] = data
            while self.next in self.waiting:
                self.sha.update(self.waiting.pop(self.next))
                self.next += 1
                self.slots.release()


def _pull_file(registry: Registry, entry: FileEntry, target: Path, pool: ThreadPoolExecutor,
               slots: threading.BoundedSemaphore, stats: PullStats,
               on_progress: Callable[[int], None]) -> None:
    partial = target.with_name(target.name + PARTIAL)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    digest = _InOrderHash(slots)
    held = [0]  # slots taken for this file and not yet given back by the hash

    def fetch(i: int) -> None:
        h, n = entry.chunks[i]
        data = registry.get_chunk(h, n)
        os.pwrite(fd, data, entry.offsets[i])
        digest.add(i, data)
        stats.add(fetched_bytes=n)
        on_progress(n)

    futures: list[Future] = []
    try:
        os.ftruncate(fd, entry.size)
        for i in range(len(entry.chunks)):
            slots.acquire()
            held[0] += 1
            futures.append(pool.submit(fetch, i))
        for f in futures:
            f.result()
        os.fsync(fd)
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)  # no worker may write into a closed descriptor
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        with digest.lock:  # the slots of chunks that were never hashed (a failure)
            for _ in range(held[0] - digest.next):
                slots.release()
    if digest.sha.hexdigest() != entry.sha256:
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"{entry.path}: SHA-256 of the assembled file does not match the manifest")
    os.chmod(partial, entry.mode)
    if entry.mtime_ns is not None:
        os.utime(partial, ns=(entry.mtime_ns, entry.mtime_ns))
    os.replace(partial, target)
    stats.add(files=1, bytes=entry.size)

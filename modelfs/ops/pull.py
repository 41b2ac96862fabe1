"""Materializing a model version on local disk, for places that cannot use FUSE.

Chunks go through the same fetch worker processes a mount uses (:mod:`modelfs.transfer.lanes`):
each GETs, decodes and BLAKE3-verifies a chunk and writes it in place into
``<file>.modelfs-partial`` (the descriptor travels with the request), so the
per-byte work runs on as many cores as there are workers, not under this
process's GIL. Each file is written as ``<file>.modelfs-partial``, fsynced and only
then renamed into place — so a destination never holds a half-written file under its
real name, and a re-run skips files that are already complete (size and SHA-256).

Every chunk is checked against its id (BLAKE3) before a byte of it is written, and
the ids are the version's (its id is the manifest's hash), so a written file is the
published one. With ``verify_files``, this process also reads each chunk back from
the page cache as soon as every chunk before it landed and checks the file's SHA-256
before the rename: a second check of the assembly, at ~0.8 CPU-s/GB (SHA-256 and the
read-back), about what ``s5cmd cp`` spends on the whole copy; so it is asked for
(``pull --verify``), not the default. Given the host's block cache (what mounts and ``prefetch`` fill),
a worker copies each chunk it holds from there (its block sums checked) instead of
fetching it; nothing is added to the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..cache import BlockCache
from ..errors import IntegrityError, ModelfsError, UsageError
from ..transfer.lanes import Lanes, run_with
from ..transfer.spawn import LaneConfig, Spawned
from ..format.manifest import FileEntry, Manifest, all_directories
from ..progress import Counters
from ..registry.layout import Registry
from ..format.trust import SIGNATURE_FILE

PARTIAL = ".modelfs-partial"
T = TypeVar("T")


@dataclass
class PullStats(Counters):
    files: int = 0
    skipped_files: int = 0
    bytes: int = 0
    fetched_bytes: int = 0  # from the store
    cached_bytes: int = 0  # copied from the host's cache


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


FILES_AT_ONCE = 64  # partial files open at a time (many small files are pulled side by side)
HASH_BLOCK = 8 << 20
WRITE_BEHIND_MIN = 64 << 20  # files from this size on are written back while they are filled
WRITE_BEHIND_PERIOD = 0.25  # seconds between the write-behind's fdatasync calls


def pull(registry: Registry, manifest: Manifest, dest: Path, *, lanes_config: LaneConfig = LaneConfig(),
         on_progress: Callable[[int], None] | None = None, signature: bytes | None = None,
         cache: BlockCache | None = None, verify_files: bool = False,
         spawned: list[Spawned] | None = None) -> PullStats:
    """Write ``manifest``'s files under ``dest`` (each chunk verified, complete files skipped;
    ``verify_files``: each file's SHA-256 checked too) and, for a signed version, its
    signature as ``model.sig`` (what ``model_signing verify`` reads).
    Chunks ``cache`` holds are copied from it, not fetched; others come through the
    lanes' cache tier, if any, before the store.
    At most ``2 × concurrency`` chunks are being delivered at a time; this process holds
    none of their bytes. ``spawned``: workers :func:`~modelfs.transfer.spawn.prestart`
    started for these lanes, while the command resolved its ref."""
    on_progress = on_progress or (lambda n: None)
    stats = PullStats()
    dest.mkdir(parents=True, exist_ok=True)
    for rel, mode in sorted(all_directories(manifest).items()):
        d = _inside(dest, rel)
        d.mkdir(exist_ok=True)
        os.chmod(d, mode | 0o700)  # keep it writable for us while filling it
    todo: list[tuple[FileEntry, Path]] = []
    for entry in manifest.files:
        target = _inside(dest, entry.path)
        if target.is_file() and target.stat().st_size == entry.size and file_sha256(target) == entry.sha256:
            if entry.mtime_ns is not None:
                os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))
            stats.add(skipped_files=1, bytes=entry.size)
            on_progress(entry.size)
        else:
            todo.append((entry, target))
    if todo:
        lanes = Lanes(registry, cache, lanes_config, spawned=spawned)
        concurrency = lanes_config.concurrency

        async def main() -> None:
            chunk_slots, file_slots = trio.Semaphore(2 * concurrency), trio.Semaphore(FILES_AT_ONCE)
            async with trio.open_nursery() as files:
                for entry, target in todo:
                    await file_slots.acquire()
                    files.start_soon(_pull_file, lanes, entry, target, chunk_slots, file_slots, stats, on_progress,
                                     verify_files)

        run_with(lanes, main)
    if signature is not None and manifest.file(SIGNATURE_FILE) is None:
        partial = dest / (SIGNATURE_FILE + PARTIAL)
        partial.write_bytes(signature)
        os.chmod(partial, 0o644)
        os.replace(partial, dest / SIGNATURE_FILE)
    for rel, mode in sorted(all_directories(manifest).items(), reverse=True):
        os.chmod(dest / rel, mode)
    return stats


class _InOrderHash:
    """The SHA-256 of a file whose chunks land in any order: once every chunk before
    it has landed, a chunk is read back from the file (the page cache: it was just
    written) and hashed, on a thread (hashlib releases the GIL). No chunk bytes wait
    in memory for a slow one before them."""

    def __init__(self, fd: int, entry: FileEntry):
        self.fd, self.entry = fd, entry
        self.sha = hashlib.sha256()
        self.next = 0  # chunks [0, next) are hashed
        self._landed: set[int] = set()
        self._lock = trio.Lock()

    async def landed(self, i: int) -> None:
        self._landed.add(i)
        if self._lock.locked():
            return  # its holder sees this one when its current range is hashed
        async with self._lock:
            while self.next in self._landed:
                j = self.next
                while j in self._landed:
                    self._landed.discard(j)
                    j += 1
                e = self.entry
                lo, hi = e.offsets[self.next], e.offsets[j - 1] + e.chunks[j - 1][1]
                await trio.to_thread.run_sync(self._hash, lo, hi)
                self.next = j

    def _hash(self, lo: int, hi: int) -> None:
        while lo < hi:
            block = _local(f"cannot read back {self.entry.path}", os.pread, self.fd, min(HASH_BLOCK, hi - lo), lo)
            if not block:
                raise IntegrityError(f"{self.entry.path}: the partial file ended at {lo} of {hi} bytes")
            self.sha.update(block)
            lo += len(block)


def _local(what: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a call on the destination's files: its OSError (a full disk, EIO)
    becomes the one-line error it is, wherever in the pull's tasks it happens."""
    try:
        return fn(*args)
    except OSError as e:
        raise ModelfsError(f"{what}: {e.strerror}") from None


async def _write_behind(fd: int, filled: trio.Event) -> None:
    """Write a large file back to disk while it is being filled, so the fsync before
    its rename finds little left (measured: the fsync of a 1 GiB file took 1.7–1.9 s
    of a 6.6 s pull when all of it waited for the end)."""
    while not filled.is_set():
        await trio.to_thread.run_sync(_local, "cannot write the file back", os.fdatasync, fd)
        with trio.move_on_after(WRITE_BEHIND_PERIOD):
            await filled.wait()


async def _pull_file(lanes: Lanes, entry: FileEntry, target: Path, chunk_slots: trio.Semaphore,
                     file_slots: trio.Semaphore, stats: PullStats, on_progress: Callable[[int], None],
                     verify_files: bool) -> None:
    partial = target.with_name(target.name + PARTIAL)
    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        digest = _InOrderHash(fd, entry) if verify_files else None

        async def one(i: int) -> None:
            h, n = entry.chunks[i]
            try:
                fetched = await lanes.deliver(h, n, fd, entry.offsets[i])
            finally:
                chunk_slots.release()
            stats.add(**{"fetched_bytes" if fetched else "cached_bytes": n})
            on_progress(n)
            if digest is not None:
                await digest.landed(i)

        try:
            os.ftruncate(fd, entry.size)
            async with trio.open_nursery() as flushing:
                filled = trio.Event()
                if entry.size >= WRITE_BEHIND_MIN:
                    flushing.start_soon(_write_behind, fd, filled)
                async with trio.open_nursery() as chunks:
                    for i in range(len(entry.chunks)):
                        await chunk_slots.acquire()
                        chunks.start_soon(one, i)
                filled.set()
            await trio.to_thread.run_sync(os.fsync, fd)
        except BaseException:
            partial.unlink(missing_ok=True)  # a worker still writing writes into the unlinked file
            raise
        finally:
            os.close(fd)
        if digest is not None and (digest.next != len(entry.chunks) or digest.sha.hexdigest() != entry.sha256):
            partial.unlink(missing_ok=True)
            raise IntegrityError(f"{entry.path}: SHA-256 of the assembled file does not match the manifest")
        os.chmod(partial, entry.mode)
        if entry.mtime_ns is not None:
            os.utime(partial, ns=(entry.mtime_ns, entry.mtime_ns))
        os.replace(partial, target)
        stats.add(files=1, bytes=entry.size)
    except OSError as e:  # the destination's trouble (permissions, a full disk), said as such
        raise ModelfsError(f"cannot write {partial}: {e.strerror}") from None
    finally:
        file_slots.release()

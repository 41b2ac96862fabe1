"""Publishing a model directory: chunk, hash, upload what is missing, then manifest, then tags.

The per-byte work runs on the fetch workers' cores, not under this process's GIL
(:meth:`modelfs.transfer.lanes.Lanes.upload`): this process cuts each file (FastCDC over a
memory map, which holds the GIL) and hashes it whole (SHA-256, on a thread); a
worker reads each chunk from the file (its descriptor travels with the request),
names it (BLAKE3 of the bytes it read), asks this process whether to send it,
then HEADs, encodes and PUTs it with presigned URLs. Memory stays bounded
whatever the file size: at most ``2 × concurrency`` chunks are in flight, and
this process holds none of their bytes.

Chunks the store already holds (known from the model's previous version, or found
by a HEAD) are not uploaded again, so a re-run after an interrupt, or a fine-tune
that changed a few tensors, ships only new bytes. The manifest is written only
after every chunk exists, and tags move last.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..format.chunking import DEFAULT_PARAMS, ChunkParams, cut
from ..describe.headers import describe
from ..config import TRANSFER_CONCURRENCY
from ..errors import ManifestError, UsageError
from ..transfer.lanes import URL_SECONDS, LaneConfig, Lanes, run_with
from ..transfer.protocol import Go
from ..registry.lifecycle import Lease
from ..format.manifest import DirEntry, FileEntry, Manifest, check_path, utc_stamp
from ..progress import Counters
from ..format.refs import check_name, check_tag
from ..registry.layout import Registry
from ..format.trust import SIGNATURE_FILE, SigningKey

log = logging.getLogger(__name__)

FILES_AT_ONCE = 4  # files cut side by side (cutting holds this process's GIL; the rest does not)
CUT_BATCH = 16  # chunk boundaries found per thread call (~64 MiB of file)
HASH_BLOCK = 64 << 20  # the file's SHA-256 is fed this much per thread call


@dataclass
class PublishStats(Counters):
    files: int = 0
    bytes: int = 0
    chunks: int = 0
    uploaded_chunks: int = 0
    uploaded_bytes: int = 0  # stored (possibly compressed) bytes actually PUT
    reused_chunks: int = 0
    reused_bytes: int = 0  # raw bytes not uploaded because the store had them
    seconds: float = 0.0


@dataclass
class PublishResult:
    manifest: Manifest
    version: str
    stats: PublishStats
    tags: list[str]


@dataclass
class SourceFile:
    path: str  # relative POSIX path in the manifest
    full: Path
    size: int
    mode: int
    mtime_ns: int  # recorded so a mount and a pull show the source's times (rsync, make)
    outside: str | None = None  # a symlink that resolves outside the source directory: where to


def scan(root: Path) -> tuple[list[SourceFile], list[DirEntry]]:
    """Files and directories under ``root``, sorted; symlinked files are followed (a Hugging
    Face snapshot's files are links into ``../../blobs``), and those that resolve outside
    ``root`` say where (``SourceFile.outside``), for the summary and ``--refuse-outside-links``."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    real_root = root.resolve()
    files: list[SourceFile] = []
    dirs: list[DirEntry] = []
    for top, dirnames, filenames in os.walk(root, followlinks=False):
        rel_top = os.path.relpath(top, root)
        for name in sorted(dirnames):
            full = Path(top, name)
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if full.is_symlink():
                log.warning("skipping directory symlink %s", rel)
                dirnames.remove(name)
                continue
            dirs.append(DirEntry(_rel(rel), stat.S_IMODE(full.stat().st_mode) & 0o777))
        for name in filenames:
            full = Path(top, name)
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            try:
                st = full.stat()  # follows symlinks (e.g. a Hugging Face snapshot's blobs)
            except FileNotFoundError:
                log.warning("skipping dangling symlink %s", rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                log.warning("skipping %s: not a regular file", rel)
                continue
            target = full.resolve() if full.is_symlink() else None
            outside = str(target) if target is not None and not target.is_relative_to(real_root) else None
            files.append(SourceFile(_rel(rel), full, st.st_size, stat.S_IMODE(st.st_mode) & 0o777,
                                     st.st_mtime_ns, outside))
    files.sort(key=lambda s: s.path)
    dirs.sort(key=lambda d: d.path)
    return files, dirs


def _rel(rel: str) -> str:
    try:
        rel.encode("utf-8")
        return check_path(rel)
    except UnicodeEncodeError:
        raise UsageError(f"file name {rel!r} is not valid UTF-8") from None
    except ManifestError as e:
        raise UsageError(str(e)) from None


class Publisher:
    """One publish run: the state its chunk uploads share lives here, nowhere else.

    Invariants: a chunk is named by the bytes a worker read and sent (an object in
    the store always matches its id); each chunk id is claimed once per run;
    the manifest is written only after every chunk is in the store, the tags after it."""

    def __init__(self, registry: Registry, *, params: ChunkParams = DEFAULT_PARAMS,
                 concurrency: int = TRANSFER_CONCURRENCY, workers: int = 0, dry_run: bool = False, compress: bool = True,
                 on_progress: Callable[[int, PublishStats], None] | None = None,
                 signer: SigningKey | None = None):
        self.registry = registry
        self.signer = signer  # signs the version and the tag records
        self.params = params
        self.concurrency = concurrency
        self.workers = workers
        self.dry_run = dry_run
        self.compress = compress
        self.on_progress = on_progress or (lambda n, s: None)
        self.stats = PublishStats()
        self._known: set[str] = set()  # chunks known to be in the store
        self._seen: set[str] = set()  # chunks claimed by this run

    def run(self, tree: tuple[list[SourceFile], list[DirEntry]], name: str, tags: list[str]) -> PublishResult:
        """Publish ``tree`` (from :func:`scan`, which the caller also sizes its progress by)."""
        check_name(name)
        for t in tags:
            check_tag(t)
        if self.signer is not None and any(f.path == SIGNATURE_FILE for f in tree[0]):
            raise UsageError(f"{SIGNATURE_FILE} at the model's root is where its signature goes: "
                             "rename that file, or publish without --sign-key")
        t0 = time.monotonic()
        self.registry.store.check_bucket()
        if self.dry_run:
            return self._run(tree, name, tags, t0)
        with Lease(self.registry, f"publish {name}"):  # gc deletes nothing while it is held
            return self._run(tree, name, tags, t0)

    def _run(self, tree: tuple[list[SourceFile], list[DirEntry]], name: str, tags: list[str],
             t0: float) -> PublishResult:
        files, dirs = tree
        previous = self.registry.latest_manifest(name)
        if previous is not None:
            self._known = {h for f in previous.files for h, _ in f.chunks}
        entries = self.files(files)
        manifest = Manifest(name=name, created=utc_stamp(),
                            files=tuple(entries), directories=tuple(dirs),
                            chunking=self.params.as_json(), chunk_hash=self.registry.codec.hash_algorithm,
                            origin=str(self.registry.ref))
        self.stats.seconds = time.monotonic() - t0
        if self.dry_run:
            return PublishResult(manifest, manifest.version_id, self.stats, [])
        version = self.registry.put_manifest(manifest)
        if self.signer is not None:  # before the tags: a trusting host never sees it unsigned
            self.registry.put_signature(name, version, self.signer.sign_version(manifest))
        for t in tags:  # the tag moves last: readers never see a half-published version
            self.registry.set_tag(name, t, version, self.signer)
        self.stats.seconds = time.monotonic() - t0
        return PublishResult(manifest, version, self.stats, tags)

    def files(self, files: list[SourceFile]) -> list[FileEntry]:
        """Every file's entry, its chunks in the store; several files side by side."""
        entries: list[FileEntry | None] = [None] * len(files)
        if not files:
            return []
        lanes = Lanes(self.registry, None, LaneConfig(workers=self.workers, concurrency=self.concurrency,
                                                          timeouts=self.registry.store.config.timeouts))

        async def main() -> None:
            chunk_slots, file_slots = trio.Semaphore(2 * self.concurrency), trio.Semaphore(FILES_AT_ONCE)

            async def one(i: int) -> None:
                try:
                    entries[i] = await self._file(lanes, files[i], chunk_slots)
                finally:
                    file_slots.release()

            async with trio.open_nursery() as nursery:
                for i in range(len(files)):
                    await file_slots.acquire()
                    nursery.start_soon(one, i)

        run_with(lanes, main)
        assert all(e is not None for e in entries)
        return entries  # type: ignore[return-value]

    async def _file(self, lanes: Lanes, s: SourceFile, chunk_slots: trio.Semaphore) -> FileEntry:
        try:
            fd = os.open(s.full, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot read {s.path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            sha = hashlib.sha256()
            chunks: list[tuple[str, int]] = []
            if size:
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                try:
                    with memoryview(mm) as view:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_sha256, sha, view)
                            it = cut(view, self.params)
                            try:
                                while batch := await trio.to_thread.run_sync(_take, it, CUT_BATCH):
                                    for off, n in batch:
                                        await chunk_slots.acquire()
                                        chunks.append(("", n))
                                        nursery.start_soon(self._chunk, lanes, fd, s, chunks, len(chunks) - 1,
                                                           off, chunk_slots)
                            finally:
                                it.close()  # drops FastCDC's hold on the view before it is released
                finally:
                    mm.close()
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if (st.st_size, st.st_mtime_ns) != (s.size, s.mtime_ns):
            raise UsageError(f"{s.path} changed while being published: publish it again")
        self.stats.add(files=1, bytes=size, chunks=len(chunks))
        info = await trio.to_thread.run_sync(describe, str(s.full), size)
        return FileEntry(s.path, size, s.mode, sha.hexdigest(), tuple(chunks), info, s.mtime_ns)

    async def _chunk(self, lanes: Lanes, fd: int, s: SourceFile, chunks: list[tuple[str, int]], i: int,
                     off: int, slots: trio.Semaphore) -> None:
        n = chunks[i][1]
        try:
            h, uploaded, stored = await lanes.upload(fd, off, n, f"{s.path} at byte {off}", self._decide)
        finally:
            slots.release()
        chunks[i] = (h, n)
        if uploaded:
            self.stats.add(uploaded_chunks=1, uploaded_bytes=stored)
        else:
            self.stats.add(reused_chunks=1, reused_bytes=n)
        self.on_progress(n, self.stats)

    def _decide(self, h: str) -> Go:
        """What a worker does with chunk ``h`` it read: nothing (this run sent it, or the
        previous version has it), or HEAD it and PUT it if the store lacks it."""
        if h in self._seen or h in self._known:
            return Go(0, skip=True)
        self._seen.add(h)
        store, key = self.registry.store, self.registry.chunk_key(h)
        return Go(0, head=store.presign(key, URL_SECONDS, "HEAD"), compress=self.compress,
                  put=None if self.dry_run else store.presign(key, URL_SECONDS, "PUT"))


def _take(it: Iterator[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    return list(itertools.islice(it, n))


async def _sha256(sha: Any, view: memoryview) -> None:
    """Feed all of ``view`` to ``sha`` in order, on threads (hashlib releases the GIL)."""
    for lo in range(0, len(view), HASH_BLOCK):
        await trio.to_thread.run_sync(_update, sha, view, lo, lo + HASH_BLOCK)


def _update(sha: Any, view: memoryview, lo: int, hi: int) -> None:
    with view[lo:hi] as piece:  # released at once: the map is closed right after
        sha.update(piece)

"""Publishing a model directory: chunk, hash, upload what is missing, then manifest, then tags.

Memory stays bounded whatever the file size: files are memory-mapped, cut by
FastCDC and hashed in place, and at most ``2 × concurrency`` chunks are in
flight. Chunks the store already holds (known from the model's previous
version, or found by a HEAD) are not uploaded again, so a re-run after an
interrupt, or a fine-tune that changed a few tensors, ships only new bytes.
The manifest is written only after every chunk exists, and tags move last.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .chunking import DEFAULT_PARAMS, ChunkParams, cut
from .describe import describe
from .errors import ManifestError, UsageError
from .lifecycle import Lease
from .manifest import DirEntry, FileEntry, Manifest, check_path
from .progress import Counters
from .refs import check_name, check_tag
from .registry import Registry
from .trust import SIGNATURE_FILE, SigningKey

log = logging.getLogger(__name__)


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


def scan(root: Path) -> tuple[list[SourceFile], list[DirEntry]]:
    """Files and directories under ``root``, sorted; symlinked files are followed."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
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
            files.append(SourceFile(_rel(rel), full, st.st_size, stat.S_IMODE(st.st_mode) & 0o777,
                                     st.st_mtime_ns))
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
    """One publish run: shared state of the worker threads lives here, nowhere else."""

    def __init__(self, registry: Registry, *, params: ChunkParams = DEFAULT_PARAMS,
                 concurrency: int = 16, dry_run: bool = False, compress: bool = True,
                 on_progress: Callable[[int, PublishStats], None] | None = None,
                 signer: SigningKey | None = None):
        self.registry = registry
        self.signer = signer  # signs the version and the tag records
        self.params = params
        self.concurrency = concurrency
        self.dry_run = dry_run
        self.compress = compress
        self.on_progress = on_progress or (lambda n, s: None)
        self.stats = PublishStats()
        self._known: set[str] = set()  # chunks known to be in the store
        self._seen: set[str] = set()  # chunks claimed by this run
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(2 * concurrency)
        self._failed = threading.Event()

    def _done(self, fut: Future) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None:
            self._failed.set()

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
        entries = []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish") as pool:
            for s in files:
                entries.append(self._file(pool, s))
        manifest = Manifest(name=name, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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

    def _file(self, pool: ThreadPoolExecutor, s: SourceFile) -> FileEntry:
        sha = hashlib.sha256()
        futures: list[Future] = []
        with open(s.full, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size:
                mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
                try:
                    with memoryview(mm) as view:
                        for off, n in cut(view, self.params):
                            self._slots.acquire()
                            fut = pool.submit(self._chunk, view, off, n)
                            fut.add_done_callback(self._done)
                            futures.append(fut)
                            with view[off:off + n] as piece:
                                sha.update(piece)
                            if self._failed.is_set():
                                break  # the result() below raises the worker's error
                        chunks = tuple(f.result() for f in futures)
                finally:
                    for f in futures:
                        f.cancel()
                    for f in futures:
                        if not f.cancelled():
                            f.exception()  # wait: no worker may still hold the mapping
                    mm.close()
            else:
                chunks = ()
        if size != s.size:
            raise UsageError(f"{s.path} changed size while being published")
        self.stats.add(files=1, bytes=size, chunks=len(chunks))
        return FileEntry(s.path, size, s.mode, sha.hexdigest(), chunks,
                         describe(str(s.full), size), s.mtime_ns)

    def _chunk(self, view: memoryview, off: int, n: int) -> tuple[str, int]:
        # ``with``: the slice is released even when an error's traceback keeps this
        # frame alive; otherwise the mapping could not be closed.
        with view[off:off + n] as data:
            h = self.registry.codec.hash(data)
            with self._lock:
                first = h not in self._seen
                self._seen.add(h)
            if not first or h in self._known or self.registry.has_chunk(h):
                self.stats.add(reused_chunks=1, reused_bytes=n)
            else:
                blob = self.registry.codec.encode(data, h, self.compress)
                if not self.dry_run:
                    self.registry.put_chunk(h, blob)
                self.stats.add(uploaded_chunks=1, uploaded_bytes=len(blob))
        self.on_progress(n, self.stats)
        return h, n

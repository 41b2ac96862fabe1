"""``modelfs adopt``: a version whose files stay where DVC or Git LFS put them.

A checkout's ``.dvc`` files, ``dvc.lock`` and Git LFS pointers name objects in another
store (a DVC remote, an LFS server's bucket). Adoption reads each object once, as one
stream, and on the way checks its md5 (DVC) or SHA-256 (LFS) and cuts and names it exactly
as ``publish`` does (FastCDC, BLAKE3 block ids: :class:`StreamCutter`), without sending a
chunk: the version's manifest says, per file, which foreign object holds its
bytes (``files[].source``; chunk *i* of a file is the object's bytes at the chunk's
offset), so a mount reads them as ranged GETs of that object, each chunk verified.
Uploaded: the manifest and, per object read, a small entry of the adoption table
(``PREFIX/adopted/<md5|sha256>/<hex>.json``, the object's chunk list and description),
so adopting again after a new ``dvc push`` reads only objects it has not seen.

A file whose every chunk the registry already holds is a native file of the version
(read from ``chunks/`` as any other). Foreign objects are never written, moved or
deleted here, nor by ``gc`` and ``rm`` (they only ever touch the registry's prefix).

Invariants: nothing is written to the registry until every object was read and checked
(table entries of objects already read excepted: they are content-addressed and only
save a re-read); the manifest goes before the tags, as in publish.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import TRANSFER_CONCURRENCY
from ..errors import AccessDeniedError, IntegrityError, UsageError
from ..describe.headers import describe
from ..format.chunking import DEFAULT_PARAMS, ChunkParams, chunk_hash, cut
from ..format.codec import check_raw, encode
from ..format.foreign import dvc_outputs
from ..format.manifest import FileEntry, ForeignStore, Manifest, loads, utc_stamp
from ..format.refs import check_name, check_tag
from ..progress import Counters
from ..registry.adoption import LOOKUPS_AT_ONCE, Wanted, adopted_file, remember, table_entries
from ..registry.layout import Registry
from ..registry.lifecycle import Lease
from .publish import Publisher, SourceFile, scan

log = logging.getLogger(__name__)

OBJECTS_AT_ONCE = 4  # objects streamed (and cut as they arrive) side by side
STREAM_PIECE = 1 << 20  # what the stream hands over at a time
PART = 8 << 20  # an object larger than two is read as ranged GETs of this size, in order …
STREAMS = 8  # … so that about this many are in flight over all objects read side by side
CUT_WINDOW = 32 << 20  # bytes gathered before cutting (at least two largest chunks)


@dataclass
class AdoptStats(Counters):
    files: int = 0
    bytes: int = 0
    read_objects: int = 0  # objects read from their store this run
    read_bytes: int = 0
    known_objects: int = 0  # found in the adoption table: not read again
    native_files: int = 0  # every chunk already in the registry
    uploaded_bytes: int = 0  # the manifest and the table entries
    seconds: float = 0.0


@dataclass
class AdoptResult:
    manifest: Manifest
    version: str
    stats: AdoptStats
    tags: list[str]


GIT_AND_DVC_FILES = {".gitattributes", ".gitignore", ".gitmodules", ".dvcignore", "dvc.lock", "dvc.yaml"}


def plain_files(checkout: Path, wanted: list[Wanted], subdir: str | None = None) -> list[SourceFile]:
    """The checkout's files that are neither adopted nor Git's or DVC's own (configs,
    tokenizers, READMEs that Git keeps itself), paths relative to ``subdir``."""
    sub = subdir.strip("/") if subdir else ""
    root = checkout / sub if sub else checkout
    if not root.is_dir():
        return []
    taken = {w.path for w in wanted}
    dvc_dirs = [o.path for o in (dvc_outputs(checkout) if (checkout / ".dvc").is_dir() else []) if o.is_dir]
    if sub:
        dvc_dirs = [d[len(sub) + 1:] for d in dvc_dirs if d.startswith(sub + "/")]
    out = []
    for f in scan(root)[0]:
        top = f.path.split("/", 1)[0]
        if top in (".git", ".dvc") or f.path in taken or f.path.rsplit("/", 1)[-1] in GIT_AND_DVC_FILES \
                or f.path.endswith(".dvc") or any(f.path.startswith(d + "/") for d in dvc_dirs):
            continue
        out.append(f)
    return out



class StreamCutter:
    """Chunks of a byte stream, fed piece by piece, exactly as :func:`cut` makes them of the
    whole: FastCDC decides a chunk's end from its own bytes alone (at most ``max_size``), so
    every chunk found in a window except its last is final; the last waits for more bytes.
    Each chunk is named (BLAKE3 of its blocks' digests, which releases the GIL) as found."""

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS, window: int = CUT_WINDOW):
        self.params, self.window = params, max(window, 2 * params.max_size)
        self.buf = bytearray()
        self.chunks: list[tuple[str, int]] = []

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data
        if len(self.buf) >= self.window:
            self._cut(final=False)

    def close(self) -> list[tuple[str, int]]:
        self._cut(final=True)
        return self.chunks

    def _cut(self, final: bool) -> None:
        with memoryview(self.buf) as mv:
            found = list(cut(mv, self.params))
            if not final:
                found = found[:-1]
            for off, n in found:
                self.chunks.append((chunk_hash(mv[off:off + n]), n))
        if found:
            del self.buf[:found[-1][0] + found[-1][1]]


class Adopter:
    """One adoption run into ``registry`` (never an encrypted one: a foreign object is
    plaintext in its own store, and a mount reads it there)."""

    def __init__(self, registry: Registry, *, concurrency: int = TRANSFER_CONCURRENCY, work_dir: Path | None = None,
                 on_progress: Callable[[int, AdoptStats], None] | None = None):
        if registry.key is not None:
            raise UsageError(f"{registry.ref} is an encrypted registry: adopted files stay in their own store, "
                             "unencrypted, and cannot be part of it (publish them instead)")
        self.registry = registry
        self.concurrency = concurrency
        self.work_dir = work_dir
        self.on_progress = on_progress or (lambda n, s: None)
        self.stats = AdoptStats()

    def run(self, wanted: list[Wanted], name: str, tags: list[str], plain: list[SourceFile] | None = None
            ) -> AdoptResult:
        """Adopt ``wanted``; ``plain``: the checkout's other files, published (uploaded) as
        native files of the same version (``--with-files``)."""
        check_name(name)
        for t in tags:
            check_tag(t)
        t0 = time.monotonic()
        self.registry.store.check_bucket()
        if not plain:
            return self._run(wanted, name, tags, [], t0)
        with Lease(self.registry, f"adopt {name}"):  # its uploads are safe from gc until the manifest is in
            pub = Publisher(self.registry, concurrency=self.concurrency)
            entries = pub.files(plain)
            self.stats.add(uploaded_bytes=pub.stats.uploaded_bytes, native_files=len(entries))
            return self._run(wanted, name, tags, entries, t0)

    def _run(self, wanted: list[Wanted], name: str, tags: list[str], plain: list[FileEntry], t0: float
             ) -> AdoptResult:
        known = self._known({w.table_id: w for w in wanted})
        todo = list({w.table_id: w for w in wanted if w.table_id not in known}.values())
        self.stats.known_objects = len(known)
        for w in wanted:
            if w.table_id in known:
                self.on_progress(known[w.table_id].size, self.stats)
        with _NativeChunks(self.registry) as held:
            for e in known.values():
                held.ask(e)
            known.update(self._read(todo, held))
            native = held.result()
        sources: list[ForeignStore] = []
        files = []
        for w in wanted:
            e = known[w.table_id]
            if w.size is not None and w.size != e.size:
                raise IntegrityError(f"{w.what}: the checkout says {w.size} bytes, the object has {e.size}")
            if w.sha256 is not None and w.sha256 != e.sha256:
                raise IntegrityError(f"{w.what}: its bytes' SHA-256 is {e.sha256}, not the pointer's oid")
            in_registry = all(h in native for h, _ in e.chunks)
            if in_registry:
                self.stats.native_files += 1
            files.append(adopted_file(w, e, None if in_registry else sources))
            self.stats.add(files=1, bytes=e.size)
        files = sorted(files + plain, key=lambda f: f.path)
        self.stats.add(files=len(plain), bytes=sum(f.size for f in plain))
        m = Manifest(name=name, created=utc_stamp(), files=tuple(files),
                     directories=(), chunking=DEFAULT_PARAMS.as_json(), origin=str(self.registry.ref),
                     sources=tuple(sources))
        data = m.to_bytes()
        loads(data)  # what readers will check, checked before anything is written
        version = self.registry.put_manifest(m)
        self.stats.uploaded_bytes += len(data)
        for t in tags:
            self.registry.set_tag(name, t, version)
        self.stats.seconds = time.monotonic() - t0
        return AdoptResult(m, version, self.stats, tags)

    def _known(self, by_id: dict[str, Wanted]) -> dict[str, FileEntry]:
        return {k: entry.files[0] for k, entry in table_entries(self.registry, list(by_id)).items()}

    def _remember(self, w: Wanted, e: FileEntry) -> None:
        self.stats.add(uploaded_bytes=remember(self.registry, w, e))

    # -- reading objects --------------------------------------------------------------------
    def _read(self, todo: list[Wanted], held: _NativeChunks) -> dict[str, FileEntry]:
        """Each object read once, ``OBJECTS_AT_ONCE`` side by side, and its table entry
        written as soon as it is named (an interrupted adoption resumes from there); the
        registry asked for its chunks then too (``held``), while the others stream."""
        out: dict[str, FileEntry] = {}
        # each object's share of STREAMS ranged GETs (a single large object gets them all)
        ahead = max(2, STREAMS // max(1, min(OBJECTS_AT_ONCE, len(todo))))
        with tempfile.TemporaryDirectory(prefix="modelfs-adopt-", dir=self.work_dir) as tmp:
            def one(iw: tuple[int, Wanted]) -> None:
                i, w = iw
                spool = Path(tmp) / str(i) / w.path.rsplit("/", 1)[-1]  # its name: describe goes by it
                spool.parent.mkdir()
                try:
                    e = self._adopt_object(w, spool, ahead)
                finally:
                    spool.unlink(missing_ok=True)
                held.ask(e)
                self._remember(w, e)
                out[w.table_id] = e
            with concurrent.futures.ThreadPoolExecutor(OBJECTS_AT_ONCE) as pool:
                list(pool.map(one, enumerate(todo)))
        return out

    def _adopt_object(self, w: Wanted, spool: Path, ahead: int) -> FileEntry:
        """``w``'s object streamed once: its md5 (DVC) and SHA-256 fed, cut and named as it
        arrives (FastCDC over a sliding window gives the cuts it gives over the whole
        file: a chunk's end depends only on its own bytes), and written to ``spool`` for
        ``describe`` alone (headers, a zip's directory at the end). The md5 is not computed
        when the store's ETag (the MD5 it took of a single-part upload) is that md5. A large
        object comes as ranged parts, ``ahead`` in flight (``Store.download_parts``)."""
        store = self.registry.foreign_store(w.source)
        key = w.source.key(w.key)
        try:
            info = store.stat(key)
        except AccessDeniedError as e:
            raise AccessDeniedError(f"{w.what}: this host may not read it ({e}); adopting, and every host that "
                                    f"mounts the version, need read access to bucket {w.source.bucket!r}") from None
        if info is None:
            raise UsageError(f"{w.what} is missing from its store (not pushed?)")
        if w.size is not None and info.size != w.size:
            raise IntegrityError(f"{w.what}: the checkout says {w.size} bytes, the object has {info.size}")
        md5 = hashlib.md5(usedforsecurity=False) if w.md5 and info.etag != w.md5 else None
        sha = hashlib.sha256()
        cutter = StreamCutter()
        with open(spool, "wb") as f:
            def sink(data: bytes) -> None:
                if md5 is not None:
                    md5.update(data)
                sha.update(data)
                f.write(data)
                cutter.feed(data)
                self.on_progress(len(data), self.stats)
            if info.size > 2 * PART:
                n = store.download_parts(key, info.size, sink, PART, ahead)
            else:
                n = store.download(key, sink, STREAM_PIECE)
        chunks = cutter.close()
        self.stats.add(read_objects=1, read_bytes=n)
        if n != info.size:
            raise IntegrityError(f"{w.what}: {n} bytes read where it had {info.size} (it changed while adopted)")
        if md5 is not None and md5.hexdigest() != w.md5:
            hint = (" (a DVC 2 output: text files were hashed after CRLF normalisation; `dvc cache migrate` "
                    "re-hashes them)") if w.legacy else ""
            raise IntegrityError(f"{w.what}: its bytes' md5 is {md5.hexdigest()}, not {w.md5}{hint}")
        if w.sha256 is not None and sha.hexdigest() != w.sha256:
            raise IntegrityError(f"{w.what}: its bytes' SHA-256 is {sha.hexdigest()}, not the pointer's oid "
                                 f"{w.sha256}: the LFS store holds something else under that name")
        return FileEntry(w.path, n, 0o644, sha.hexdigest(), tuple(chunks), describe(str(spool), n))


class _NativeChunks:
    """Which of an adoption's chunks the registry holds itself (a HEAD each), asked as each
    object is named, so over a far store the lookups overlap the objects still streaming
    instead of following the last (~16 round trips per GiB)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._pool = concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE, thread_name_prefix="native")
        self._asked: dict[str, concurrent.futures.Future[bool]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> _NativeChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def ask(self, e: FileEntry) -> None:
        with self._lock:
            for h, _ in e.chunks:
                if h not in self._asked:
                    self._asked[h] = self._pool.submit(self._held, h)

    def _held(self, h: str) -> bool:
        return self.registry.store.stat(self.registry.chunk_key(h)) is not None

    def result(self) -> set[str]:
        """The chunks asked about that the registry holds (a lookup's error is raised here)."""
        return {h for h, f in self._asked.items() if f.result()}


# -- checking an adopted version's sources -----------------------------------------------------

@dataclass(frozen=True)
class Moved:
    path: str
    url: str
    why: str


def check_sources(registry: Registry, m: Manifest) -> tuple[int, list[Moved]]:
    """HEAD every foreign object ``m`` reads, and read its first chunk (verified): (objects
    checked, those that moved — deleted, resized, or holding other bytes). A change the
    HEAD cannot show (same size; an ETag that is not the md5) is still never served: every
    chunk a mount or pull reads is verified."""
    files = [f for f in m.files if f.foreign is not None]

    def one(f: FileEntry) -> Moved | None:
        assert f.foreign is not None
        src = m.sources[f.foreign.source]
        store, key = registry.foreign_store(src), src.key(f.foreign.key)
        url = f"s3://{src.bucket}/{key}"
        info = store.stat(key)
        if info is None:
            return Moved(f.path, url, "deleted")
        if info.size != f.size:
            return Moved(f.path, url, f"now {info.size} bytes, adopted {f.size}")
        etag = info.etag or ""
        if f.foreign.md5 and len(etag) == 32 and "-" not in etag and etag != f.foreign.md5:
            return Moved(f.path, url, f"overwritten (its md5 is now {etag})")
        if f.chunks:
            h, n = f.chunks[0]
            try:
                check_raw(store.get(key, 0, n), h, n)
            except IntegrityError:
                return Moved(f.path, url, "overwritten (its first chunk no longer matches)")
        return None
    with concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE) as pool:
        moved = [x for x in pool.map(one, files) if x is not None]
    return len(files), moved


# -- copying an adopted version in, so its foreign store can be retired ------------------------------

COPIES_AT_ONCE = 8


@dataclass
class CopyStats(Counters):
    chunks: int = 0
    copied_chunks: int = 0
    copied_bytes: int = 0  # stored bytes PUT
    present_chunks: int = 0  # already in the registry


def copy_in(registry: Registry, m: Manifest, on_progress: Callable[[int], None] | None = None
            ) -> tuple[Manifest, CopyStats]:
    """Copy the chunks ``m`` reads from foreign stores into the registry (each read as a
    range of its object, verified, stored as publish stores it) and write the same
    version without sources: its files, chunk ids and description unchanged, its id new.
    Under a lease: a concurrent gc keeps the copied chunks until the manifest is in."""
    stats = CopyStats()
    store = registry.store
    on_progress = on_progress or (lambda n: None)

    def one(item: tuple[str, int]) -> None:
        h, n = item
        key = registry.chunk_key(h)
        if store.stat(key) is not None:
            stats.add(chunks=1, present_chunks=1)
        else:
            data = encode(registry.get_chunk(h, n))
            store.put(key, data)
            stats.add(chunks=1, copied_chunks=1, copied_bytes=len(data))
        on_progress(n)
    sizes = m.unique_chunks
    with Lease(registry, f"copy-in {m.name}"):
        with concurrent.futures.ThreadPoolExecutor(COPIES_AT_ONCE) as pool:
            list(pool.map(one, [(h, sizes[h]) for h in m.foreign_chunks]))
        native = dataclasses.replace(m, files=tuple(dataclasses.replace(f, foreign=None) for f in m.files),
                                     sources=(), created=utc_stamp())
        registry.put_manifest(native)
    return native, stats

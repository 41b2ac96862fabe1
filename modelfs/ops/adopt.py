"""``modelfs adopt``: a version whose files stay where DVC or Git LFS put them.

A checkout's ``.dvc`` files, ``dvc.lock`` and Git LFS pointers name objects in another
store (a DVC remote, an LFS server's bucket). Adoption reads each object once — streamed
to a spool file on this host, its md5 checked on the way for DVC — and has the fetch
workers cut and name it exactly as ``publish`` does (FastCDC, BLAKE3 block ids), without
sending a chunk: the version's manifest says, per file, which foreign object holds its
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
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError, StoreError, UsageError
from ..format.chunking import DEFAULT_PARAMS
from ..format.codec import check_raw, encode
from ..format.foreign import dvc_outputs
from ..format.manifest import FileEntry, ForeignObject, ForeignStore, Manifest, loads
from ..format.refs import check_name, check_tag
from ..progress import Counters
from ..registry.adoption import LOOKUPS_AT_ONCE, Wanted, remember, table_entries
from ..registry.layout import Registry
from ..registry.lifecycle import Lease
from .publish import Publisher, SourceFile, scan

log = logging.getLogger(__name__)

SPOOL_BYTES = 4 << 30  # spooled at once: this batch and the next (one larger object alone)
BATCH_OBJECTS = 2  # objects cut together (and fetched side by side)
AHEAD = 1  # batches fetched while one is cut (2: the same time far, more CPU; measured)


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
    root = checkout / subdir.strip("/") if subdir else checkout
    if not root.is_dir():
        return []
    taken = {w.path for w in wanted}
    dvc_dirs = [o.path for o in (dvc_outputs(checkout) if (checkout / ".dvc").is_dir() else []) if o.is_dir]
    if subdir:
        dvc_dirs = [d[len(subdir.strip("/")) + 1:] for d in dvc_dirs if d.startswith(subdir.strip("/") + "/")]
    out = []
    for f in scan(root)[0]:
        top = f.path.split("/", 1)[0]
        if top in (".git", ".dvc") or f.path in taken or f.path.rsplit("/", 1)[-1] in GIT_AND_DVC_FILES \
                or f.path.endswith(".dvc") or any(f.path.startswith(d + "/") for d in dvc_dirs):
            continue
        out.append(f)
    return out



class Adopter:
    """One adoption run into ``registry`` (never an encrypted one: a foreign object is
    plaintext in its own store, and a mount reads it there)."""

    def __init__(self, registry: Registry, *, concurrency: int = 16, work_dir: Path | None = None,
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
        known.update(self._read(todo))
        native = self._native({h for e in known.values() for h, _ in e.chunks})
        sources: list[ForeignStore] = []
        files = []
        for w in wanted:
            e = known[w.table_id]
            if w.size is not None and w.size != e.size:
                raise IntegrityError(f"{w.what}: the checkout says {w.size} bytes, the object has {e.size}")
            if w.sha256 is not None and w.sha256 != e.sha256:
                raise IntegrityError(f"{w.what}: its bytes' SHA-256 is {e.sha256}, not the pointer's oid")
            foreign = None
            if not all(h in native for h, _ in e.chunks):
                if w.source not in sources:
                    sources.append(w.source)
                foreign = ForeignObject(sources.index(w.source), w.key, w.md5)
            else:
                self.stats.native_files += 1
            files.append(FileEntry(w.path, e.size, 0o644, e.sha256, e.chunks, e.description, None,
                                   by_blocks=True, foreign=foreign))
            self.stats.add(files=1, bytes=e.size)
        files = sorted(files + plain, key=lambda f: f.path)
        self.stats.add(files=len(plain), bytes=sum(f.size for f in plain))
        m = Manifest(name=name, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), files=tuple(files),
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
    def _read(self, todo: list[Wanted]) -> dict[str, FileEntry]:
        """Each object fetched once into a spool file (its md5 checked for DVC), then cut and
        named by the fetch workers, a batch at a time (``BATCH_OBJECTS``, at most
        ``SPOOL_BYTES``): the next batch is fetched while this one is cut, so a far store's
        link keeps busy (cutting holds this process's GIL: within a batch, fetching and
        cutting side by side cost ~1 CPU-s/GB more on 2 cores, measured)."""
        batches: list[list[Wanted]] = []
        size = 0
        for w in todo:
            if batches and len(batches[-1]) < BATCH_OBJECTS and size + (w.size or 0) <= SPOOL_BYTES // (AHEAD + 1):
                batches[-1].append(w)
                size += w.size or 0
            else:
                batches.append([w])
                size = w.size or 0
        out: dict[str, FileEntry] = {}
        with tempfile.TemporaryDirectory(prefix="modelfs-adopt-", dir=self.work_dir) as tmp, \
                concurrent.futures.ThreadPoolExecutor(BATCH_OBJECTS * AHEAD) as pool:
            def fetch(k: int) -> list[concurrent.futures.Future]:
                if k >= len(batches):
                    return []
                return [pool.submit(self._spool, w, Path(tmp) / f"{k}-{i}") for i, w in enumerate(batches[k])]
            pending = [fetch(k) for k in range(AHEAD)]
            try:
                for k, batch in enumerate(batches):
                    spooled = [f.result() for f in pending.pop(0)]
                    pending.append(fetch(k + AHEAD))
                    out.update(self._name(batch, spooled))
            finally:
                for f in (f for fs in pending for f in fs):
                    f.cancel()
        return out

    def _name(self, batch: list[Wanted], spooled: list[SourceFile]) -> dict[str, FileEntry]:
        try:
            entries = Publisher(self.registry, concurrency=self.concurrency, names_only=True).files(spooled)
        finally:
            for s in spooled:
                s.full.unlink(missing_ok=True)
        out = {}
        for w, e in zip(batch, entries):
            if w.sha256 is not None and e.sha256 != w.sha256:
                raise IntegrityError(f"{w.what}: its bytes' SHA-256 is {e.sha256}, not the pointer's oid "
                                     f"{w.sha256}: the LFS store holds something else under that name")
            out[w.table_id] = e
        with concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE) as pool:
            list(pool.map(lambda w: self._remember(w, out[w.table_id]), batch))
        return out

    def _spool(self, w: Wanted, path: Path) -> SourceFile:
        """``w``'s object streamed into ``path``, its md5 checked for DVC — computed on the
        way, unless the store's ETag (the MD5 it computed of a single-part upload) is it.
        One stream per object (parallel ranged GETs of one object cost 1–2 CPU-s/GB more
        here on 2 cores, measured)."""
        store = self.registry.foreign_store(w.source)
        key = w.source.key(w.key)
        try:
            info = store.stat(key)
        except StoreError as e:
            if "access denied" not in str(e):
                raise
            raise StoreError(f"{w.what}: this host may not read it ({e}); adopting, and every host that mounts "
                             f"the version, need read access to bucket {w.source.bucket!r}") from None
        if info is None:
            raise UsageError(f"{w.what} is missing from its store (not pushed?)")
        if w.size is not None and info.size != w.size:
            raise IntegrityError(f"{w.what}: the checkout says {w.size} bytes, the object has {info.size}")
        md5 = hashlib.md5(usedforsecurity=False) if w.md5 and info.etag != w.md5 else None
        with open(path, "wb") as f:
            def sink(data: bytes) -> None:
                if md5 is not None:
                    md5.update(data)
                f.write(data)
                self.on_progress(len(data), self.stats)
            n = store.download(key, sink)
        self.stats.add(read_objects=1, read_bytes=n)
        if n != info.size:
            raise IntegrityError(f"{w.what}: {n} bytes read where it had {info.size} (it changed while adopted)")
        if md5 is not None and md5.hexdigest() != w.md5:
            hint = (" (a DVC 2 output: text files were hashed after CRLF normalisation; `dvc cache migrate` "
                    "re-hashes them)") if w.legacy else ""
            raise IntegrityError(f"{w.what}: its bytes' md5 is {md5.hexdigest()}, not {w.md5}{hint}")
        st = os.stat(path)
        return SourceFile(w.path, path, st.st_size, 0o644, st.st_mtime_ns)

    # -- chunks the registry holds itself ------------------------------------------------------
    def _native(self, chunks: set[str]) -> set[str]:
        store = self.registry.store

        def one(h: str) -> str | None:
            return h if store.stat(self.registry.chunk_key(h)) is not None else None
        with concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE) as pool:
            return {h for h in pool.map(one, sorted(chunks)) if h is not None}


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
                                     sources=(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        registry.put_manifest(native)
    return native, stats

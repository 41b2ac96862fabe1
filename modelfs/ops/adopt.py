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
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError, ManifestError, NotFoundError, UsageError
from ..format.chunking import DEFAULT_PARAMS
from ..format.codec import check_raw
from ..format.foreign import (LFS_LAYOUTS, dir_listing, dvc_key, dvc_outputs, dvc_remote, lfs_key, lfs_pointers)
from ..format.manifest import FileEntry, ForeignObject, ForeignStore, Manifest, check_path, loads
from ..format.refs import check_name, check_tag
from ..progress import Counters
from ..registry.layout import Registry
from ..registry.lifecycle import Lease
from .publish import Publisher, SourceFile, scan

log = logging.getLogger(__name__)

SPOOL_BYTES = 4 << 30  # objects spooled at once (one larger object alone)
OBJECTS_AT_ONCE = 4  # objects streamed side by side
LOOKUPS_AT_ONCE = 16  # table entries and chunk HEADs asked side by side
TABLE = "adopted"


@dataclass(frozen=True)
class Wanted:
    """One file of the version to be: where its object is, and what it must hash to."""
    path: str  # in the version
    source: ForeignStore
    key: str  # under the source's prefix
    md5: str | None = None  # DVC: the object's md5
    sha256: str | None = None  # Git LFS: its oid
    size: int | None = None  # what the checkout says (None: a DVC directory's files say none)
    legacy: bool = False  # a DVC 2 output (md5-dos2unix)

    @property
    def table_id(self) -> str:
        return f"md5/{self.md5}" if self.md5 else f"sha256/{self.sha256}"

    @property
    def what(self) -> str:
        return f"{self.path} ({self.source.kind} object s3://{self.source.bucket}/{self.source.key(self.key)})"


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


def plan(registry: Registry, checkout: Path, *, subdir: str | None = None, remote: str | None = None,
         lfs_store: str | None = None, lfs_layout: str = "sharded", lfs_endpoint: str | None = None) -> list[Wanted]:
    """The files a checkout's DVC outputs and Git LFS pointers make (paths relative to
    ``subdir``, when given), each with its object; a DVC directory's listing is read here."""
    if not checkout.is_dir():
        raise UsageError(f"{checkout} is not a directory")
    wanted: list[Wanted] = []
    outs = dvc_outputs(checkout) if (checkout / ".dvc").is_dir() else []
    if outs:
        r = dvc_remote(checkout, remote)
        src = ForeignStore("dvc", r.url, r.endpoint)
        for o in outs:
            if not o.is_dir:
                wanted.append(Wanted(o.path, src, o.key(), md5=o.md5, size=o.size, legacy=o.legacy))
                continue
            key = src.key(o.key())
            try:
                listing = registry.foreign_store(src).get(key)
            except NotFoundError:
                raise UsageError(f"{o.declared_in}: directory {o.path!r} was not pushed: s3://{src.bucket}/{key} "
                                 "is missing (dvc push first)") from None
            for rel, md5 in dir_listing(listing, f"{o.path} (s3://{src.bucket}/{key})"):
                wanted.append(Wanted(f"{o.path}/{rel}", src, dvc_key(md5, o.legacy), md5=md5, legacy=o.legacy))
    pointers = lfs_pointers(checkout)
    if pointers:
        if lfs_store is None:
            raise UsageError(f"{checkout} has {len(pointers)} Git LFS pointer file(s) ({pointers[0].path}, ...): "
                             "pass --lfs-store s3://BUCKET/PREFIX where the LFS server keeps its objects")
        if lfs_layout not in LFS_LAYOUTS:
            raise UsageError(f"--lfs-layout {lfs_layout!r}: one of {', '.join(LFS_LAYOUTS)}")
        src = ForeignStore("git-lfs", lfs_store.rstrip("/"), lfs_endpoint)
        wanted += [Wanted(p.path, src, lfs_key(p.oid, lfs_layout), sha256=p.oid, size=p.size) for p in pointers]
    if subdir:
        subdir = check_path(subdir.strip("/"), "--path")
        wanted = [Wanted(**{**w.__dict__, "path": w.path[len(subdir) + 1:]}) for w in wanted
                  if w.path.startswith(subdir + "/")]
    if not wanted:
        raise UsageError(f"{checkout}{'/' + subdir if subdir else ''} has no DVC outputs and no Git LFS pointers: "
                         "nothing to adopt")
    seen: dict[str, Wanted] = {}
    for w in wanted:
        if w.path in seen:
            raise UsageError(f"{w.path} is named twice ({seen[w.path].source.kind} and {w.source.kind})")
        seen[w.path] = w
    return sorted(wanted, key=lambda w: w.path)


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

    # -- the adoption table: objects read before -------------------------------------------
    def _table_key(self, table_id: str) -> str:
        return self.registry.ref.key(TABLE, f"{table_id}.json")

    def _known(self, by_id: dict[str, Wanted]) -> dict[str, FileEntry]:
        """Table entries of the objects read before (by this registry's adoptions)."""
        def one(table_id: str) -> tuple[str, FileEntry | None]:
            key = self._table_key(table_id)
            try:
                data = self.registry.store.get(key)
            except NotFoundError:
                return table_id, None
            try:
                return table_id, loads(data, source=key).files[0]
            except (ManifestError, IndexError) as e:
                log.warning("adoption table entry %s is damaged (%s): reading the object again", key, e)
                return table_id, None
        with concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE) as pool:
            return {k: e for k, e in pool.map(one, by_id) if e is not None}

    def _remember(self, w: Wanted, e: FileEntry) -> None:
        """One table entry: a one-file manifest (validated as one when read back)."""
        entry = Manifest(name="adopted", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         files=(FileEntry("object", e.size, 0o644, e.sha256, e.chunks, e.description),),
                         directories=(), chunking=DEFAULT_PARAMS.as_json())
        data = entry.to_bytes()
        self.registry.store.put(self._table_key(w.table_id), data, "application/json")
        self.stats.add(uploaded_bytes=len(data))

    # -- reading objects --------------------------------------------------------------------
    def _read(self, todo: list[Wanted]) -> dict[str, FileEntry]:
        """Each object streamed once into a spool file (md5 checked on the way for DVC),
        then cut and named by the fetch workers; in batches of at most ``SPOOL_BYTES``."""
        out: dict[str, FileEntry] = {}
        with tempfile.TemporaryDirectory(prefix="modelfs-adopt-", dir=self.work_dir) as tmp:
            batch: list[Wanted] = []
            size = 0
            for w in todo + [None]:  # type: ignore[list-item]
                if w is not None and (not batch or size + (w.size or 0) <= SPOOL_BYTES):
                    batch.append(w)
                    size += w.size or 0
                    continue
                if batch:
                    out.update(self._read_batch(batch, Path(tmp)))
                batch, size = ([w], w.size or 0) if w is not None else ([], 0)
        return out

    def _read_batch(self, batch: list[Wanted], tmp: Path) -> dict[str, FileEntry]:
        with concurrent.futures.ThreadPoolExecutor(OBJECTS_AT_ONCE) as pool:
            spooled = list(pool.map(lambda iw: self._spool(iw[1], tmp / f"{iw[0]}"), enumerate(batch)))
        try:
            pub = Publisher(self.registry, concurrency=self.concurrency, names_only=True)
            entries = pub.files(spooled)
        finally:
            for s in spooled:
                s.full.unlink(missing_ok=True)
        out = {}
        for w, e in zip(batch, entries):
            if w.sha256 is not None and e.sha256 != w.sha256:
                raise IntegrityError(f"{w.what}: its bytes' SHA-256 is {e.sha256}, not the pointer's oid "
                                     f"{w.sha256}: the LFS store holds something else under that name")
            self._remember(w, e)
            out[w.table_id] = e
        return out

    def _spool(self, w: Wanted, path: Path) -> SourceFile:
        store = self.registry.foreign_store(w.source)
        key = w.source.key(w.key)
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "wb") as f:
            def sink(data: bytes) -> None:
                md5.update(data)
                f.write(data)
                self.on_progress(len(data), self.stats)
            try:
                n = store.download(key, sink)
            except NotFoundError:
                raise UsageError(f"{w.what} is missing from its store (not pushed?)") from None
        self.stats.add(read_objects=1, read_bytes=n)
        if w.size is not None and n != w.size:
            raise IntegrityError(f"{w.what}: the checkout says {w.size} bytes, the object has {n}")
        if w.md5 is not None and md5.hexdigest() != w.md5:
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

"""Manifest v1: the small, reviewable JSON that describes one immutable model version.

A manifest lists every file (path, size, mode, SHA-256, chunk list, description)
and every directory. Its bytes are canonical — sorted keys, a fixed layout,
each chunk on one line — so the same model gives the same text and a diff of
two versions reads like a code review. The version id is a hash of those
bytes. ``load`` trusts nothing: every field is checked before a path reaches a
filesystem. Field by field: ``docs/manifest.md``.
"""

from __future__ import annotations

import bisect
import json
import posixpath
import re
import time
from dataclasses import dataclass, field
from functools import cached_property

import blake3

from .chunking import HASH_ALGORITHM as BLOCK_HASH
from .chunking import PLAIN_HASH_ALGORITHM
from ..errors import IntegrityError, ManifestError

FORMAT = "modelfs-manifest"
FORMAT_VERSION = 1
VERSION_ID_HEX = 20  # 80 bits of BLAKE3 over the manifest bytes
# how chunks are named (see modelfs.format.chunking): by their blocks' digests, by their bytes
# (manifests before block digests), keyed by an encrypted registry's key
CHUNK_HASHES = (BLOCK_HASH, PLAIN_HASH_ALGORITHM, "blake3-keyed")

MAX_MANIFEST_BYTES = 512 * 1024 * 1024
MAX_FILES = 1_000_000
MAX_FILE_SIZE = 1 << 46  # 64 TiB: larger is a corrupt or hostile manifest
MAX_CHUNK_SIZE = 1 << 30
MAX_PATH = 4096
MAX_COMPONENT = 255
MTIME_NS_RANGE = (-(1 << 63), (1 << 63) - 1)  # what a filesystem's 64-bit nanosecond time holds
_HEX = set("0123456789abcdef")
SOURCE_KINDS = ("dvc", "git-lfs")  # the stores whose objects a version may be adopted from
MAX_SOURCES = 64
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class ForeignStore:
    """A store an adopted version reads some files from, in place (``modelfs adopt``): a
    DVC remote or a Git LFS server's bucket. Its objects are read, never written."""
    kind: str  # SOURCE_KINDS
    url: str  # s3://BUCKET[/PREFIX]
    endpoint: str | None = None  # its S3 endpoint, when not the registry's own

    @property
    def bucket(self) -> str:
        return self.url[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.url[5:].split("/", 1)
        return rest[1] if len(rest) > 1 else ""

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a path under the prefix: never outside it)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def as_json(self) -> dict:
        return {"kind": self.kind, "url": self.url, **({"endpoint": self.endpoint} if self.endpoint else {})}


@dataclass(frozen=True)
class ForeignObject:
    """Where an adopted file's bytes are: the whole object ``key`` under source ``source``
    (byte *i* of the file is byte *i* of the object), with its own id in that store."""
    source: int  # index into Manifest.sources
    key: str  # relative to the source's prefix
    md5: str | None = None  # a DVC object's md5 (a Git LFS object's oid is the file's sha256)

    def as_json(self) -> dict:
        return {"source": self.source, "key": self.key, **({"md5": self.md5} if self.md5 else {})}


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int  # permission bits only
    sha256: str
    chunks: tuple[tuple[str, int], ...]  # (blake3 hex, raw length), in file order
    description: dict = field(default_factory=dict, compare=False)
    mtime_ns: int | None = None  # the source file's mtime at publish; None in older manifests
    # its chunks are named with block digests (the manifest's chunk hash): a small read
    # may fetch and check just the blocks it needs
    by_blocks: bool = field(default=False, compare=False)
    foreign: ForeignObject | None = None  # adopted: read from another store's object, in place

    @cached_property
    def offsets(self) -> list[int]:
        """Start offset of each chunk (for bisecting a read offset to its chunk)."""
        out, pos = [], 0
        for _, n in self.chunks:
            out.append(pos)
            pos += n
        return out

    def chunk_index(self, offset: int) -> int:
        return bisect.bisect_right(self.offsets, offset) - 1

    def as_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mode": f"{self.mode:04o}",
                "sha256": self.sha256, "chunks": [[h, n] for h, n in self.chunks],
                "description": self.description,
                **({"mtime_ns": self.mtime_ns} if self.mtime_ns is not None else {}),
                **({"source": self.foreign.as_json()} if self.foreign is not None else {})}


@dataclass(frozen=True)
class DirEntry:
    path: str
    mode: int

    def as_json(self) -> dict:
        return {"path": self.path, "mode": f"{self.mode:04o}"}


@dataclass(frozen=True)
class Manifest:
    name: str
    created: str  # RFC 3339 UTC
    files: tuple[FileEntry, ...]
    directories: tuple[DirEntry, ...]
    chunking: dict
    chunk_hash: str = BLOCK_HASH  # "blake3-keyed": the chunks of an encrypted registry
    file_hash: str = "sha256"
    origin: str | None = None  # the registry it was published to: where its chunks are
    sources: tuple[ForeignStore, ...] = ()  # adopted: the stores its foreign files are read from

    @cached_property
    def foreign_chunks(self) -> dict[str, tuple[FileEntry, int]]:
        """Chunks that only adopted files hold: hash → (a file holding it, its offset there).
        Every other chunk is an object of the registry."""
        native = {h for f in self.files if f.foreign is None for h, _ in f.chunks}
        out: dict[str, tuple[FileEntry, int]] = {}
        for f in self.files:
            if f.foreign is not None:
                for (h, _), at in zip(f.chunks, f.offsets):
                    if h not in native:
                        out.setdefault(h, (f, at))
        return out

    @cached_property
    def unique_chunks(self) -> dict[str, int]:
        """Every chunk the version uses, once: hash → raw length."""
        return {h: n for f in self.files for h, n in f.chunks}

    def totals(self) -> dict:
        unique = self.unique_chunks
        return {"files": len(self.files), "directories": len(self.directories),
                "bytes": sum(f.size for f in self.files),
                "chunks": sum(len(f.chunks) for f in self.files),
                "unique_chunks": len(unique), "unique_chunk_bytes": sum(unique.values())}

    def as_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "created": self.created,
                "hashes": {"chunk": self.chunk_hash, "file": self.file_hash},
                "chunking": self.chunking, "totals": self.totals(),
                **({"origin": self.origin} if self.origin else {}),
                **({"sources": [x.as_json() for x in self.sources]} if self.sources else {}),
                "directories": [d.as_json() for d in self.directories],
                "files": [f.as_json() for f in self.files]}

    def to_bytes(self) -> bytes:
        return (dumps(self.as_json()) + "\n").encode()

    @cached_property
    def version_id(self) -> str:
        return version_id_of(self.to_bytes())

    def file(self, path: str) -> FileEntry | None:
        return self._by_path.get(path)

    @cached_property
    def _by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


def utc_stamp(seconds: float | None = None) -> str:
    """RFC 3339 UTC time to the second (``created``; tags' and leases' times): now, or ``seconds``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def version_id_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()[:VERSION_ID_HEX]


# -- canonical JSON ----------------------------------------------------------

def dumps(obj, indent: int = 0) -> str:
    """Deterministic JSON: sorted keys, two-space indent, short scalar lists on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {dumps(v, indent + 1)}"
                 for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(not isinstance(x, (dict, list, tuple)) for x in obj) and len(obj) <= 8:
            return "[" + ", ".join(dumps(x) for x in obj) + "]"
        return "[\n" + ",\n".join(inner + dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


# -- loading and validation ----------------------------------------------------

def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"duplicate key {k!r}")
        out[k] = v
    return out


def check_path(path: object, what: str = "path") -> str:
    """A safe relative POSIX path: no absolute, '..', '.', empty component or NUL."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what} must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise ManifestError(f"{what} {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise ManifestError(f"{what} {path!r} is absolute")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise ManifestError(f"{what} is longer than {MAX_PATH} bytes")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ManifestError(f"{what} {path!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT:
            raise ManifestError(f"{what} {path!r} has a component longer than {MAX_COMPONENT} bytes")
    return path


def _int(v: object, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ManifestError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}"[:300])
    return v


def _hex(v: object, n: int, what: str) -> str:
    if not isinstance(v, str) or len(v) != n or not set(v) <= _HEX:
        raise ManifestError(f"{what} must be {n} lowercase hex digits, got {v!r}"[:300])
    return v


def _mode(v: object, what: str) -> int:
    if not isinstance(v, str) or not 3 <= len(v) <= 4 or any(c not in "01234567" for c in v):
        raise ManifestError(f"{what} must be an octal string like '0644', got {v!r}"[:300])
    m = int(v, 8)
    if m & ~0o777:
        raise ManifestError(f"{what} {v!r} has setuid, setgid or sticky bits")
    return m


def _obj(v: object, what: str) -> dict:
    if not isinstance(v, dict):
        raise ManifestError(f"{what} must be an object")
    return v


def _list(v: object, what: str) -> list:
    if not isinstance(v, list):
        raise ManifestError(f"{what} must be a list")
    return v


def loads(data: bytes, expected_version: str | None = None, source: str = "manifest") -> Manifest:
    """Parse and validate manifest bytes; any defect is a one-line :class:`ManifestError`."""
    try:
        return _loads(data, expected_version)
    except ManifestError as e:
        raise ManifestError(f"{source}: {e}") from None


def _loads(data: bytes, expected_version: str | None) -> Manifest:
    if expected_version is not None and version_id_of(data) != expected_version:
        raise IntegrityError(f"manifest bytes do not match version id {expected_version}")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ManifestError("nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"not valid JSON: {e}") from None
    doc = _obj(doc, "the manifest")
    if doc.get("format") != FORMAT:
        raise ManifestError(f"not a modelfs manifest (format {doc.get('format')!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"unsupported format_version {doc.get('format_version')!r}: "
                            f"this modelfs reads version {FORMAT_VERSION}; upgrade modelfs")
    name = doc.get("name")
    if not isinstance(name, str) or not name or len(name) > 128 or "/" in name or "\x00" in name:
        raise ManifestError(f"invalid model name {name!r}"[:300])
    created = doc.get("created")
    if not isinstance(created, str) or len(created) > 64:
        raise ManifestError("created must be a timestamp string")
    hashes = _obj(doc.get("hashes"), "hashes")
    if hashes.get("chunk") not in CHUNK_HASHES or hashes.get("file") != "sha256":
        raise ManifestError(f"unsupported hash algorithms {hashes!r}"[:300])
    chunking = _obj(doc.get("chunking", {}), "chunking")
    origin = doc.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin.startswith("s3://")
                               or len(origin) > 1024 or "\x00" in origin):
        raise ManifestError("origin must be an s3:// registry URL")

    sources = _sources(doc.get("sources", []))
    if sources and hashes["chunk"] != BLOCK_HASH:
        raise ManifestError(f"an adopted version names its chunks with {BLOCK_HASH}, not {hashes['chunk']}")

    raw_files = _list(doc.get("files"), "files")
    raw_dirs = _list(doc.get("directories", []), "directories")
    if len(raw_files) + len(raw_dirs) > MAX_FILES:
        raise ManifestError(f"more than {MAX_FILES} entries")

    dirs: list[DirEntry] = []
    for i, d in enumerate(raw_dirs):
        d = _obj(d, f"directories[{i}]")
        dirs.append(DirEntry(check_path(d.get("path"), f"directories[{i}].path"),
                             _mode(d.get("mode"), f"directories[{i}].mode")))
    files: list[FileEntry] = []
    for i, f in enumerate(raw_files):
        f = _obj(f, f"files[{i}]")
        path = check_path(f.get("path"), f"files[{i}].path")
        size = _int(f.get("size"), f"{path}: size", 0, MAX_FILE_SIZE)
        raw_chunks = _list(f.get("chunks"), f"{path}: chunks")
        if len(raw_chunks) > size:  # every chunk holds at least one byte
            raise ManifestError(f"{path}: {len(raw_chunks)} chunks for {size} bytes")
        chunks = []
        for j, c in enumerate(_list(raw_chunks, "chunks")):
            if not isinstance(c, list) or len(c) != 2:
                raise ManifestError(f"{path}: chunks[{j}] must be [hash, size]")
            chunks.append((_hex(c[0], 64, f"{path}: chunks[{j}] hash"),
                           _int(c[1], f"{path}: chunks[{j}] size", 1, MAX_CHUNK_SIZE)))
        total = sum(n for _, n in chunks)
        if total != size:
            raise ManifestError(f"{path}: chunk sizes add up to {total}, not to the file size {size}")
        desc = f.get("description", {})
        mtime = f.get("mtime_ns")
        files.append(FileEntry(path, size, _mode(f.get("mode"), f"{path}: mode"),
                               _hex(f.get("sha256"), 64, f"{path}: sha256"), tuple(chunks),
                               _obj(desc, f"{path}: description"),
                               None if mtime is None else _int(mtime, f"{path}: mtime_ns", *MTIME_NS_RANGE),
                               by_blocks=hashes["chunk"] == BLOCK_HASH,
                               foreign=_foreign(f.get("source"), path, len(sources))))
    _check_tree(files, dirs)
    return Manifest(name=name, created=created, files=tuple(files), directories=tuple(dirs),
                    chunking=chunking, chunk_hash=hashes["chunk"], origin=origin, sources=sources)


def _sources(raw: object) -> tuple[ForeignStore, ...]:
    """``sources``: the foreign stores an adopted version declares (none for a published one)."""
    out = []
    for i, x in enumerate(_list(raw, "sources")[:MAX_SOURCES + 1]):
        if i == MAX_SOURCES:
            raise ManifestError(f"more than {MAX_SOURCES} sources")
        x = _obj(x, f"sources[{i}]")
        if set(x) - {"kind", "url", "endpoint"}:
            raise ManifestError(f"sources[{i}]: unknown fields {sorted(set(x) - {'kind', 'url', 'endpoint'})}"[:300])
        if x.get("kind") not in SOURCE_KINDS:
            raise ManifestError(f"sources[{i}].kind must be one of {', '.join(SOURCE_KINDS)}, got {x.get('kind')!r}"[:300])
        url, endpoint = x.get("url"), x.get("endpoint")
        if not isinstance(url, str) or not url.startswith("s3://") or len(url) > 1024:
            raise ManifestError(f"sources[{i}].url must be s3://BUCKET[/PREFIX], got {url!r}"[:300])
        bucket, _, prefix = url[5:].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ManifestError(f"sources[{i}].url: {bucket!r} is not a bucket name"[:300])
        if prefix:
            check_path(prefix, f"sources[{i}].url's prefix")
        if endpoint is not None and (not isinstance(endpoint, str) or len(endpoint) > 1024
                                     or not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[!-~]*)?", endpoint)):
            raise ManifestError(f"sources[{i}].endpoint must be an http(s) URL, got {endpoint!r}"[:300])
        out.append(ForeignStore(x["kind"], url.rstrip("/"), endpoint))
    return tuple(out)


def _foreign(raw: object, path: str, n_sources: int) -> ForeignObject | None:
    """A file's ``source``: an object under one of the declared sources, never outside them."""
    if raw is None:
        return None
    x = _obj(raw, f"{path}: source")
    if set(x) - {"source", "key", "md5"}:
        raise ManifestError(f"{path}: source has unknown fields {sorted(set(x) - {'source', 'key', 'md5'})}"[:300])
    if not n_sources:
        raise ManifestError(f"{path}: a source, but the manifest declares no sources")
    i = _int(x.get("source"), f"{path}: source.source (an index into sources)", 0, n_sources - 1)
    md5 = x.get("md5")
    return ForeignObject(i, check_path(x.get("key"), f"{path}: source.key"),
                         None if md5 is None else _hex(md5, 32, f"{path}: source.md5"))


def _check_tree(files: list[FileEntry], dirs: list[DirEntry]) -> None:
    """No duplicate paths, and nothing that is both a file and a directory."""
    file_paths: set[str] = set()
    for f in files:
        if f.path in file_paths:
            raise ManifestError(f"duplicate path {f.path!r}")
        file_paths.add(f.path)
    dir_paths: set[str] = set()
    for d in dirs:
        if d.path in dir_paths:
            raise ManifestError(f"duplicate directory {d.path!r}")
        dir_paths.add(d.path)
    implied = {posixpath.dirname(p) for p in file_paths | dir_paths} - {""}
    for p in list(implied):
        while p:
            implied.add(p)
            p = posixpath.dirname(p)
    clash = file_paths & (dir_paths | implied)
    if clash:
        raise ManifestError(f"{sorted(clash)[0]!r} is both a file and a directory")


def all_directories(m: Manifest) -> dict[str, int]:
    """Every directory (listed or implied by a path) with its mode."""
    out = {d.path: d.mode for d in m.directories}
    for p in [f.path for f in m.files] + list(out):
        p = posixpath.dirname(p)
        while p:
            out.setdefault(p, 0o755)
            p = posixpath.dirname(p)
    return out

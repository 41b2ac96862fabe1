"""What changed between two versions: files, tensors, and the bytes a host must fetch.

Everything comes from the two manifests, plus the headers of safetensors and GGUF
files that changed (their tensor tables), read from the store chunk by chunk: a
diff of two 100 GB versions reads a few MiB. A tensor "changed bytes" when its
byte range touches a chunk the other version does not have at all: content-defined
chunks make that exact for unchanged bytes and conservative at a changed chunk's
edges.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .headers import gguf_tensors, safetensors_tensors
from ..errors import ModelfsError
from ..format.manifest import FileEntry, Manifest

log = logging.getLogger(__name__)

TensorTable = dict[str, tuple[str, list[int], int, int]]  # name → (dtype, shape, start, end)
ChunkReader = Callable[[str, int], bytes]  # (hash, size) → verified raw bytes
MAX_HEADER_READ = 256 << 20  # a header that needs more than this is not believed


class EntryFile(io.RawIOBase):
    """A file of a version, readable (and seekable) from its chunks, fetched on demand."""

    def __init__(self, entry: FileEntry, read_chunk: ChunkReader):
        self.entry, self.read_chunk = entry, read_chunk
        self.pos = 0
        self.fetched = 0
        self._cache: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.entry.size}[whence] + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        e = self.entry
        if self.pos >= e.size or not len(b):
            return 0
        i = e.chunk_index(self.pos)
        if i not in self._cache:
            if self.fetched > MAX_HEADER_READ:
                raise ValueError(f"header larger than {MAX_HEADER_READ} bytes")
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = self.read_chunk(*e.chunks[i])
            self.fetched += e.chunks[i][1]
        data = self._cache[i]
        lo = self.pos - e.offsets[i]
        n = min(len(b), len(data) - lo)
        b[:n] = data[lo:lo + n]
        self.pos += n
        return n


def tensor_table(entry: FileEntry, read_chunk: ChunkReader) -> TensorTable | None:
    """The tensors of a safetensors or GGUF file (None for other formats or a broken header)."""
    fmt = entry.description.get("format")
    if fmt not in ("safetensors", "gguf"):
        return None
    f = io.BufferedReader(EntryFile(entry, read_chunk), buffer_size=1 << 20)
    try:
        if fmt == "safetensors":
            return safetensors_tensors(f, entry.size)[0]
        return gguf_tensors(f, entry.size)[0]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OverflowError) as e:
        log.warning("%s: cannot read its tensor table: %s", entry.path, e)
        return None


@dataclass
class TensorDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    retyped: list[tuple[str, str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # same name, shape and type; other bytes

    def as_json(self) -> dict:
        return {"added": self.added, "removed": self.removed,
                "reshaped": [{"name": n, "from": a, "to": b} for n, a, b in self.reshaped],
                "retyped": [{"name": n, "from": a, "to": b} for n, a, b in self.retyped],
                "bytes_changed": self.changed}


@dataclass
class FileChange:
    path: str
    size: tuple[int, int]
    mode: tuple[int, int]
    content_changed: bool
    tensors: TensorDiff | None = None

    def as_json(self) -> dict:
        return {"path": self.path, "size": list(self.size), "mode": [f"{m:04o}" for m in self.mode],
                "content_changed": self.content_changed,
                **({"tensors": self.tensors.as_json()} if self.tensors is not None else {})}


@dataclass
class Diff:
    old: str
    new: str
    added: list[FileEntry]
    removed: list[FileEntry]
    changed: list[FileChange]
    unchanged: int
    fetch_bytes: int  # raw bytes of the chunks the new version has and the old lacks
    fetch_chunks: int
    new_bytes: int  # the new version's unique chunk bytes

    def as_json(self) -> dict:
        return {"old": self.old, "new": self.new,
                "files": {"added": [{"path": f.path, "size": f.size} for f in self.added],
                          "removed": [{"path": f.path, "size": f.size} for f in self.removed],
                          "changed": [c.as_json() for c in self.changed], "unchanged": self.unchanged},
                "fetch": {"bytes": self.fetch_bytes, "chunks": self.fetch_chunks,
                          "of_bytes": self.new_bytes}}


def diff(old: Manifest, new: Manifest, old_label: str, new_label: str,
         read_old: ChunkReader, read_new: ChunkReader) -> Diff:
    """Compare two manifests; tensor tables are read (``read_*``) only for changed files."""
    old_chunks, new_chunks = old.unique_chunks, new.unique_chunks
    missing = {h: n for h, n in new_chunks.items() if h not in old_chunks}
    added = [f for f in new.files if old.file(f.path) is None]
    removed = [f for f in old.files if new.file(f.path) is None]
    changed, unchanged = [], 0
    for f in new.files:
        o = old.file(f.path)
        if o is None:
            continue
        content = (o.sha256, o.size) != (f.sha256, f.size)
        if not content and o.mode == f.mode:
            unchanged += 1
            continue
        change = FileChange(f.path, (o.size, f.size), (o.mode, f.mode), content)
        if content:
            change.tensors = _tensor_diff(o, f, read_old, read_new, old_chunks)
        changed.append(change)
    return Diff(old_label, new_label, added, removed, changed, unchanged,
                sum(missing.values()), len(missing), sum(new_chunks.values()))


def _tensor_diff(o: FileEntry, f: FileEntry, read_old: ChunkReader, read_new: ChunkReader,
                 old_chunks: dict[str, int]) -> TensorDiff | None:
    try:
        a, b = tensor_table(o, read_old), tensor_table(f, read_new)
    except ModelfsError as e:  # a header chunk that cannot be fetched: the file diff stands
        log.warning("%s: tensors not compared: %s", f.path, e)
        return None
    if a is None or b is None:
        return None
    d = TensorDiff(added=sorted(set(b) - set(a)), removed=sorted(set(a) - set(b)))
    for name in sorted(set(a) & set(b)):
        (ta, sa, _, _), (tb, sb, lo, hi) = a[name], b[name]
        if sa != sb:
            d.reshaped.append((name, sa, sb))
        if ta != tb:
            d.retyped.append((name, ta, tb))
        if sa == sb and ta == tb and hi > lo:
            first, last = f.chunk_index(lo), f.chunk_index(hi - 1)
            if any(f.chunks[i][0] not in old_chunks for i in range(first, last + 1)):
                d.changed.append(name)
    return d

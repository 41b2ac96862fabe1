"""The persistent block cache: verified chunks (and manifests) in one LMDB environment.

Blocking by nature: every method here runs in a worker thread (the mount wraps
them in ``trio.to_thread.run_sync`` with a limiter), never on the trio loop.

Layout (one environment at ``<cache-dir>/blocks``, shared by every mount on the host):

    chunks     blake3 (32 raw bytes) → raw chunk bytes
    meta       blake3 (32 raw bytes) → u64 last use (ns), u64 size (written in batches)
    manifests  version id (ascii)    → manifest bytes (immutable, hash-checked)
    refs       model ref (ascii)     → JSON {"version", "at"}: what a tag last resolved to,
                                       so a mount can start while the store is unreachable

Reads never write: the last-use times of hits are kept in memory and written by
the single writer together with new chunks (``write``). Every read is verified
against the chunk's BLAKE3 id, so a damaged entry is dropped and refetched,
never returned. The size cap counts used LMDB pages, not the file size (an LMDB
file never shrinks); past the cap the least recently used chunks go first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .chunking import chunk_hash
from .errors import UsageError
from .manifest import version_id_of

log = logging.getLogger(__name__)

_META = struct.Struct("<QQ")
LOW_WATER = 0.90  # eviction frees down to this fraction of the cap


def default_cache_dir() -> Path:
    """$CACHE_DIRECTORY (what systemd's CacheDirectory= made), /var/cache/modelfs for root, else XDG."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0 and not os.environ.get("XDG_CACHE_HOME"):
        return Path("/var/cache/modelfs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "modelfs"


@dataclass
class CacheStats:
    entries: int  # chunks
    chunk_bytes: int  # their payload
    used_bytes: int  # LMDB pages they occupy (what the cap counts)
    file_bytes: int  # size of data.mdb (never shrinks; freed pages are reused)
    manifests: int
    oldest_use_ns: int | None  # least recently used chunk's last use
    newest_use_ns: int | None


@dataclass
class VerifyResult:
    checked: int = 0
    bytes: int = 0
    damaged: int = 0


class BlockCache:
    def __init__(self, directory: Path, cap_bytes: int):
        self.path = Path(directory) / "blocks"
        self.cap = cap_bytes
        self.map_size = max(2 * cap_bytes + (256 << 20), 1 << 30)
        self._touched: dict[bytes, int] = {}
        self._touch_lock = threading.Lock()
        self.env = self._open()

    # -- opening and recovery ----------------------------------------------------
    @classmethod
    def open_existing(cls, directory: Path) -> BlockCache:
        """For the cache tools: an existing cache, its cap unknown (a mount-time setting)."""
        data = Path(directory) / "blocks" / "data.mdb"
        if not data.is_file():
            raise UsageError(f"no modelfs cache in {directory}")
        return cls(directory, max(data.stat().st_size // 2, 1))

    def _open(self) -> lmdb.Environment:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)  # cached model bytes are not for other users
        try:
            env = self._open_env()
        except lmdb.Error as e:
            aside = self.path.with_name(f"blocks.corrupt-{int(time.time())}")
            log.error("cache %s is unreadable (%s): moved aside to %s, starting empty", self.path, e, aside)
            self.path.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
            self.path.mkdir(mode=0o700)
            env = self._open_env()
        return env

    def _open_env(self) -> lmdb.Environment:
        # sync=False: no fsync per commit. This is a cache: every entry is verified
        # against its BLAKE3 id when read, and an unreadable file is rebuilt at start,
        # so a crash can cost entries but never return wrong bytes. It doubles write
        # throughput here. readahead stays on: values are multi-MiB runs of pages.
        env = lmdb.open(str(self.path), map_size=self.map_size, max_dbs=8, max_readers=512,
                        sync=False, metasync=False, mode=0o600)
        env.reader_check()  # free reader slots left by crashed processes
        self.chunks = env.open_db(b"chunks")
        self.meta = env.open_db(b"meta")
        self.manifests = env.open_db(b"manifests")
        self.refs = env.open_db(b"refs")
        with env.begin() as txn:  # touch every database once: garbage fails here, not later
            for db in (self.chunks, self.meta, self.manifests, self.refs):
                txn.stat(db)
        return env

    def _txn(self, write: bool = False) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:  # another process grew the map: adopt its size
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    # -- reads (any thread) ------------------------------------------------------
    def get(self, h: str) -> bytes | None:
        """The verified chunk, or None (a miss, or a damaged entry that is now dropped)."""
        key = bytes.fromhex(h)
        with self._txn() as txn:
            data = txn.get(key, db=self.chunks)
        if data is None:
            return None
        if chunk_hash(data) != h:
            log.warning("cache entry for chunk %s is damaged: dropped, will refetch", h)
            self.delete([h])
            return None
        with self._touch_lock:
            self._touched[key] = time.time_ns()
        return data

    def has(self, h: str) -> bool:
        with self._txn() as txn:
            return txn.get(bytes.fromhex(h), db=self.meta) is not None

    def get_manifest(self, version: str) -> bytes | None:
        with self._txn() as txn:
            data = txn.get(version.encode(), db=self.manifests)
        if data is not None and version_id_of(data) != version:
            log.warning("cached manifest %s is damaged: dropped", version)
            with self._txn(write=True) as txn:
                txn.delete(version.encode(), db=self.manifests)
            return None
        return data

    def get_ref(self, ref: str) -> tuple[str, float] | None:
        """(version, when it was resolved) of a model ref, as last seen by a mount."""
        with self._txn() as txn:
            data = txn.get(ref.encode(), db=self.refs)
        try:
            doc = json.loads(data) if data is not None else None
            return (str(doc["version"]), float(doc["at"])) if doc else None
        except (ValueError, KeyError, TypeError):
            return None

    # -- writes (one thread at a time) ----------------------------------------------
    def put_ref(self, ref: str, version: str) -> None:
        try:
            with self._txn(write=True) as txn:
                txn.put(ref.encode(), json.dumps({"version": version, "at": time.time()}).encode(),
                        db=self.refs)
        except (lmdb.Error, OSError) as e:
            log.warning("could not cache %s: %s", ref, e)

    def put_manifest(self, version: str, data: bytes) -> None:
        try:
            with self._txn(write=True) as txn:
                txn.put(version.encode(), data, db=self.manifests)
        except (lmdb.Error, OSError) as e:
            log.warning("could not cache manifest %s: %s", version, e)

    def write(self, chunks: list[tuple[str, bytes]]) -> None:
        """Store new chunks and flush last-use times in one transaction, then evict past the cap.

        A full disk or map is not an error for readers: the cache evicts and, if
        that does not make room, these chunks simply stay uncached.
        """
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        now = time.time_ns()
        for attempt in (1, 2):
            try:
                with self._txn(write=True) as txn:
                    for key, t in touched.items():
                        old = txn.get(key, db=self.meta)
                        if old is not None:
                            txn.put(key, _META.pack(t, _META.unpack(old)[1]), db=self.meta)
                    for h, data in chunks:
                        key = bytes.fromhex(h)
                        txn.put(key, data, db=self.chunks)
                        txn.put(key, _META.pack(now, len(data)), db=self.meta)
                break
            except (lmdb.Error, OSError) as e:  # map full, ENOSPC, EIO of the cache disk
                if attempt == 2:
                    log.warning("cache full or failing (%s): %d chunks not cached", e, len(chunks))
                    return
                try:
                    self.evict(target=int(self.cap * 0.5))
                except (lmdb.Error, OSError):
                    pass
        try:
            self.evict()
        except (lmdb.Error, OSError) as e:
            log.warning("cache eviction failed: %s", e)

    def delete(self, hashes: list[str]) -> None:
        with self._txn(write=True) as txn:
            for h in hashes:
                key = bytes.fromhex(h)
                txn.delete(key, db=self.chunks)
                txn.delete(key, db=self.meta)

    def used_bytes(self) -> int:
        with self._txn() as txn:
            st = txn.stat(self.chunks)
        return st["psize"] * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])

    def evict(self, target: int | None = None) -> int:
        """Drop least recently used chunks until used pages ≤ target (default: 90% of cap)."""
        used = self.used_bytes()
        if target is None:
            if used <= self.cap:
                return 0
            target = int(self.cap * LOW_WATER)
        if used <= target:
            return 0
        with self._txn() as txn:
            psize = txn.stat(self.chunks)["psize"]
            lru = sorted((*_META.unpack(v), bytes(k)) for k, v in txn.cursor(db=self.meta))
        victims, freed = [], 0
        for _, n, key in lru:
            if used - freed <= target:
                break
            victims.append(key.hex())
            freed += -(-(n + 16) // psize) * psize
        self.delete(victims)
        log.info("cache eviction: %d chunks, ~%d MiB", len(victims), freed >> 20)
        return len(victims)

    def stats(self) -> CacheStats:
        with self._txn() as txn:
            entries = txn.stat(self.chunks)["entries"]
            manifests = txn.stat(self.manifests)["entries"]
            total, oldest, newest = 0, None, None
            for _, v in txn.cursor(db=self.meta):
                t, n = _META.unpack(v)
                total += n
                oldest = t if oldest is None else min(oldest, t)
                newest = t if newest is None else max(newest, t)
        data = self.path / "data.mdb"
        return CacheStats(entries, total, self.used_bytes(), data.stat().st_size if data.exists() else 0,
                          manifests, oldest, newest)

    def verify(self, on_progress: Callable[[int], None] = lambda n: None,
               batch: int = 64) -> VerifyResult:
        """Re-hash every chunk against its id and drop the damaged ones.

        Reads in short transactions of ``batch`` chunks: a long read transaction
        would pin old pages and make a running mount's writes grow the file.
        """
        result, after = VerifyResult(), b""
        while True:
            bad, last = [], None
            with self._txn() as txn:
                cur = txn.cursor(db=self.chunks)
                found = cur.set_range(after) if after else cur.first()
                for _ in range(batch):
                    if not found:
                        break
                    key, value = cur.key(), cur.value()
                    if chunk_hash(value) != key.hex():
                        bad.append(key.hex())
                    result.checked += 1
                    result.bytes += len(value)
                    on_progress(len(value))
                    last = key
                    found = cur.next()
            if bad:
                log.warning("cache: %d damaged chunks dropped: %s", len(bad), ", ".join(bad))
                self.delete(bad)
                result.damaged += len(bad)
            if last is None or not found:
                return result
            after = last + b"\0"  # the next key after ``last``

    def clear(self) -> None:
        """Drop every chunk and manifest (the file keeps its size; the pages are reused)."""
        with self._txn(write=True) as txn:
            for db in (self.chunks, self.meta, self.manifests, self.refs):
                txn.drop(db, delete=False)

    def close(self) -> None:
        self.env.close()

"""A reference: the least a pyfuse3 filesystem can do to serve one file, for ``limits.py``.

    python benchmarks/minimal_fs.py CACHE_DIR MOUNTPOINT lmdb|ram      # as root; Ctrl-C or fusermount3 -u

``lmdb``: serves the one model file whose manifest a modelfs cache holds, straight
from that cache's LMDB map — one lookup per read in a transaction kept open for
the mount's life, a memoryview handed to pyfuse3 (no copy, no check, no readahead
of its own, no workers). ``ram``: serves 1 MiB-sized reads from a 64 MiB buffer in
memory (no disk at all). What modelfs does beyond this (verification, readahead,
loading missing chunks, statistics) is what a comparison with it measures; what
this costs is the price of pyfuse3, the kernel and the disk on this machine.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import lmdb
import pyfuse3
import trio

from modelfs.format.manifest import loads

RAM = 64 << 20
NAME = b"model.safetensors"


class Minimal(pyfuse3.Operations):
    def __init__(self, cache_dir: str, mode: str):
        super().__init__()
        self.env = lmdb.open(os.path.join(cache_dir, "blocks"), max_dbs=8, max_readers=512)
        self.chunks = self.env.open_db(b"chunks")
        with self.env.begin() as txn:
            _, data = next(iter(txn.cursor(db=self.env.open_db(b"manifests", txn=txn))))
        self.file = loads(bytes(data)).files[0]
        self.keys = [bytes.fromhex(h) for h, _ in self.file.chunks]
        self.txn = self.env.begin(buffers=True)  # nothing writes while this runs
        self.mode = mode
        self.ram = memoryview(os.urandom(RAM))

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
        a.st_size = 0 if inode == pyfuse3.ROOT_INODE else self.file.size
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def lookup(self, parent, name, ctx=None):
        if name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=2, keep_cache=True)

    async def read(self, fh, off, size):
        end = min(off + size, self.file.size)
        if self.mode == "ram":
            o = off % (RAM - size)
            return self.ram[o:o + end - off]
        parts = []
        i = self.file.chunk_index(off)
        while off < end:
            v = self.txn.get(self.keys[i], db=self.chunks)
            lo = off - self.file.offsets[i]
            hi = min(end - self.file.offsets[i], len(v))
            parts.append(v[lo:hi])
            off += hi - lo
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)


def main() -> None:
    cache_dir, mountpoint, mode = sys.argv[1:4]
    pyfuse3.init(Minimal(cache_dir, mode), mountpoint, set(pyfuse3.default_options) | {"fsname=minimal", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()

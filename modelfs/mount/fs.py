"""The FUSE operations: a thin, read-only translation from kernel requests to the
namespace (:mod:`.namespace`) and the chunk reader (:mod:`.reader`).

It knows nothing of S3 or LMDB. Handlers may only raise ``pyfuse3.FUSEError``
(anything else would end ``pyfuse3.main``), so every failure below is mapped:
a missing name → ENOENT, anything the store or cache did wrong → EIO, writes → EROFS.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pyfuse3

from ..errors import ModelfsError
from . import xattrs
from .namespace import Namespace, Node, mode_bits
from .readahead import Stream
from .reader import Reader

log = logging.getLogger(__name__)

T = TypeVar("T")
BLKSIZE = 128 << 10  # what buffered readers (Python, stdio) size their reads by


async def _guard(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except pyfuse3.FUSEError:
        raise
    except ModelfsError as e:
        log.error("%s: %s", what, e)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        log.exception("%s: unexpected error", what)
        raise pyfuse3.FUSEError(errno.EIO) from None


class _Blob:
    """A small file held in memory (a version's model.sig), read like a Stream."""

    def __init__(self, path: str, data: bytes | None):
        self.path, self.data = path, data or b""

    async def read(self, off: int, size: int) -> bytes:
        return self.data[off:off + size]


class ModelFS(pyfuse3.Operations):
    """Kernel requests → :class:`Namespace` (names, attributes, listings) and
    :class:`Reader` (bytes, through one :class:`Stream` per open file).

    Invariants: read-only (every change is EROFS, writable opens included); no handler
    raises anything but ``FUSEError`` (``_guard``); a directory handle lists the snapshot
    taken at ``opendir``; file handles are never reused while mounted."""
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, ns: Namespace, reader: Reader):
        super().__init__()
        self.ns = ns
        self.reader = reader
        self._streams: dict[int, Stream | _Blob] = {}
        self._dirs: dict[int, list[tuple[str, Node]]] = {}
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        # extra facts on the root (pid, stats): bytes, or an awaitable of bytes
        self.root_xattrs: dict[str, Callable[[], bytes | Awaitable[bytes]]] = {}

    # -- attributes ----------------------------------------------------------------
    def _node(self, inode: int) -> Node:
        node = self.ns.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = a.attr_timeout = node.ttl
        a.st_mode = mode_bits(node)
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = BLKSIZE
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    async def getattr(self, inode, ctx=None):
        return self.attrs(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            text = os.fsdecode(name)
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        child = await _guard(f"lookup {text!r}", lambda: self.ns.lookup(parent, text))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(child)

    # -- directories -------------------------------------------------------------
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # one snapshot per open: paging through a listing that changes underneath is wrong
        entries = await _guard(f"list inode {inode}", lambda: self.ns.children(node))
        fh = self._new_fh()
        self._dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(child), i + 1):
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._new_fh()
        self._streams[fh] = _Blob(node.path, node.data) if node.kind == "blob" else \
            Stream(self.reader, node.entry, node.manifest)
        # immutable content: keep the page cache across opens; no direct_io (mmap must work)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        stream = self._streams.get(fh)
        if stream is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await _guard(f"read {stream.path}@{off}+{size}", lambda: stream.read(off, size))

    async def release(self, fh):
        self._streams.pop(fh, None)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- extended attributes: the manifest's facts without reading a byte ----------
    def _xattrs(self, node: Node) -> dict[str, Callable[[], bytes | Awaitable[bytes]]]:
        out: dict[str, Callable[[], bytes | Awaitable[bytes]]] = {}
        if node.inode == pyfuse3.ROOT_INODE:
            out.update(self.root_xattrs)
        if node.model:
            out["model"] = lambda: node.model.encode()
        if node.version:
            out["version"] = lambda: node.version.encode()
        if node.tag:
            out["tag"] = lambda: node.tag.encode()
        if node.entry is not None:
            e = node.entry
            out["sha256"] = lambda: e.sha256.encode()
            out["chunks"] = lambda: str(len(e.chunks)).encode()
            out["description"] = lambda: json.dumps(e.description, sort_keys=True).encode()
        elif node.kind == "tree" and node.path == "" and node.version:
            out["created"] = lambda: self._created(node)
        return out

    async def _created(self, node: Node) -> bytes:
        """A version's creation time; a tag's directory may exist before its manifest is loaded."""
        m = node.manifest or await self.ns.manifest(node.model, node.version)
        return m.created.encode()

    async def getxattr(self, inode, name, ctx):
        key = os.fsdecode(name)
        fn = self._xattrs(self._node(inode)).get(xattrs.key_of(key) or "")
        if fn is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = fn()
        if inspect.isawaitable(value):  # live figures that need a worker thread (stats)
            value = await _guard(f"getxattr {key}", lambda: value)
        return value

    async def listxattr(self, inode, ctx):
        return [(xattrs.PREFIX + k).encode() for k in self._xattrs(self._node(inode))]

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLKSIZE
        total = sum(n.size for n in self.ns.nodes.values() if not n.is_dir)
        s.f_blocks = (total + BLKSIZE - 1) // BLKSIZE
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.ns.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- everything that would change something ------------------------------------
    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

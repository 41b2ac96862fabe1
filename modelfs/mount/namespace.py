"""The namespace a mount shows: which names exist, and the stable inode behind each.

Two forms:

* one model version at the root (a model ref or a manifest file);
* a whole registry::

      /<model>/<tag>/...             a tag: the version it points to now
      /<model>/versions/<id>/...     every immutable version, by id

Registry, model, tag and version listings come from the store and are kept for
``ttl`` seconds, so a moved tag shows up without a remount; when the store cannot
be reached the last listing is served (stale beats empty). Inside a version all
is immutable. Inodes are allocated per (view, path) and never reused during the
mount, so a tag that moves gets a new directory inode while files already open
keep reading the version they opened.

The store and the LMDB cache are blocking: every call leaves the trio thread
through :class:`~modelfs.transfer.lanes.Lanes` (its limiters and timeouts).
"""

from __future__ import annotations

import calendar
import logging
import posixpath
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelfsError, NotFoundError, TrustError
from ..registry.catalog import Catalog
from ..transfer.lanes import Lanes
from ..format.manifest import FileEntry, Manifest, all_directories
from ..format.pointers import PointerDir
from ..format.refs import VERSION_RE
from ..format.trust import SIGNATURE_FILE

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
IMMUTABLE_TTL = 24 * 3600.0


@dataclass(eq=False)
class Node:
    inode: int
    is_dir: bool
    mode: int  # permission bits
    mtime_ns: int
    ttl: float  # how long the kernel may cache this entry and its attributes
    kind: str  # registry | model | versions | tree (a version's dir) | file | blob | pointers (a checkout's dir)
    size: int = 0
    model: str | None = None
    version: str | None = None
    manifest: Manifest | None = None
    path: str = ""  # inside the version; "" is the version's root
    entry: FileEntry | None = None
    tag: str | None = None
    data: bytes | None = None  # a blob's bytes (model.sig)


@dataclass
class _VersionIndex:
    """Directory listings of one manifest, built once."""
    manifest: Manifest
    mtime_ns: int
    dirs: dict[str, int]  # path → mode
    children: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    signature: bytes | None = None  # shown as model.sig at the root

    @classmethod
    def build(cls, m: Manifest, signature: bytes | None = None) -> "_VersionIndex":
        try:
            mtime = calendar.timegm(time.strptime(m.created, "%Y-%m-%dT%H:%M:%SZ")) * 10**9
        except ValueError:
            mtime = 0
        dirs = all_directories(m)
        if m.file(SIGNATURE_FILE) is not None or SIGNATURE_FILE in dirs:
            signature = None  # the version's own file of that name wins (signing refuses such versions)
        idx = cls(m, mtime, dirs, {"": []}, signature)
        for d in dirs:
            idx.children.setdefault(d, [])
        for d in sorted(dirs):
            idx.children[posixpath.dirname(d)].append((posixpath.basename(d), True))
        for f in m.files:
            idx.children[posixpath.dirname(f.path)].append((posixpath.basename(f.path), False))
        if signature is not None:
            idx.children[""].append((SIGNATURE_FILE, False))
        for v in idx.children.values():
            v.sort()
        return idx


class Namespace:
    """The names a mount shows and the node behind each (see the module's docstring).

    Invariants: an inode, once given to a (view, path), names it until unmount and is
    never reused; everything inside a version is immutable (cached by the kernel for
    ``IMMUTABLE_TTL``); a registry, model, tag or version listing is asked of the store
    at most once per ``ttl``, and while the store fails the last good listing is served;
    a manifest is indexed only after the catalog verified it (with trusted keys)."""

    def __init__(self, lanes: Lanes, catalog: Catalog | None, *, ttl: float = 30.0):
        self.lanes = lanes
        self.catalog = catalog
        self.registry = catalog.registry if catalog is not None else None
        self.ttl = ttl
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple, int] = {}
        self._next_inode = 2
        self._listings: dict[tuple, tuple[float, Any]] = {}
        self._indexes: dict[str, _VersionIndex] = {}
        self.started_ns = time.time_ns()
        self.pointers: PointerDir | None = None  # a checkout of pointer files, when that is the root

    # -- setting up the root -------------------------------------------------------
    def root_registry(self) -> Node:
        root = Node(1, True, 0o755, self.started_ns, self.ttl, "registry")
        self.nodes[1] = root
        return root

    def root_pointers(self, pointers: PointerDir) -> Node:
        self.pointers = pointers
        root = Node(1, True, 0o755, self.started_ns, self.ttl, "pointers")
        self.nodes[1] = root
        self._by_key[(("pd", ""), "")] = 1
        return root

    def root_version(self, name: str, version: str, manifest: Manifest, signature: bytes | None = None) -> Node:
        idx = self._index(version, manifest, signature)
        root = Node(1, True, 0o755, idx.mtime_ns, IMMUTABLE_TTL, "tree", model=name,
                    version=version, manifest=manifest)
        self.nodes[1] = root
        self._by_key[(("v", name, version), "")] = 1
        return root

    def needs_signature(self, version: str) -> bool:
        """Whether an indexed version shows no model.sig yet and could (no file of its own
        by that name)."""
        idx = self._indexes.get(version)
        return idx is not None and idx.signature is None and SIGNATURE_FILE not in idx.dirs \
            and idx.manifest.file(SIGNATURE_FILE) is None

    def add_signature(self, version: str, signature: bytes) -> None:
        """Show ``signature`` as the version's model.sig from now on (one looked up after
        the mount started serving)."""
        if not self.needs_signature(version):
            return
        idx = self._indexes[version]
        idx.signature = signature
        idx.children[""] = sorted(idx.children[""] + [(SIGNATURE_FILE, False)])

    # -- lookups -----------------------------------------------------------------
    def node(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    async def lookup(self, parent: Node, name: str) -> Node | None:
        for child_name, child in await self.children(parent, name):
            if child_name == name:
                return child
        return None

    async def children(self, node: Node, only: str | None = None) -> list[tuple[str, Node]]:
        """The entries of directory ``node``; with ``only``, at most that one (cheaper)."""
        if node.kind == "registry":
            models = await self._listing(("models",), self.registry.models)
            return [(m, self._model_node(m)) for m in models if only in (None, m)]
        if node.kind == "model":
            m = node.model
            out = [(VERSIONS_DIR, self._node(("vs", m), "", lambda i: Node(
                i, True, 0o755, self.started_ns, self.ttl, "versions", model=m)))] \
                if only in (None, VERSIONS_DIR) else []
            if only == VERSIONS_DIR:
                return out
            tags = await self._listing(("tags", m), lambda: self.catalog.tags(m))
            for tag, version in tags.items():
                if only in (None, tag) and tag != VERSIONS_DIR:
                    out.append((tag, self._version_root(("t", m, tag, version), m, version, tag)))
            return out
        if node.kind == "versions":
            m = node.model
            if only is not None:
                if not VERSION_RE.match(only):
                    return []
                try:
                    await self.manifest(m, only)  # a direct lookup: does this version exist (and verify)?
                except NotFoundError:
                    return []
                except TrustError as e:
                    log.warning("not showing %s@%s: %s", m, only, e)
                    return []
                return [(only, self._version_root(("v", m, only), m, only))]
            versions = await self._listing(("versions", m), lambda: self.catalog.versions(m))
            return [(v.version, self._version_root(("v", m, v.version), m, v.version))
                    for v in versions]
        if node.kind == "pointers":
            assert self.pointers is not None
            pointers = self.pointers
            entries = await self._listing(("dir", node.path), lambda: pointers.entries(node.path))
            out = []
            for e in entries:
                if only not in (None, e.name):
                    continue
                p = posixpath.join(node.path, e.name) if node.path else e.name
                if e.manifest is None:
                    out.append((e.name, self._pointer_dir(p)))
                else:  # looked up again after the TTL: a checkout may point it elsewhere
                    m = e.manifest
                    try:
                        await self._admit(m)
                    except TrustError as err:
                        log.warning("not showing pointer %s: %s", p, err)
                        continue
                    out.append((e.name, self._version_root(("v", m.name, m.version_id), m.name,
                                                           m.version_id, moving=True, key=("p", p))))
            return out
        if node.kind == "tree":
            await self.manifest(node.model, node.version)
            idx = self._indexes[node.version]
            view = self._view_of(node)
            out = []
            for child_name, is_dir in idx.children.get(node.path, ()):
                if only not in (None, child_name):
                    continue
                p = posixpath.join(node.path, child_name) if node.path else child_name
                out.append((child_name, self._tree_node(view, node, idx, p, is_dir)))
            return out
        return []

    # -- node construction -------------------------------------------------------
    def _node(self, view: tuple, path: str, make: Callable[[int], Node]) -> Node:
        key = (view, path)
        inode = self._by_key.get(key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._by_key[key] = inode
            self.nodes[inode] = make(inode)
        return self.nodes[inode]

    def _view_of(self, node: Node) -> tuple:
        return ("t", node.model, node.tag, node.version) if node.tag else ("v", node.model, node.version)

    def _model_node(self, m: str) -> Node:
        return self._node(("m", m), "", lambda i: Node(i, True, 0o755, self.started_ns, self.ttl,
                                                        "model", model=m))

    def _tree_node(self, view: tuple, parent: Node, idx: _VersionIndex, path: str, is_dir: bool) -> Node:
        def make(i: int) -> Node:
            if is_dir:
                return Node(i, True, idx.dirs.get(path, 0o755), idx.mtime_ns, IMMUTABLE_TTL, "tree",
                            model=parent.model, version=parent.version, manifest=idx.manifest,
                            path=path, tag=parent.tag)
            e = idx.manifest.file(path)
            if e is None and path == SIGNATURE_FILE and idx.signature is not None:
                return Node(i, False, 0o444, idx.mtime_ns, IMMUTABLE_TTL, "blob", size=len(idx.signature),
                            model=parent.model, version=parent.version, manifest=idx.manifest,
                            path=path, tag=parent.tag, data=idx.signature)
            mtime = idx.mtime_ns if e.mtime_ns is None else e.mtime_ns  # older manifests: publish time
            return Node(i, False, e.mode, mtime, IMMUTABLE_TTL, "file", size=e.size,
                        model=parent.model, version=parent.version, manifest=idx.manifest,
                        path=path, entry=e, tag=parent.tag)
        return self._node(view, path, make)

    def _pointer_dir(self, path: str) -> Node:
        return self._node(("pd", path), "", lambda i: Node(i, True, 0o755, self.started_ns, self.ttl,
                                                            "pointers", path=path))

    def _version_root(self, view: tuple, model: str, version: str, tag: str | None = None, *,
                      moving: bool = False, key: tuple = ()) -> Node:
        """A version's root directory; its manifest is loaded when it is first listed.
        ``key`` tells apart roots of one version shown at several places (pointer files)."""
        idx = self._indexes.get(version)
        # a tag's entry (or a pointer file's) must be looked up again after the TTL, to see it move
        ttl = self.ttl if tag or moving else IMMUTABLE_TTL
        return self._node(view + key, "", lambda i: Node(
            i, True, 0o755, idx.mtime_ns if idx else self.started_ns, ttl, "tree", model=model,
            version=version, manifest=idx.manifest if idx else None, tag=tag))

    def _index(self, version: str, manifest: Manifest, signature: bytes | None = None) -> _VersionIndex:
        idx = self._indexes.get(version)
        if idx is None:
            idx = self._indexes[version] = _VersionIndex.build(manifest, signature)
        return idx

    # -- store access --------------------------------------------------------------
    async def manifest(self, model: str, version: str) -> Manifest:
        """A version's manifest (the catalog: memory, then the LMDB cache, then the store;
        verified against a trusted signature when the mount has trusted keys)."""
        idx = self._indexes.get(version)
        if idx is not None:
            return idx.manifest
        m = await self.lanes.store_call(self.catalog.manifest, model, version)
        await self._admit(m, version)
        return m

    async def _admit(self, m: Manifest, version: str | None = None) -> None:
        """Index a manifest (with its signature, if it has one) once it is trusted."""
        version = version or m.version_id
        if version in self._indexes:
            return
        await self.lanes.store_call(self.catalog.verify, m, version)
        try:
            signature = await self.lanes.store_call(self.catalog.signature, m.name, version)
        except ModelfsError as e:  # shown when the store answers again (trusted mounts have it already)
            log.info("signature of %s@%s: %s", m.name, version, e)
            signature = None
        self._index(version, m, signature)

    async def _listing(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """``fn()`` from the store, kept ``ttl`` seconds; the last good value if the store fails."""
        now = time.monotonic()
        cached = self._listings.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            value = await self.lanes.store_call(fn)
        except ModelfsError as e:
            if cached is None:
                raise ModelfsError(f"listing {'/'.join(key)}: {e}") from None
            log.warning("listing %s: %s; serving the last known listing", "/".join(key), e)
            self._listings[key] = (now, cached[1])  # do not hammer a store that is down
            return cached[1]
        self._listings[key] = (now, value)
        return value


def mode_bits(node: Node) -> int:
    return (stat.S_IFDIR if node.is_dir else stat.S_IFREG) | node.mode

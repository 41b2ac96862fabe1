"""A registry's life cycle: retire versions (``rm``) and delete the chunks nothing uses (``gc``).

Chunks are shared by every version of every model, so only a whole-registry
mark-and-sweep can tell which ones are garbage, and it races with publishes: a
publish uploads chunks before its manifest references them, and reuses chunks
it finds in the store without uploading them again. ``docs/lifecycle.md``
writes the races down; the guards, in short:

* **Grace**: a chunk is deleted only if the store's own clock says it was
  written more than ``grace`` ago (24 h by default) — checked on a fresh HEAD
  just before its deletion, not on the listing taken at the start.
* **Re-mark**: the manifests are listed again right before deletions start and
  at least every ``REMARK_SECONDS`` while they run; a chunk a new manifest
  references is kept.
* **Leases**: every publish holds a lease object (``<prefix>/leases/``),
  refreshed while it runs. ``gc`` deletes nothing while a live lease exists:
  it checks before each burst of deletions, and a burst lasts at most
  ``BURST_SECONDS``. A publish waits ``BURST_SECONDS`` after taking its lease
  before it looks at the store, so every burst that began before its lease
  existed is over by then: any chunk that burst deleted, the publish sees as
  missing and uploads again. Nothing a publish relies on is deleted under it.

Invariant: ``gc`` never deletes a chunk that a manifest in the registry
references, nor one that a publish which started before the deletion will
reference, provided that publish keeps its lease fresh (any publish that does
not crash does).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ModelfsError, NotFoundError, UsageError
from ..format.manifest import utc_stamp
from .layout import Registry
from .store import ObjectInfo

log = logging.getLogger(__name__)

BURST_SECONDS = 1.0  # a publish waits this long after taking its lease (gc deletes within half of it after a check)
LEASE_REFRESH_SECONDS = 60.0  # a publish rewrites its lease this often
LEASE_TTL_SECONDS = 600.0  # a lease not refreshed for this long belongs to a dead publish
REMARK_SECONDS = 30.0  # gc lists the manifests again at least this often while deleting
DEFAULT_GRACE = 24 * 3600.0


# -- leases: the publish side -------------------------------------------------------

class Lease:
    """A publish in progress, visible to ``gc`` (a context manager around a publish).

    Entering writes the lease and waits ``BURST_SECONDS`` (see the module docstring);
    a thread rewrites it every ``LEASE_REFRESH_SECONDS``; leaving deletes it.
    """

    def __init__(self, registry: Registry, what: str):
        self.registry = registry
        self.key = registry.lease_key(uuid.uuid4().hex)
        self.doc = {"format": "modelfs-lease", "what": what, "host": socket.gethostname(),
                    "pid": os.getpid(), "started": utc_stamp()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.registry.store.put(self.key, json.dumps(self.doc, sort_keys=True).encode(), "application/json")

    def __enter__(self) -> Lease:
        self._write()
        t0 = time.monotonic()
        self._thread = threading.Thread(target=self._refresh, name="lease", daemon=True)
        self._thread.start()
        time.sleep(max(0.0, BURST_SECONDS - (time.monotonic() - t0)))
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_SECONDS):
            try:
                self._write()
            except ModelfsError as e:  # the publish itself will meet the same store
                log.warning("could not refresh publish lease %s: %s", self.key, e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.registry.store.delete(self.key)
        except ModelfsError as e:  # it expires on its own after LEASE_TTL_SECONDS
            log.warning("could not remove publish lease %s: %s", self.key, e)


# -- rm ---------------------------------------------------------------------------------

@dataclass
class Removed:
    version: str
    tags_removed: list[str]
    latest_moved_to: str | None  # where ``latest`` points now, if it pointed at the version


def remove_version(registry: Registry, name: str, version: str, *, force: bool = False) -> Removed:
    """Retire ``name@version``: delete its manifest (chunks stay until ``gc``). Refused
    while a tag points at it, unless ``force``: then those tags go too, and ``latest``
    moves to the newest remaining version."""
    registry.get_manifest(name, version)  # exists and is what it says
    tags = sorted(t for t, v in registry.tags(name).items() if v == version)
    if tags and not force:
        raise UsageError(f"{name}@{version} is tagged {', '.join(tags)}: move the tag(s) first "
                         "(modelfs tag), or pass --force to remove them with the version")
    latest_to = None
    # tags first, the manifest last: an interrupted rm never leaves a tag on a missing version
    if "latest" in tags:
        rest = [v for v in registry.versions(name) if v.version != version]
        if rest:
            latest_to = rest[-1].version
            registry.set_tag(name, "latest", latest_to)
        else:
            registry.delete_tag(name, "latest")
    for t in tags:
        if t != "latest":
            registry.delete_tag(name, t)
    registry.delete_version(name, version)
    return Removed(version, tags, latest_to)


# -- gc ---------------------------------------------------------------------------------

@dataclass
class ModelUse:
    versions: int = 0
    chunks: int = 0  # distinct chunks its versions reference
    bytes: int = 0  # their raw size


@dataclass
class GcReport:
    chunks: int = 0  # chunk objects in the store
    stored_bytes: int = 0
    referenced: int = 0
    unreferenced: int = 0
    unreferenced_bytes: int = 0
    young: int = 0  # unreferenced but within the grace period: kept
    young_bytes: int = 0
    candidates: list[ObjectInfo] = field(default_factory=list)  # old and unreferenced
    deleted: int = 0
    deleted_bytes: int = 0
    kept_on_recheck: int = 0  # referenced, rewritten or gone by the time of deletion
    stopped_by_lease: str | None = None  # a publish was running: the rest waits for a later gc
    models: dict[str, ModelUse] = field(default_factory=dict)
    # adopted versions (NAME@VERSION) and the foreign stores they read: never touched here
    adopted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def candidate_bytes(self) -> int:
        return sum(o.size for o in self.candidates)


class _Marks:
    """Chunks referenced by the registry's manifests; ``update`` reads only new manifests."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.chunks: set[str] = set()
        self.models: dict[str, ModelUse] = {}
        self._seen: set[tuple[str, str]] = set()
        self._mine: dict[str, set[str]] = {}
        self.adopted: dict[str, list[str]] = {}

    def update(self) -> None:
        """Mark from every manifest not read yet. Any manifest that cannot be read stops
        the collection: deleting on an incomplete mark could delete live chunks."""
        for name in self.registry.models():
            use = self.models.setdefault(name, ModelUse())
            mine = self._mine.setdefault(name, set())
            for v in self.registry.versions(name):
                if (name, v.version) in self._seen:
                    continue
                try:
                    m = self.registry.get_manifest(name, v.version)
                except NotFoundError:  # removed since it was listed: nothing to keep for it
                    continue
                except ModelfsError as e:
                    raise ModelfsError(f"gc stopped, nothing deleted after this point: cannot read "
                                       f"{name}@{v.version}: {e}") from None
                self._seen.add((name, v.version))
                if m.sources:
                    self.adopted[f"{name}@{v.version}"] = [src.url for src in m.sources]
                use.versions += 1
                for h, n in m.unique_chunks.items():
                    if h not in mine:
                        mine.add(h)
                        use.chunks += 1
                        use.bytes += n
                self.chunks |= mine


def store_clock(registry: Registry) -> Callable[[], float]:
    """The store's current time (its clock judges ages, not this host's): the modification
    time of a probe object, carried forward by this host's monotonic clock."""
    key = registry.ref.key("leases", f".clock-{uuid.uuid4().hex}")
    registry.store.put(key, b"")
    t0 = time.monotonic()
    try:
        info = registry.store.stat(key)
    finally:
        registry.store.delete(key)
    base = info.last_modified if info is not None else time.time()
    return lambda: base + (time.monotonic() - t0)


def live_lease(registry: Registry, now: float) -> str | None:
    """A publish in progress (its lease refreshed within the TTL), described; None if none."""
    for o in registry.store.list(registry.ref.key("leases") + "/"):
        if isinstance(o, ObjectInfo) and not o.key.rsplit("/", 1)[-1].startswith(".") \
                and now - o.last_modified < LEASE_TTL_SECONDS:
            return o.key
    return None


def collect(registry: Registry, *, grace: float = DEFAULT_GRACE, delete: bool = False,
            on_progress: Callable[[str, int, int], None] | None = None) -> GcReport:
    """``on_progress(phase, bytes_done, bytes_total)`` follows the deletions. Mark every chunk the registry's manifests reference, then (with ``delete``) sweep
    the unreferenced ones older than ``grace`` seconds, under the guards above."""
    progress = on_progress or (lambda phase, n, total: None)
    now = store_clock(registry)
    report = GcReport()
    listed = list(registry.chunks())
    report.chunks = len(listed)
    report.stored_bytes = sum(o.size for o in listed)
    marks = _Marks(registry)
    marks.update()
    report.models = marks.models
    report.adopted = marks.adopted
    t_listed = now()
    for o in listed:
        h = registry.chunk_of(o.key)
        if h in marks.chunks:
            report.referenced += 1
            continue
        report.unreferenced += 1
        report.unreferenced_bytes += o.size
        if t_listed - o.last_modified > grace:
            report.candidates.append(o)
        else:
            report.young += 1
            report.young_bytes += o.size
    if not delete or not report.candidates:
        return report

    marks.update()  # right before the first deletion
    last_mark = burst_start = time.monotonic()
    total, done = report.candidate_bytes, 0
    for i, o in enumerate(report.candidates):
        if time.monotonic() - burst_start >= BURST_SECONDS / 2 or i == 0:
            if time.monotonic() - last_mark >= REMARK_SECONDS:
                marks.update()
                last_mark = time.monotonic()
            lease = live_lease(registry, now())
            if lease is not None:
                report.stopped_by_lease = lease
                break
            burst_start = time.monotonic()
        progress("delete", done, total)
        done += o.size
        if registry.chunk_of(o.key) in marks.chunks:
            report.kept_on_recheck += 1
            continue
        fresh = registry.store.stat(o.key)  # re-checked just before deletion
        if fresh is None or now() - fresh.last_modified <= grace:
            report.kept_on_recheck += 1
            continue
        registry.store.delete(o.key)
        report.deleted += 1
        report.deleted_bytes += o.size
    progress("delete", total, total)
    return report

"""A directory of pointer files (a git checkout) as a registry.

``modelfs publish --manifest-out`` writes a version's manifest next to the code
that uses it; commit it, and the repository *is* the registry's index:
``modelfs mount ./models /models`` shows each ``*.modelfs.json`` under ``./models``
as a directory named by its path without the suffix, holding that version's
files. ``git checkout other-branch`` (or a deploy that pulls the repository)
changes what the mount shows within the metadata TTL, while open files keep the
version they opened. Chunks come from the registry the pointers name as their
origin (or ``--registry``).

Invariants: only safe path components are shown (hidden entries such as ``.git``
and names a manifest path could not hold are skipped); a pointer is shown only
after :func:`modelfs.format.manifest.loads` validated it, and only if its chunks live in
the mount's registry; a bad pointer is skipped with a warning, never fails a
listing. Directory symlinks are not followed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, ModelfsError, UsageError
from .manifest import MAX_MANIFEST_BYTES, Manifest, check_path, loads

log = logging.getLogger(__name__)

SUFFIX = ".modelfs.json"


@dataclass(frozen=True)
class Entry:
    name: str
    manifest: Manifest | None  # None: a directory


class PointerDir:
    def __init__(self, root: Path, origin: str | None = None):
        self.root = root.resolve()
        self.origin = origin  # show only pointers whose chunks are here (None: all)
        self._parsed: dict[str, tuple[tuple[int, int, int], Manifest | None]] = {}

    def entries(self, rel: str) -> list[Entry]:
        """The directories and pointers in directory ``rel`` of the checkout, sorted by name."""
        where = self.root / rel if rel else self.root
        if os.path.commonpath([self.root, os.path.realpath(where)]) != str(self.root):
            log.warning("%s now leads outside %s (a symlink): not shown", rel, self.root)
            return []
        try:
            with os.scandir(where) as it:
                found = list(it)
        except (FileNotFoundError, NotADirectoryError):  # removed by a checkout: now empty
            return []
        except OSError as e:
            raise ModelfsError(f"cannot list {self.root / rel}: {e.strerror}") from None
        models: dict[str, Entry] = {}
        dirs: dict[str, Entry] = {}
        for e in found:
            if e.name.startswith(".") or not _safe(e.name):
                continue
            if e.is_dir(follow_symlinks=False):
                dirs[e.name] = Entry(e.name, None)
            elif e.name.endswith(SUFFIX) and len(e.name) > len(SUFFIX) and e.is_file():
                m = self._manifest(e, f"{rel}/{e.name}" if rel else e.name)
                if m is not None:
                    models[e.name[:-len(SUFFIX)]] = Entry(e.name[:-len(SUFFIX)], m)
        for name in set(dirs) & set(models):
            log.warning("%s: both a directory and a pointer file; showing the pointer", f"{rel}/{name}")
            del dirs[name]
        return sorted([*dirs.values(), *models.values()], key=lambda x: x.name)

    def _manifest(self, e: os.DirEntry, rel: str) -> Manifest | None:
        try:
            st = e.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._parsed.get(rel)
            if cached is not None and cached[0] == key:
                return cached[1]
            m: Manifest | None = _read(e.path, rel)
        except OSError as err:
            log.warning("skipping pointer %s: %s", rel, err.strerror)
            return None
        except ManifestError as err:
            log.warning("skipping pointer %s: %s", rel, err)
            m = None
        if m is not None and self.origin is not None and m.origin not in (None, self.origin):
            log.warning("skipping pointer %s: its chunks are in %s, this mount reads %s "
                        "(mount with --registry to read them from here anyway)", rel, m.origin, self.origin)
            m = None
        self._parsed[rel] = (key, m)
        return m

    def origins(self) -> set[str]:
        """Every origin the checkout's pointers name (for choosing the mount's registry)."""
        out = set()
        for top, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.endswith(SUFFIX) and not name.startswith("."):
                    path = os.path.join(top, name)
                    try:
                        m = _read(path, os.path.relpath(path, self.root))
                    except (OSError, ManifestError):
                        continue
                    if m.origin:
                        out.add(m.origin)
        return out


def _read(path: str, rel: str) -> Manifest:
    """A pointer file's manifest, validated (OSError, ManifestError)."""
    with open(path, "rb") as f:
        return loads(f.read(MAX_MANIFEST_BYTES + 1), source=rel)  # loads refuses more than the max


def _safe(name: str) -> bool:
    try:
        name.encode("utf-8")
        check_path(name)
        return True
    except (UnicodeEncodeError, ManifestError):
        return False


def registry_url_for(root: Path, given: str | None) -> str:
    """The registry a checkout's pointers read chunks from: ``given``, or their one origin."""
    if given:
        return given
    origins = PointerDir(root).origins()
    if len(origins) == 1:
        return origins.pop()
    if not origins:
        raise UsageError(f"no pointer file (*{SUFFIX}) with an origin under {root}: "
                         "pass --registry s3://BUCKET/PREFIX")
    raise UsageError(f"the pointers under {root} name {len(origins)} registries "
                     f"({', '.join(sorted(origins))}): pass --registry to pick one")

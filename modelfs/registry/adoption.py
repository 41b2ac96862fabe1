"""The adoption table, and what a DVC or Git LFS checkout names, resolved against it.

``PREFIX/adopted/<md5|sha256>/<hex>.json``: one entry per foreign object this registry's
adoptions read (keyed by the object's own id: a DVC md5, a Git LFS oid), a one-file
adopted manifest — the object's chunks, its description and where it was read. Written
by ``modelfs adopt`` (:mod:`modelfs.ops.adopt`) after it cut an object; read by it to
skip objects read before, and by a mount of a checkout (``modelfs mount ./repo /models
--registry …``), which becomes a version with no store write at all (:func:`checkout_manifest`).
Entries are content-addressed: never changed, never needed by a reader of a version
(whose manifest holds everything), so ``gc`` leaves them.
"""

from __future__ import annotations

import concurrent.futures
import configparser
import dataclasses
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, NotFoundError, StoreError, UsageError
from ..format.chunking import DEFAULT_PARAMS
from ..format.foreign import LFS_LAYOUTS, LfsPointer, dir_listing, dvc_key, dvc_outputs, dvc_remote, lfs_key, lfs_pointers
from ..format.manifest import FileEntry, ForeignObject, ForeignStore, Manifest, check_path, loads, utc_stamp
from .layout import Registry

log = logging.getLogger(__name__)

LOOKUPS_AT_ONCE = 16  # table entries asked side by side
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


def plan(registry: Registry, checkout: Path, *, subdir: str | None = None, remote: str | None = None,
         lfs_store: str | None = None, lfs_layout: str = "sharded", lfs_endpoint: str | None = None,
         lfs_known: dict[str, Manifest] | None = None, lfs_url: str | None = None) -> list[Wanted]:
    """The files a checkout's DVC outputs and Git LFS pointers make (paths relative to
    ``subdir``, when given), each with its object; a DVC directory's listing is read here.
    ``lfs_known``: table entries by ``sha256/<oid>`` that say where pointers' objects are
    (a mount of a checkout), instead of ``lfs_store``; without either, the LFS server's
    batch API (``lfs_url``, or the checkout's) says where each object is."""
    if not checkout.is_dir():
        raise UsageError(f"{checkout} is not a directory")
    wanted = _dvc_wanted(registry, checkout, remote)
    pointers = lfs_pointers(checkout)
    if pointers and lfs_known is not None:
        for p in pointers:
            e = lfs_known.get(f"sha256/{p.oid}")
            if e is None:
                raise UsageError(f"{p.path}: Git LFS object {p.oid[:16]}… was never adopted into {registry.ref}: "
                                 "run `modelfs adopt` on this checkout first")
            f = e.files[0]
            assert f.foreign is not None
            wanted.append(Wanted(p.path, e.sources[0], f.foreign.key, sha256=p.oid, size=p.size))
    elif pointers and lfs_store is None:
        url = lfs_url or lfs_server_url(checkout)
        if url is None:
            raise UsageError(f"{checkout} has {len(pointers)} Git LFS pointer file(s) ({pointers[0].path}, ...) and "
                             "names no LFS server: pass --lfs-url URL (its batch API) or --lfs-store s3://BUCKET/PREFIX")
        wanted += _lfs_by_batch_api(url, pointers)
    elif pointers:
        assert lfs_store is not None
        if lfs_layout not in LFS_LAYOUTS:
            raise UsageError(f"--lfs-layout {lfs_layout!r}: one of {', '.join(LFS_LAYOUTS)}")
        src = ForeignStore("git-lfs", lfs_store.rstrip("/"), lfs_endpoint)
        wanted += [Wanted(p.path, src, lfs_key(p.oid, lfs_layout), sha256=p.oid, size=p.size) for p in pointers]
    if subdir:
        subdir = check_path(subdir.strip("/"), "--path")
        wanted = [dataclasses.replace(w, path=w.path[len(subdir) + 1:]) for w in wanted
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


LFS_BATCH = 100  # objects per batch request
LFS_TIMEOUT = 60.0


def lfs_server_url(checkout: Path) -> str | None:
    """The checkout's Git LFS endpoint, as git-lfs finds it: ``lfs.url`` in ``.lfsconfig``
    or ``.git/config``, else the ``origin`` remote's URL + ``/info/lfs`` (http(s) only)."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read([checkout / ".lfsconfig", checkout / ".git" / "config"], encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    url = cp.get("lfs", "url", fallback=None)
    if url:
        return url.strip()
    origin = cp.get('remote "origin"', "url", fallback="").strip()
    if origin.startswith(("http://", "https://")):
        return origin.rstrip("/") + ("/info/lfs" if origin.endswith(".git") else ".git/info/lfs")
    return None


def _lfs_by_batch_api(url: str, pointers: list[LfsPointer]) -> list[Wanted]:
    """Ask the LFS server where each pointer's object is (``POST …/objects/batch``, download):
    its answer is a presigned URL of its store; the object is read there, in place, with this
    host's own credentials (``MODELFS_LFS_AUTHORIZATION``: an Authorization header for the
    server, if it wants one)."""
    out = []
    for i in range(0, len(pointers), LFS_BATCH):
        part = pointers[i:i + LFS_BATCH]
        body = json.dumps({"operation": "download", "transfers": ["basic"],
                           "objects": [{"oid": p.oid, "size": p.size} for p in part]}).encode()
        headers = {"Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"}
        if os.environ.get("MODELFS_LFS_AUTHORIZATION"):
            headers["Authorization"] = os.environ["MODELFS_LFS_AUTHORIZATION"]
        req = urllib.request.Request(url.rstrip("/") + "/objects/batch", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=LFS_TIMEOUT) as r:
                doc = json.loads(r.read(64 << 20))
        except urllib.error.HTTPError as e:
            raise StoreError(f"the Git LFS server at {url} refused the batch request: HTTP {e.code}") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"the Git LFS server at {url} did not answer its batch API: {e}") from None
        answers = {o.get("oid"): o for o in doc.get("objects", []) if isinstance(o, dict)} \
            if isinstance(doc, dict) else {}
        for p in part:
            o = answers.get(p.oid, {})
            href = ((o.get("actions") or {}).get("download") or {}).get("href") if isinstance(o, dict) else None
            if not isinstance(href, str):
                why = (o.get("error") or {}).get("message", "no download action") if isinstance(o, dict) else "no answer"
                raise UsageError(f"{p.path}: the Git LFS server at {url} has no object {p.oid[:16]}… ({why})")
            src, key = _s3_location(href, p.path)
            out.append(Wanted(p.path, src, key, sha256=p.oid, size=p.size))
    return out


def _s3_location(href: str, what: str) -> tuple[ForeignStore, str]:
    """(the store, the object's key) a presigned S3 URL names: path style
    (``http://HOST/BUCKET/KEY``) or AWS virtual-hosted (``https://BUCKET.s3….amazonaws.com/KEY``)."""
    u = urllib.parse.urlsplit(href)
    path = urllib.parse.unquote(u.path).lstrip("/")
    host = u.hostname or ""
    m = re.fullmatch(r"([a-z0-9][a-z0-9.-]+)\.s3[.-]([a-z0-9-]+\.)?amazonaws\.com", host)
    if m:
        bucket, key, endpoint = m.group(1), path, None
    else:
        bucket, _, key = path.partition("/")
        endpoint = f"{u.scheme}://{u.netloc}"
    if u.scheme not in ("http", "https") or not bucket or not key:
        raise UsageError(f"{what}: the LFS server's download URL is not an S3 object ({u.scheme}://{host}/…): "
                         "only servers that keep objects in S3 can be adopted from")
    return ForeignStore("git-lfs", f"s3://{bucket}", endpoint), _safe_key(key, what)


def _safe_key(key: str, what: str) -> str:
    try:
        return check_path(key, f"{what}: object key")
    except ManifestError as e:
        raise UsageError(str(e)) from None


def _dvc_wanted(registry: Registry, checkout: Path, remote: str | None) -> list[Wanted]:
    outs = dvc_outputs(checkout) if (checkout / ".dvc").is_dir() else []
    if not outs:
        return []
    r = dvc_remote(checkout, remote)
    src = ForeignStore("dvc", r.url, r.endpoint)
    wanted = []
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
    return wanted


def adopted_file(w: Wanted, e: FileEntry, sources: list[ForeignStore] | None) -> FileEntry:
    """The version's entry for ``w``, read as ``e`` (a table entry's file): its bytes in
    ``w``'s object, whose store joins ``sources`` (the manifest's) if it is not there yet;
    ``sources`` None: a native file (the registry holds every chunk)."""
    foreign = None
    if sources is not None:
        if w.source not in sources:
            sources.append(w.source)
        foreign = ForeignObject(sources.index(w.source), w.key, w.md5)
    return FileEntry(w.path, e.size, 0o644, e.sha256, e.chunks, e.description, by_blocks=True, foreign=foreign)


def is_checkout(path: Path) -> bool:
    """Whether ``path`` is a DVC checkout, or a Git checkout that keeps files in Git LFS."""
    try:
        return (path / ".dvc").is_dir() or "filter=lfs" in (path / ".gitattributes").read_text(errors="replace")
    except OSError:
        return False


def checkout_manifest(registry: Registry, checkout: Path, *, remote: str | None = None) -> Manifest:
    """A checkout whose objects were adopted into ``registry``, as a version (never stored):
    each DVC output and LFS pointer at its path, read in place. Every object must be in
    the adoption table (else one line says to adopt first); nothing is read but the
    table and DVC directory listings."""
    lfs_known = table_entries(registry, [f"sha256/{p.oid}" for p in lfs_pointers(checkout)])
    wanted = plan(registry, checkout, remote=remote, lfs_known=lfs_known)
    known = table_entries(registry, [w.table_id for w in wanted if w.md5]) | lfs_known
    sources: list[ForeignStore] = []
    files = []
    for w in wanted:
        e = known.get(w.table_id)
        if e is None:
            raise UsageError(f"{w.path}: {w.what.split(' (', 1)[1][:-1]} was never adopted into {registry.ref}: "
                             "run `modelfs adopt` on this checkout first")
        files.append(adopted_file(w, e.files[0], sources))
    stamp = max((p.stat().st_mtime for p in [checkout / ".dvc", checkout / ".gitattributes"] if p.exists()),
                default=0)
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in checkout.resolve().name).lstrip("._-") or "checkout"
    return Manifest(name=name[:128], created=utc_stamp(stamp),
                    files=tuple(files), directories=(), chunking=DEFAULT_PARAMS.as_json(), origin=str(registry.ref),
                    sources=tuple(sources))


# -- the adoption table: objects read before, by content ------------------------------------------

def _table_key(registry: Registry, table_id: str) -> str:
    return registry.ref.key(TABLE, f"{table_id}.json")


def table_entries(registry: Registry, table_ids: list[str]) -> dict[str, Manifest]:
    """The table entries there are of ``table_ids`` (``md5/<hex>``, ``sha256/<hex>``): each
    a one-file adopted manifest (its chunks, description, and where it was read)."""
    def one(table_id: str) -> tuple[str, Manifest | None]:
        key = _table_key(registry, table_id)
        try:
            data = registry.store.get(key)
        except NotFoundError:
            return table_id, None
        try:
            entry = loads(data, source=key)
            if len(entry.files) != 1 or entry.files[0].foreign is None:
                raise ManifestError("not one adopted file")
            return table_id, entry
        except ManifestError as e:
            log.warning("adoption table entry %s is damaged (%s): the object is read again", key, e)
            return table_id, None
    with concurrent.futures.ThreadPoolExecutor(LOOKUPS_AT_ONCE) as pool:
        return {k: e for k, e in pool.map(one, table_ids) if e is not None}


def remember(registry: Registry, w: Wanted, e: FileEntry) -> int:
    """Write the table entry of ``w`` read as ``e``: the bytes it took."""
    entry = Manifest(name="adopted", created=utc_stamp(),
                     files=(FileEntry("object", e.size, 0o644, e.sha256, e.chunks, e.description,
                                      foreign=ForeignObject(0, w.key, w.md5)),),
                     directories=(), chunking=DEFAULT_PARAMS.as_json(), sources=(w.source,))
    data = entry.to_bytes()
    registry.store.put(_table_key(registry, w.table_id), data, "application/json")
    return len(data)

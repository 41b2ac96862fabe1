"""What DVC and Git LFS checkouts say about their files, and where their stores keep them.

Pure parsing (no store, no network): ``modelfs adopt`` (:mod:`modelfs.ops.adopt`) reads a
checkout's ``.dvc`` files, ``dvc.lock`` and ``.dvc/config``, and Git LFS pointer files,
with these functions, then reads the objects they name in place. Facts they rest on
(``docs/adopt.md``):

* DVC 3: an output is ``{path, md5, size, hash: md5}`` (``nfiles`` for a directory, whose
  md5 ends in ``.dir``); the remote keeps each file at ``files/md5/<md5[:2]>/<md5[2:]>``
  and a directory's listing (a JSON list of ``{md5, relpath}``) at its ``.dir`` md5.
  DVC 2 (no ``hash`` field): ``<md5[:2]>/<md5[2:]>``, and text files were hashed after
  CRLF → LF (``md5-dos2unix``), so their md5 is not their bytes'.
* Git LFS: a pointer is ``version https://git-lfs.github.com/spec/v1``, ``oid
  sha256:<hex>``, ``size N``; servers keep object ``oid`` at ``oid[0:2]/oid[2:4]/oid[4:]``
  (Gitea, Forgejo, GitLab: ``sharded``) or ``<org>/<repo>/<oid>`` (giftless: ``flat``
  under a prefix naming the repository).

Everything a checkout says is untrusted: paths are checked like a manifest's (no ``..``,
absolute or NUL), hashes must be hex, sizes integers; any defect is one
:class:`~modelfs.errors.UsageError` line naming the file.
"""

from __future__ import annotations

import configparser
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, UsageError
from .manifest import MAX_FILE_SIZE, check_path

LFS_SPEC = "https://git-lfs.github.com/spec/v1"
LFS_POINTER_MAX = 1024  # git-lfs never reads a larger file as a pointer
LFS_LAYOUTS = ("sharded", "flat")
_MD5 = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
DVC_DIRS = {".git", ".dvc"}  # never walked for pointers or .dvc files


@dataclass(frozen=True)
class DvcRemote:
    name: str
    url: str  # s3://BUCKET[/PREFIX]
    endpoint: str | None  # its endpointurl


@dataclass(frozen=True)
class DvcOut:
    """One DVC output: a file, or a directory (``md5`` ending in ``.dir``)."""
    path: str  # relative to the checkout
    md5: str  # without ".dir"
    is_dir: bool
    size: int | None
    legacy: bool  # DVC 2 (md5-dos2unix, the remote's old layout)
    declared_in: str  # the .dvc file or dvc.lock that names it

    def key(self) -> str:
        """Its object's key under the remote's prefix."""
        name = self.md5 + (".dir" if self.is_dir else "")
        return dvc_key(name, self.legacy)


@dataclass(frozen=True)
class LfsPointer:
    path: str  # relative to the checkout
    oid: str  # sha256 hex
    size: int


def dvc_key(name: str, legacy: bool = False) -> str:
    """``files/md5/ab/cdef…`` (DVC 3) or ``ab/cdef…`` (DVC 2) of md5 ``name``."""
    return f"{'' if legacy else 'files/md5/'}{name[:2]}/{name[2:]}"


def lfs_key(oid: str, layout: str) -> str:
    if layout == "sharded":
        return f"{oid[0:2]}/{oid[2:4]}/{oid[4:]}"
    if layout == "flat":
        return oid
    raise UsageError(f"unknown Git LFS layout {layout!r}: one of {', '.join(LFS_LAYOUTS)}")


def _safe(path: object, what: str) -> str:
    try:
        return check_path(path, what)
    except ManifestError as e:
        raise UsageError(str(e)) from None


# -- DVC ------------------------------------------------------------------------------

def dvc_remote(checkout: Path, name: str | None = None) -> DvcRemote:
    """The remote ``name`` (default: ``core.remote``) from ``.dvc/config`` and
    ``.dvc/config.local`` (which overrides it, as in DVC)."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    files = [checkout / ".dvc" / "config", checkout / ".dvc" / "config.local"]
    try:
        read = cp.read([str(f) for f in files], encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{checkout}/.dvc/config: not a DVC configuration ({str(e).splitlines()[0]})") from None
    if not read:
        raise UsageError(f"{checkout} is not a DVC checkout (no .dvc/config)")
    remotes = {}
    for section in cp.sections():
        m = re.fullmatch(r"""['"]?remote\s+"([^"]+)"['"]?""", section.strip())
        if m:
            remotes[m.group(1)] = cp[section]
    name = name or cp.get("core", "remote", fallback=None)
    if not name:
        raise UsageError(f"{checkout}/.dvc/config names no default remote (core.remote): pass --remote NAME")
    if name not in remotes:
        raise UsageError(f"{checkout}/.dvc/config has no remote {name!r} (it has: {', '.join(remotes) or 'none'})")
    url = remotes[name].get("url", "").rstrip("/")
    if not url.startswith("s3://"):
        raise UsageError(f"DVC remote {name!r} is {url or 'without a url'}: only s3:// remotes can be adopted")
    endpoint = remotes[name].get("endpointurl") or None
    return DvcRemote(name, url, endpoint.rstrip("/") if endpoint else None)


def dvc_outputs(checkout: Path) -> list[DvcOut]:
    """Every output the checkout's ``.dvc`` files and ``dvc.lock`` files declare."""
    import yaml

    outs: list[DvcOut] = []
    for f in sorted(_walk(checkout)):
        if f.name != "dvc.lock" and f.suffix != ".dvc":
            continue
        rel = f.relative_to(checkout).as_posix()
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"{rel}: not a DVC file ({str(e).splitlines()[0]})") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{rel}: not a DVC file (not a mapping)")
        if f.name == "dvc.lock":
            stages = doc.get("stages", {})
            if not isinstance(stages, dict):
                raise UsageError(f"{rel}: stages is not a mapping")
            raw = [o for st in stages.values() if isinstance(st, dict) for o in (st.get("outs") or [])]
        else:
            raw = doc.get("outs") or []
        if not isinstance(raw, list):
            raise UsageError(f"{rel}: outs is not a list")
        base = posixpath.dirname(rel)
        for o in raw:
            outs.append(_dvc_out(o, base, rel))
    return outs


def _dvc_out(o: object, base: str, rel: str) -> DvcOut:
    if not isinstance(o, dict):
        raise UsageError(f"{rel}: an output is not a mapping")
    path = _safe(o.get("path"), f"{rel}: output path")
    md5 = o.get("md5")
    if not isinstance(md5, str):
        raise UsageError(f"{rel}: output {path!r} has no md5 (not pushed, or not an md5 output)")
    is_dir = md5.endswith(".dir")
    md5 = md5.removesuffix(".dir")
    if not _MD5.fullmatch(md5):
        raise UsageError(f"{rel}: output {path!r}: md5 {o.get('md5')!r} is not 32 hex digits"[:300])
    size = o.get("size")
    if size is not None and (type(size) is not int or not 0 <= size <= MAX_FILE_SIZE):
        raise UsageError(f"{rel}: output {path!r}: size {size!r} is not a byte count"[:300])
    hash_name = o.get("hash")
    if hash_name not in (None, "md5"):
        raise UsageError(f"{rel}: output {path!r}: hash {hash_name!r} is not one modelfs reads (md5)"[:300])
    full = posixpath.join(base, path) if base else path
    return DvcOut(_safe(full, f"{rel}: output path"), md5, is_dir, size, hash_name is None, rel)


def dir_listing(data: bytes, what: str) -> list[tuple[str, str]]:
    """A ``.dir`` object: ``[(relpath, md5)]``, checked."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{what}: a DVC directory listing that is not JSON") from None
    if not isinstance(doc, list):
        raise UsageError(f"{what}: a DVC directory listing that is not a list")
    out = []
    for e in doc:
        if not isinstance(e, dict) or not isinstance(e.get("md5"), str) or not _MD5.fullmatch(e["md5"]):
            raise UsageError(f"{what}: an entry without a 32-hex-digit md5: {str(e)[:100]}")
        out.append((_safe(e.get("relpath"), f"{what}: relpath"), e["md5"]))
    return out


# -- Git LFS ---------------------------------------------------------------------------

def lfs_pointer(data: bytes, what: str) -> LfsPointer | None:
    """The pointer ``data`` is (``what`` its path), or None when it is not one at all; a
    pointer that is malformed (an oid that is not hex, a size that is not a count) is an error."""
    if len(data) > LFS_POINTER_MAX or not data.startswith(b"version "):
        return None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None
    fields = dict(line.split(" ", 1) for line in lines if " " in line)
    if fields.get("version") != LFS_SPEC:
        return None
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not oid.startswith("sha256:") or not _SHA256.fullmatch(oid[7:]):
        raise UsageError(f"{what}: a Git LFS pointer whose oid {oid[:80]!r} is not sha256:<64 hex digits>")
    if not size.isdigit() or int(size) > MAX_FILE_SIZE:
        raise UsageError(f"{what}: a Git LFS pointer whose size {size[:40]!r} is not a byte count")
    return LfsPointer(_safe(what, "pointer path"), oid[7:], int(size))


def lfs_pointers(checkout: Path) -> list[LfsPointer]:
    """Every Git LFS pointer file in the checkout (outside ``.git`` and ``.dvc``)."""
    out = []
    for f in sorted(_walk(checkout)):
        try:
            if f.is_symlink() or f.stat().st_size > LFS_POINTER_MAX:
                continue
            data = f.read_bytes()
        except OSError:
            continue
        p = lfs_pointer(data, f.relative_to(checkout).as_posix())
        if p is not None:
            out.append(p)
    return out


def _walk(root: Path):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in DVC_DIRS)
        for name in files:
            yield Path(d) / name

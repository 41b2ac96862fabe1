"""What a mount shows, resolved: by the daemon, or beside its start by a helper process.

A cold start costs boto3's import and client (~0.17 CPU-s), the ref's requests (the
encryption marker, the tag, the manifest, the signature: a round trip each, one after
the other) and the daemon's own imports (FUSE, trio, the mount: ~0.12 s); in one process
they come one after the other. So ``modelfs mount`` of a model ref first forks a
short-lived helper (:func:`resolve_ahead`: before anything heavy is imported, while no
thread or LMDB environment exists) that makes exactly the calls a cold daemon would
(:func:`resolve_source`, then :func:`start_signature`), which record the tag's
resolution, the manifest and its signature in the block cache, and says on a pipe which
version it found. The daemon imports meanwhile, then builds its source from the cache
alone (:func:`~modelfs.registry.source.as_resolved`), sending no request before it
serves. A cold start's first reads need signed URLs, and a daemon of its own would need
boto3's import and client for them (~0.15 CPU-s) before it could serve; so a helper
that goes to the store says so at once, and where (``STORE ORIGIN``: the daemon has its
workers open their connections there meanwhile), and also signs GET URLs of the first
chunks of every file (``SIGNED``) for the daemon, which makes its own client only once
it serves, beside those first reads. An error the helper met (a bad ref or key, a store down with nothing cached)
the daemon raises as its own, so it is reported as before and met only once; a helper
that dies without an answer leaves the daemon to resolve by itself. A whole registry, a
manifest file, pointer files and a checkout are resolved by the daemon alone, as before.
Measured (docs/benchmarks.md): a cold start with the store on this 2-core host took 0.57 s
while the daemon made its client before serving, 0.40 s now; behind 20–50 ms of round
trips the helper's requests bound it.

Light on purpose (no FUSE, trio or boto3 at import): the command imports it before it forks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .. import errors, logs
from ..errors import ModelfsError
from ..format.refs import is_model_ref

if TYPE_CHECKING:  # imported where used: the command forks the helper before importing them
    from ..cache import BlockCache
    from ..format.manifest import Manifest
    from ..registry.source import Source
    from .settings import SourceSpec

log = logging.getLogger(__name__)

STORE = "STORE"  # the helper's first line when it makes an S3 client: "STORE ORIGIN" (where its URLs go)
SIGNED = "SIGNED"  # a line "SIGNED KEY URL": a GET URL the helper signed for the daemon
SIGN_AHEAD = 64  # at most this many chunks' URLs (~0.13 ms of the helper's CPU each)
SIGN_AHEAD_SECONDS = 3600  # how long they are valid; a fetch worker's URL needs 900 s
MAX_FD = 4096  # the helper closes every descriptor below this but its answer's and 0-2


def resolve_source(spec: SourceSpec, cache: BlockCache | None = None, ahead: Ahead | None = None,
                   on_store: Callable[[str], object] = lambda origin: None) -> Source:
    """What the mount shows; with trusted keys, a version is resolved only if it verifies.
    A tag this host resolved within the metadata TTL is not asked again (a warm start
    then needs no store request), nor one its helper (``ahead``) just resolved, which
    calls ``on_store`` (see :meth:`Ahead.result`)."""
    from ..format.refs import parse_model
    from ..registry.layout import open_registry
    from ..registry.source import as_resolved, resolve

    if ahead is not None:
        mref = parse_model(spec.source)
        registry = open_registry(mref.registry, spec.store, spec.key, check=False)
        version = ahead.result(on_store)  # raises what the helper met
        if version is not None:
            # the first cold reads go out on the helper's URLs; the daemon's own client is made
            # once it serves (daemon.py: _after_ready)
            registry.store.adopt_signed(ahead.signed, ahead.since + SIGN_AHEAD_SECONDS)
            return as_resolved(registry, mref.name, version, trust=spec.trust, cache=cache, sealed=spec.sealed)
    return resolve(spec.source, spec.store, key=spec.key, trust=spec.trust, registry_url=spec.registry_url,
                   cache=cache, sealed=spec.sealed, need_registry=True, whole_registry_ok=True,
                   offline_ok=True, fresh_for=spec.ttl)


def root_signature(source: Source, *, fresh_for: float | None = None) -> bytes | None:
    """The signature of a single-version mount's version, for model.sig (None: unsigned or,
    without trusted keys, not reachable now; with ``fresh_for``, from the cache alone:
    see :meth:`Catalog.signature`)."""
    assert source.catalog is not None and source.model is not None and source.version is not None
    try:
        return source.catalog.signature(source.model, source.version, fresh_for=fresh_for)
    except ModelfsError as e:
        log.info("signature of %s@%s: %s", source.model, source.version, e)
        return None


def start_signature(source: Source, ttl: float, ahead: Ahead | None = None) -> bytes | None:
    """A single-version mount's signature at its start: from the store if this process
    went there for the source anyway, else from the cache alone (a start from the cache,
    or from what its helper ``ahead`` recorded, makes no request before it serves; a
    signature the cache does not know is looked up once serving, and model.sig appears
    then). ``ttl``: how old a cached "unsigned" may be."""
    assert source.catalog is not None
    if ahead is not None and ahead.version is not None:
        return root_signature(source, fresh_for=ahead.fresh_for(ttl))
    warm = not source.catalog.registry.store.connected
    return root_signature(source, fresh_for=ttl if warm else None)


class Ahead:
    """The helper process resolving a mount's source, and the read end of its answer.

    Invariants: the helper is reaped once, by whoever reads its answer (:meth:`result`),
    gives it up (:meth:`abandon`) or, not reading it, waits for it (:meth:`reap`); the
    answer's last line is ``OK VERSION`` or ``ERROR CLASS MESSAGE``, after a line ``STORE
    ORIGIN`` if the helper made an S3 client and then lines ``SIGNED KEY URL``; what the helper
    recorded in the cache, and every URL it signed, is newer than ``since``."""

    def __init__(self, pid: int, fd: int, since: float):
        self.pid, self.since = pid, since
        self.fd: int | None = fd
        self.reaped = False  # or not ours to reap
        self.version: str | None = None  # what it answered
        self.went_to_store = False  # it made an S3 client: the start is cold
        self.origin: str | None = None  # where the store's URLs go (scheme://host[:port])
        self.signed: dict[str, str] = {}  # key → a GET URL it signed, valid SIGN_AHEAD_SECONDS from `since`

    def in_sibling(self) -> Ahead:
        """This, in a process forked after the helper (a background start's daemon): it reads
        the answer, but the helper is its parent's child, to reap or end."""
        self.reaped = True
        return self

    def result(self, on_store: Callable[[str], object] = lambda origin: None) -> str | None:
        """The version the helper found (None: it died without saying; resolve alone).
        Raises the ModelfsError it met, as its class. Sets :attr:`went_to_store`,
        :attr:`origin` and :attr:`signed` from what it said before; ``on_store(origin)`` is
        called (here) as soon as it says it made an S3 client: the start is cold, and the
        first reads will go to ``origin``."""
        assert self.fd is not None
        data, answer_at, answering = b"", 0, False  # the answer starts at answer_at (it may span lines)
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
                while not answering and (end := data.find(b"\n", answer_at)) >= 0:
                    if self._said(data[answer_at:end].decode(errors="replace"), on_store):
                        answer_at = end + 1
                    else:
                        answering = True
        finally:
            self.forget()
            self.reap()
        word, _, rest = data[answer_at:].decode(errors="replace").strip().partition(" ")
        if word == "OK" and rest:
            self.version = rest
            return rest
        if word == "ERROR":
            name, _, message = rest.partition(" ")
            cls = getattr(errors, name, None)
            raise (cls if isinstance(cls, type) and issubclass(cls, ModelfsError) else ModelfsError)(message)
        log.warning("the helper resolving the source (pid %d) gave no answer: resolving it here", self.pid)
        return None

    def _said(self, line: str, on_store: Callable[[str], object]) -> bool:
        """Take ``line``, said before the answer (``STORE ORIGIN``: ``on_store`` is called
        now; ``SIGNED KEY URL``); False if it is not such a line: the answer starts there."""
        if line.startswith(STORE + " "):
            if not self.went_to_store:
                self.went_to_store = True
                self.origin = line[len(STORE) + 1:] or None
                if self.origin is not None:
                    on_store(self.origin)
            return True
        if line.startswith(SIGNED + " ") and len(parts := line.split(" ")) == 3:
            self.signed[parts[1]] = parts[2]
            return True
        return False

    def fresh_for(self, ttl: float) -> float:
        """How old a cache record may be and still count as fresh: the metadata TTL, or what
        the helper recorded since it started, whichever is longer."""
        return max(ttl, time.time() - self.since + 1.0)

    def forget(self) -> None:
        """Close this process's end of the answer (the waiting command, which never reads it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reap(self) -> None:
        """Wait for the helper to exit (it does once it answered, or found nobody to answer)."""
        if not self.reaped:
            self.reaped = True
            os.waitpid(self.pid, 0)

    def abandon(self) -> None:
        """Nobody will read the answer (the daemon failed first): end the helper now."""
        if not self.reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.forget()
        self.reap()


def resolve_ahead(settings: dict[str, Any], *, log_path: Path | None = None) -> Ahead | None:
    """Fork the helper that resolves the mount's source (``settings``: :func:`modelfs.config.resolve`'s)
    into its cache while the daemon starts (see the module's docstring); None where it
    cannot help. Call before anything heavy is imported: no thread and no LMDB
    environment may exist. ``log_path``: where the helper logs (the daemon's log), else
    this process's stderr."""
    if not is_model_ref(settings["source"]):
        return None
    r, w = os.pipe()
    since = time.time()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _helper(settings, log_path, w)
    os.close(w)
    return Ahead(pid, r, since)


def _helper(settings: dict[str, Any], log_path: Path | None, answer: int) -> NoReturn:
    """In the forked helper: resolve into the cache, answer on ``answer``, exit; never return."""
    line = ""  # the answer, but for its STORE line (sent as soon as it is known)
    try:
        # hold nothing of the command's (a parent waiting for a ready pipe's end, a terminal)
        os.closerange(3, answer)
        os.closerange(answer + 1, MAX_FD)
        if log_path is not None:  # the daemon's log, where its own lines about resolving went
            logs.to_file(log_path, settings["log_level"])
        else:  # stderr stays the daemon's (systemd's journal, a terminal)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.close(null)
        from ..cache import BlockCache, cache_root
        from ..registry.store import Store
        from .settings import SourceSpec, cache_dir_of

        def cold(store: Store) -> None:  # the daemon learns now that the start is cold, and where to
            try:
                origin = store.origin()
            except ModelfsError:
                origin = ""  # (signing cannot fail once the client exists; were it to, no harm)
            _say(answer, f"{STORE} {origin}\n".encode(), quiet=True)

        Store.on_first_client = cold
        spec = SourceSpec.of(settings)
        cache = BlockCache(cache_root(cache_dir_of(settings), sealed=spec.sealed), settings["cache_size"])
        try:
            source = resolve_source(spec, cache)
            assert source.version is not None and source.catalog is not None and source.manifest is not None
            start_signature(source, spec.ttl)  # recorded too: the daemon's model.sig needs no request
        finally:
            cache.close()
        registry = source.catalog.registry
        if registry.store.connected:  # a cold start: its first reads will want these
            for h in first_chunks(source.manifest, SIGN_AHEAD):
                key = registry.chunk_key(h)
                line += f"{SIGNED} {key} {registry.store.presign(key, SIGN_AHEAD_SECONDS)}\n"
        line += f"OK {source.version}"
    except ModelfsError as e:
        line = f"ERROR {type(e).__name__} {e}"
    except KeyboardInterrupt:  # Ctrl-C at the command: no answer, no traceback
        pass
    except BaseException:  # a bug: the daemon resolves by itself, and meets it with its traceback
        traceback.print_exc()
    try:
        _say(answer, (line + "\n").encode())
    except OSError:
        pass  # the daemon is gone
    finally:
        sys.stderr.flush()
        os._exit(0)


def first_chunks(manifest: Manifest, limit: int) -> list[str]:
    """Up to ``limit`` chunk ids a mount's first reads are likely to want: every file's
    first chunk (headers, small files), then every file's second, and so on; adopted
    files' chunks not among them (they are read in place, from another store)."""
    files = [f.chunks for f in manifest.files if f.foreign is None and f.chunks]
    out: dict[str, None] = {}
    for depth in range(max((len(c) for c in files), default=0)):
        for chunks in files:
            if depth < len(chunks):
                out.setdefault(chunks[depth][0])
                if len(out) >= limit:
                    return list(out)
    return list(out)


def _say(fd: int, data: bytes, *, quiet: bool = False) -> None:
    """All of ``data`` into ``fd`` (``quiet``: a reader gone is no error)."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        if not quiet:
            raise

"""The helper that resolves a mount's source beside the daemon's start: its answer, as the
daemon reads it (real forked processes; no store). The whole start, on a real store and
mount: tests/test_mount.py."""

import os
import time

import pytest

from modelfs.errors import ModelfsError, NotFoundError, UsageError
from modelfs.mount.resolving import Ahead, first_chunks

pytestmark = pytest.mark.unit

STORE = b"STORE http://127.0.0.1:8333\n"  # the helper made an S3 client; its URLs go there


def _helper(*said: bytes, pause: float = 0.0, hang: bool = False) -> Ahead:
    """A forked process that writes ``said`` (a pause after the first), then exits or hangs."""
    r, w = os.pipe()
    since = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for i, part in enumerate(said):
                os.write(w, part)
                if i == 0 and pause:
                    time.sleep(pause)
            if hang:
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    return Ahead(pid, r, since)


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_the_version_it_found_and_the_helper_reaped():
    a = _helper(b"OK 0123456789abcdef0123\n")
    assert a.result() == "0123456789abcdef0123" and a.version == "0123456789abcdef0123"
    assert _reaped(a.pid) and a.fd is None
    assert a.fresh_for(30.0) == 30.0 and a.fresh_for(0.0) >= 1.0  # what it recorded counts, TTL or not


def test_a_cold_start_s_lines_before_the_answer():
    """STORE: the helper went to the store, and where (the daemon's workers connect there
    while the helper's requests run; the daemon makes its own client once serving);
    SIGNED: GET URLs it signed for the daemon's first cold reads."""
    seen = []
    a = _helper(STORE, b"SIGNED r/chunks/aa http://s/r/chunks/aa?X-Amz-Signature=1\n"
                b"SIGNED r/chunks/bb http://s/r/chunks/bb?sig=2\nOK v1\n", pause=0.3)
    t = time.monotonic()
    assert a.result(on_store=lambda origin: seen.append((origin, time.monotonic() - t))) == "v1"
    assert len(seen) == 1 and seen[0][0] == "http://127.0.0.1:8333" and seen[0][1] < 0.25  # on the line
    assert a.went_to_store and a.origin == "http://127.0.0.1:8333"
    assert a.signed == {"r/chunks/aa": "http://s/r/chunks/aa?X-Amz-Signature=1", "r/chunks/bb": "http://s/r/chunks/bb?sig=2"}
    warm = _helper(b"OK v2\n")
    assert warm.result(on_store=seen.append) == "v2" and len(seen) == 1  # warm: no store
    assert not warm.went_to_store and warm.signed == {} and warm.origin is None
    nowhere = _helper(b"STORE \nOK v4\n")  # it could not say where: cold all the same, nothing to connect to
    assert nowhere.result(on_store=seen.append) == "v4" and nowhere.went_to_store and nowhere.origin is None
    assert len(seen) == 1
    odd = _helper(STORE + b"SIGNED only-a-key\nOK v3\n")  # a malformed line: the answer is not found past it
    assert odd.result() is None and odd.signed == {}


def test_first_chunks_are_every_file_s_first_then_its_second():
    from modelfs.format.manifest import FileEntry, ForeignObject, Manifest

    def f(path, *hs, foreign=None):
        return FileEntry(path, 4 * len(hs), 0o644, "0" * 64, tuple((h, 4) for h in hs), foreign=foreign)
    m = Manifest("m", "2026-12-07T00:00:00Z", (f("a", "a1", "a2", "a3"), f("b", "b1"), f("empty"),
                                               f("c", "c1", "a1", "c3"), f("d", "d1", foreign=ForeignObject(0, "k"))),
                 (), {})
    assert first_chunks(m, 64) == ["a1", "b1", "c1", "a2", "a3", "c3"]  # once each; an adopted file's not
    assert first_chunks(m, 2) == ["a1", "b1"]
    assert first_chunks(Manifest("m", "2026-12-07T00:00:00Z", (), (), {}), 8) == []


def test_urls_signed_elsewhere_serve_while_they_last_and_need_no_client(monkeypatch):
    from modelfs.config import StoreConfig
    from modelfs.registry.store import Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # signing is local: no request is sent
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s = Store("b", StoreConfig(endpoint_url="http://127.0.0.1:9"))
    s.adopt_signed({"k1": "http://127.0.0.1:9/b/k1?signed-elsewhere", "k2": "http://x/k2"}, time.time() + 1000)
    assert s.presign("k1", 900) == s.presign("k1", 900) == "http://127.0.0.1:9/b/k1?signed-elsewhere"
    assert not s.connected  # no boto3 client was made for them
    assert s.presign("k1", 1200) != "http://127.0.0.1:9/b/k1?signed-elsewhere"  # would expire too soon
    assert s.connected
    assert "signed-elsewhere" not in s.presign("k1", 900, "HEAD")  # GET only
    assert s.presign("k3", 900).startswith("http://127.0.0.1:9/b/k3?")  # not signed ahead: signed here


def test_an_error_it_met_is_raised_as_its_class():
    with pytest.raises(NotFoundError, match="^no tag 'nope' of model m$"):
        _helper(STORE, b"ERROR NotFoundError no tag 'nope' of model m\n").result()
    with pytest.raises(UsageError, match="^bad manifest:\nline 2: x$"):  # a message of several lines
        _helper(b"ERROR UsageError bad manifest:\nline 2: x\n").result()
    with pytest.raises(UsageError, match="pass --encryption-key"):
        _helper(b"ERROR UsageError registry r is encrypted: pass --encryption-key FILE\n").result()
    for name in (b"ValueError", b"Ahead", b"__builtins__"):  # never anything but a ModelfsError
        with pytest.raises(ModelfsError) as e:
            _helper(b"ERROR " + name + b" what it said\n").result()
        assert type(e.value) is ModelfsError and str(e.value) == "what it said"


def test_no_answer_leaves_the_daemon_to_resolve_alone():
    for said in ((), (b"",), (b"garbage\n",), (b"OK\n",), (STORE,)):
        a = _helper(*said)
        assert a.result() is None and _reaped(a.pid)


def test_a_helper_nobody_waits_for_is_ended_and_reaped():
    a = _helper(STORE, hang=True)
    t = time.monotonic()
    a.abandon()
    assert time.monotonic() - t < 5 and _reaped(a.pid) and a.fd is None
    a.abandon()  # once only: no second kill or wait


def test_in_a_sibling_the_answer_is_read_but_the_helper_not_reaped():
    """A background start: the daemon reads the answer; the helper is the command's child,
    which reaps it (a wait in the daemon would fail: it is not the daemon's child)."""
    a = _helper(b"OK v1\n")
    sibling = Ahead(a.pid, os.dup(a.fd), a.since).in_sibling()
    assert sibling.result() == "v1"
    sibling.abandon()  # not its to end or wait for: nothing happens
    a.forget()
    os.waitpid(a.pid, 0)  # still ours to reap: neither result() nor abandon() waited for it

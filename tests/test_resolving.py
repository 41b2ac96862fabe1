"""The helper that resolves a mount's source beside the daemon's start: its answer, as the
daemon reads it (real forked processes; no store). The whole start, on a real store and
mount: tests/test_mount.py."""

import os
import time

import pytest

from modelfs.errors import ModelfsError, NotFoundError, UsageError
from modelfs.mount.resolving import STORE, Ahead

pytestmark = pytest.mark.unit


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


def test_a_store_line_calls_back_before_the_answer():
    """The daemon makes its S3 client while the helper's requests are in flight, not after."""
    seen = []
    a = _helper(STORE, b"OK v1\n", pause=0.3)
    t = time.monotonic()
    assert a.result(on_store=lambda: seen.append(time.monotonic() - t)) == "v1"
    assert len(seen) == 1 and seen[0] < 0.25  # called on the line, before the answer came
    seen.clear()
    assert _helper(STORE + b"OK v2\n").result(on_store=lambda: seen.append(1)) == "v2" and seen == [1]
    assert _helper(b"OK v3\n").result(on_store=lambda: seen.append(2)) == "v3" and seen == [1]  # warm: no client


def test_an_error_it_met_is_raised_as_its_class():
    with pytest.raises(NotFoundError, match="^no tag 'nope' of model m$"):
        _helper(STORE, b"ERROR NotFoundError no tag 'nope' of model m\n").result()
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

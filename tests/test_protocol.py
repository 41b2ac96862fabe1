"""The daemon ↔ worker protocol: every message round-trips; anything else is one clear
ProtocolError; a real worker process answers typed requests and exits (never hangs) on garbage."""

import os
import socket
import subprocess
import sys
import time

import pytest

from modelfs.config import Timeouts
from modelfs.transfer import protocol as p

pytestmark = pytest.mark.unit

SAMPLES = [
    p.Key("c2VjcmV0"), p.Connect("http://127.0.0.1:8333/b/k?X-Amz-Signature=0"), p.Ready(42), p.Go(7), p.Go(7, skip=True), p.Go(8, head="http://h", put="http://p", compress=False),
    p.Load(1, "ab" * 32, 4 << 20, "http://u", urgent=False, refetch=True, pin=True, early=True),
    p.Load(2, "ab" * 32, 10, None), p.Peek(3, "cd" * 32, 1 << 20, "http://u", 4096, 8192),
    p.Deliver(4, "ef" * 32, 100, "http://u", 1 << 40), p.Upload(5, 100, 0), p.Early(1),
    p.Done(1, fetched=True, took=0.25, spill=True), p.Peeked(3, took=0.01), p.Peeked(3, none=True),
    p.Named(5, "12" * 32), p.Uploaded(5, "12" * 32, uploaded=True, stored=99, took=0.5),
    p.Failed(1, p.Failure.HTTP, "HTTP 403 AccessDenied", 403, "AccessDenied"),
    p.Failed(2, p.Failure.INTEGRITY, "chunk ab: does not match its id"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert p.decode(p.encode(msg)) == msg


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p._TYPES.values())


@pytest.mark.parametrize("packet, why", [
    (b"", "not a message"), (b"\xff\xfe", "not a message"), (b"[1, 2]", "unknown message"),
    (b'{"id": 1}', "unknown message"), (b'{"t": "Launch", "id": 1}', "unknown message"),
    (b'{"t": "Load", "id": 1, "h": "ab"}', "without 'n'"),
    (b'{"t": "Load", "id": "1", "h": "ab", "n": 1, "url": null}', "Load.id: str"),
    (b'{"t": "Load", "id": true, "h": "ab", "n": 1, "url": null}', "Load.id: bool"),
    (b'{"t": "Done", "id": 1, "fetched": 1, "took": 0}', "Done.fetched: int"),
    (b'{"t": "Failed", "id": 1, "kind": "meteor", "msg": ""}', "unknown failure"),
    (b'{"t": "Ready", "pid": 1, "extra": 2}', "unknown fields"),
    (b"{" + b" " * p.MAX_MESSAGE + b"}", "over the limit"),
])
def test_anything_else_is_one_clear_protocol_error(packet, why):
    with pytest.raises(p.ProtocolError, match=why):
        p.decode(packet)


def test_an_oversized_message_is_refused_before_it_is_sent():
    with pytest.raises(p.ProtocolError, match="over"):
        p.encode(p.Load(1, "ab" * 32, 1, "http://u/" + "x" * p.MAX_MESSAGE))


def test_worker_config_round_trips():
    cfg = p.WorkerConfig("/c", 1 << 30, threads=3, timeouts=Timeouts(1.5, 2.5, 4), encrypted=True)
    assert p.WorkerConfig.from_json(cfg.to_json()) == cfg


def _worker(tmp_path):
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cfg = p.WorkerConfig(cache_dir="", cache_cap=0, threads=2, timeouts=Timeouts(1, 1, 1))
    proc = subprocess.Popen([sys.executable, "-m", "modelfs.transfer.worker", cfg.to_json(), str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    theirs.close()
    mine.settimeout(20)
    return proc, mine


def test_a_real_worker_answers_typed_requests_and_exits_on_garbage(tmp_path):
    proc, sock = _worker(tmp_path)
    try:
        msg, fd = p.receive(sock)
        assert isinstance(msg, p.Ready) and msg.pid == proc.pid and fd is None
        p.send(sock, p.Connect("http://127.0.0.1:9/b/k"))  # nothing listens: no answer, no exit
        p.send(sock, p.Load(1, "ab" * 32, 10, None))  # a worker without a cache cannot load
        reply, _ = p.receive(sock)
        assert reply == p.Failed(1, p.Failure.OTHER, "this fetch worker has no cache")
        r, w = os.pipe()
        p.send(sock, p.Deliver(2, "ab" * 32, 10, None, 0), w)  # no store: a clear failure, fd closed
        os.close(w)
        reply, _ = p.receive(sock)
        assert isinstance(reply, p.Failed) and "no object store" in reply.msg
        assert os.read(r, 1) == b""  # the worker closed its copy of the descriptor
        os.close(r)
        sock.send(b'{"t": "Launch"}')
        assert proc.wait(20) == 0  # no hang: it says why and exits (the daemon replaces it)
        assert b"unknown message" in proc.stderr.read()
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lanes_adopt_workers_started_early_and_end_the_ones_that_do_not_fit(tmp_path):
    """A daemon starts its workers before it knows everything (``prestart_workers``): Lanes
    adopts those whose configuration is its own and ends the others; none is left behind."""
    import trio

    from modelfs.cache import BlockCache
    from modelfs.transfer.lanes import LaneConfig, Lanes
    from modelfs.transfer.spawn import prestart, spawn

    cache = BlockCache(tmp_path / "c", 1 << 30)
    try:
        lane_config = LaneConfig(workers=2, concurrency=4)
        fits = prestart(lane_config, cache, encrypted=False)  # what a command starts before it resolves
        misfit = spawn(p.WorkerConfig(str(cache.path.parent), cache.cap, threads=7))
        lanes = Lanes(None, cache, lane_config, spawned=[*fits, misfit])
        assert misfit.proc.wait(10) == 0  # ended at once: not what these lanes would start
        pids: list[int] = []

        async def main():
            async with trio.open_nursery() as n:
                await n.start(lanes.run)  # returns once every worker said it is ready
                pids.extend(lanes.worker_pids)
                n.cancel_scope.cancel()
        trio.run(main)
        lanes.close(grace=10)
        assert len(fits) == 2 and sorted(pids) == sorted(s.proc.pid for s in fits)  # none started anew
        assert all(s.adopted and s.proc.poll() is not None for s in fits)  # closed with the lanes
    finally:
        cache.close()


def test_connections_opened_ahead_serve_first_requests_and_expire(monkeypatch):
    """A worker told ``Connect`` opens its connections before the first request: the
    requests then open none (a loopback server counts what it accepted); one opened too
    long ago is closed, not used (stores drop idle connections)."""
    import http.server
    import threading

    from modelfs.transfer import http as wh

    accepted = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            accepted.append(self.client_address)
            super().setup()

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/b/k?sig=1"
    try:
        c = wh.HttpClient(Timeouts())
        c.preconnect(url)
        c.preconnect(url)
        deadline = time.monotonic() + 5
        while len(accepted) < 2 and time.monotonic() < deadline:  # the server's thread records them
            time.sleep(0.01)
        got = []
        threads = [threading.Thread(target=lambda: got.append(bytes(c.get(url, 5)))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [b"hello", b"hello"] and len(accepted) == 2  # the two opened ahead, no third
        c.preconnect(url)
        monkeypatch.setattr(wh, "SPARE_SECONDS", 0.0)
        assert bytes(c.get(url, 5)) == b"hello"  # this thread's first: the one opened ahead is too old
        deadline = time.monotonic() + 5
        while len(accepted) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 4 and all(not conns for conns in c.spares.values())
        c.preconnect("http://127.0.0.1:9/nothing-listens-here")  # refused: left to the request, no error
        c.drop_spares()
        assert c.spares == {}
    finally:
        srv.shutdown()
        srv.server_close()

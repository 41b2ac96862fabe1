"""Stores that misbehave, for tests: a TCP proxy between a mount and its store that
stalls GETs or cuts connections, a listener that never answers, a web server that
is not S3.

Loopback only, threads, bounded by the test that owns it. Requests are stalled
as they pass client → server, so a stall delays exactly the GETs it is set for.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time


class StallProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.get_delay = 0.0  # seconds added to every GET request
        self.rate = 0.0  # bytes per second each connection may receive (0: no cap)
        self.refuse = False
        self.put_heads: list[bytes] = []  # the request line and headers of each PUT passed on
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):  # forwarded as it comes: no Nagle delays of its own
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream and self.get_delay and data.startswith(b"GET "):
                    time.sleep(self.get_delay)
                if upstream and data.startswith(b"PUT "):
                    self.put_heads.append(data.split(b"\r\n\r\n", 1)[0])
                dst.sendall(data)
                if not upstream and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every open connection; refuse new ones until ``refuse`` is reset."""
        self.refuse = True
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self.cut()


class Silent:
    """A listener that accepts connections and never answers (a hung store)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c):
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.requests += data.count(b"GET ")

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Gated:
    """A store of a few objects (path → bytes) that holds every GET's answer until
    ``gate`` is set, and records the order GETs arrived in (the object's last path
    part) and the most that were held at once. Not S3: it ignores signatures."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.gate = threading.Event()
        self.order: list[str] = []
        self.held = self.most_held = 0
        lock = threading.Lock()
        outer = self

        class Handler(_Quiet):
            def do_GET(self):
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                with lock:
                    outer.order.append(name)
                    outer.held += 1
                    outer.most_held = max(outer.most_held, outer.held)
                outer.gate.wait(30)
                with lock:
                    outer.held -= 1
                body = outer.objects.get(name)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


class NotS3:
    """A plain web server (Python's own), serving an empty directory: any HTTP, no S3."""

    def __init__(self, root: str):
        handler = functools.partial(_Quiet, directory=root)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

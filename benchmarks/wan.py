"""A store farther away than loopback: the tests' proxy (``tests/proxy.py``) adding a
first-byte delay to every GET and capping each connection's download rate, so a
benchmark on this machine can show how a read path fares against a remote object
store (S3 answers in tens of ms and sends ~100 MB/s per connection), not only
against a server on the same cores.

A model, not a measurement of any cloud: use it for ratios between read paths in one
run (``--store-latency-ms``, ``--store-mbps`` of ``random_reads.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from modelfs.dev.devserver import SeaweedServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from proxy import StallProxy  # noqa: E402


class FarStore:
    """``endpoint`` and ``env()`` like :class:`SeaweedServer`, through the proxy."""

    def __init__(self, srv: SeaweedServer, latency_ms: float, mbps: float):
        self.srv = srv
        self.proxy = StallProxy(srv.s3_port)
        self.proxy.get_delay, self.proxy.rate = latency_ms / 1000, mbps * 1e6
        self.endpoint = self.proxy.endpoint

    def env(self) -> dict[str, str]:
        return {**self.srv.env(), "AWS_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.proxy.close()

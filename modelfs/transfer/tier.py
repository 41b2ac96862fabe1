"""A fetch worker's way to its fleet's cache tier: which node holds a chunk, whether a
node answers, and the fall back to the store (``docs/fleet.md``).

A tier is K stock nginx nodes (``modelfs tier-config``) that cache chunk objects keyed
on their path and forward the host's presigned GET on a miss. Each chunk id has one
node (rendezvous hashing: K nodes hold one copy between them, and a node that leaves
moves only its own chunks), then the next, then the store. Nothing from a tier is
trusted: a chunk is checked as one from the store is; a bad one is asked once more with
:data:`REFRESH` (the node fetches it from the store again and replaces its copy), then
taken from the store directly. A node that does not answer within its own, short
timeouts is skipped for a back-off (:data:`BACKOFF_MIN` doubling to :data:`BACKOFF_MAX`),
so a tier outage costs each worker thread one bounded wait, not an outage.

Only chunk objects go through a tier; manifests, tags, signatures and leases are the
daemon's requests (boto3), always to the store.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..config import Timeouts, origin_url
from ..errors import IntegrityError
from .http import FetchFailed, HttpClient
from .protocol import Failure

log = logging.getLogger(__name__)

T = TypeVar("T")

# a tier node's own bound: one try, a short connect, and a read timeout above one chunk's
# fetch from the store — a miss, or a wait on another host's miss of the same chunk, which
# nginx answers only once the whole chunk is in, and which a rollout's many concurrent
# misses share the store's link for (fleet.py: 5 s let 16 hosts on one node fall back for
# 10% of their chunks, 2.65 copies from the store)
TIER_TIMEOUTS = Timeouts(connect=1.0, read=10.0, attempts=1)
BACKOFF_MIN = 30.0  # seconds a node that failed is skipped (a rollout goes on from the store); doubled
BACKOFF_MAX = 300.0  # ... at each failure in a row, up to this
REFRESH = "X-Modelfs-Refresh"  # nginx's proxy_cache_bypass: fetch again, replace the copy
CACHE_STATUS = "X-Cache-Status"  # the node's $upstream_cache_status (HIT, MISS, …)


@dataclass
class Node:
    url: str
    down_until: float = 0.0  # monotonic; skipped until then
    backoff: float = 0.0  # the next back-off's length (0: answering)
    bad_seen: bool = False  # it gave a bad copy once (logged then; later ones are only counted)


@dataclass
class Via:
    """Where one request's bytes came from, and what it cost on the way (for the stats)."""
    tier: bool = False  # from a tier node (else the store)
    hit: bool = False  # the node had it (its cache status said HIT)
    fallbacks: int = 0  # tier nodes that failed to answer this request
    bad: int = 0  # answers from the tier that failed verification


@dataclass
class Tier:
    """The nodes of one tier, as one worker sees them (each worker learns on its own).

    Invariants: :meth:`fetch` returns only what ``check`` accepted; a node is skipped
    only while its back-off lasts; the store is always the last resort."""
    nodes: list[Node]
    http: HttpClient = field(default_factory=lambda: HttpClient(TIER_TIMEOUTS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, urls: tuple[str, ...]) -> Tier | None:
        return cls([Node(origin_url(u, "a cache tier node")) for u in urls]) if urls else None

    def order(self, h: str) -> list[Node]:
        """The nodes for chunk ``h``, its own first (highest rendezvous weight)."""
        return sorted(self.nodes, key=lambda n: hashlib.blake2b(f"{n.url} {h}".encode(), digest_size=8).digest(),
                      reverse=True)

    def fetch(self, h: str, url: str, limit: int, check: Callable[[memoryview], T], store: HttpClient,
              span: tuple[int, int] | None = None) -> tuple[memoryview, T, Via]:
        """GET ``url`` (a presigned store URL) through the tier: the body, what ``check``
        made of it (it raises IntegrityError on bad bytes), and where it came from. The
        store's own errors (from ``store``) are the caller's."""
        via = Via()
        now = time.monotonic()
        for node in self.order(h):
            if node.down_until > now:
                continue
            target = _through(node.url, url)
            for refresh in (False, True):
                try:
                    body = self.http.get(target, limit, span, headers={REFRESH: "1"} if refresh else None)
                except FetchFailed as e:
                    self._failed(node, e)
                    via.fallbacks += 1
                    break
                self._answered(node)
                try:
                    result = check(body)
                except IntegrityError as e:
                    via.bad += 1  # counted every time (modelfs stats), logged once per node
                    log.log(logging.DEBUG if node.bad_seen else logging.WARNING,
                            "a bad copy of chunk %s from cache tier node %s%s: %s (never served; further "
                            "ones are counted in modelfs stats)", h[:16], node.url,
                            "" if not refresh else " again after a refresh; from the store", e)
                    node.bad_seen = True
                    if refresh:
                        return self._from_store(url, limit, check, store, span, via)
                    continue
                via.tier = True
                via.hit = (self.http.last_header(CACHE_STATUS) or "").upper() == "HIT"
                return body, result, via
        return self._from_store(url, limit, check, store, span, via)

    @staticmethod
    def _from_store(url: str, limit: int, check: Callable[[memoryview], T], store: HttpClient,
                    span: tuple[int, int] | None, via: Via) -> tuple[memoryview, T, Via]:
        body = store.get(url, limit, span)
        return body, check(body), via

    def _failed(self, node: Node, e: FetchFailed) -> None:
        if e.kind not in (Failure.UNAVAILABLE, Failure.THROTTLED):
            return  # it answered (a refusal, which the store gives again if it is the store's)
        with self.lock:
            first = node.backoff == 0.0
            node.backoff = min(max(node.backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
            node.down_until = time.monotonic() + node.backoff
        if first:
            log.warning("cache tier node %s: %s; using the next node or the store for %g s", node.url, e,
                        node.backoff)

    def _answered(self, node: Node) -> None:
        if node.backoff:
            with self.lock:
                node.backoff, node.down_until = 0.0, 0.0
            log.warning("cache tier node %s answers again", node.url)


def _through(node: str, url: str) -> str:
    """``url`` (a presigned store URL) sent to tier node ``node``: the same path and query,
    so the node forwards it as it is and keys its cache on the path."""
    u, n = urlsplit(url), urlsplit(node)
    return urlunsplit((n.scheme, n.netloc, u.path, u.query, ""))

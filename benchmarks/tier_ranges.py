"""Whole-chunk caching against nginx's ``slice`` on a tier node, for a host's small cold
reads (block peeks: one 64 KiB ranged GET) and its whole-chunk loads (issue 28,
docs/fleet.md).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/tier_ranges.py \
        [--rtt 20] [--mbit 1000] [--chunks 16] [--slice 1m] [--runs 3]   # as root

SeaweedFS behind :class:`farlink.FarLink`; one published file; for each mode a fresh
nginx node (``modelfs tier-config``'s configuration; ``slice``: the same with ``slice SIZE``,
``Range: $slice_range`` towards the store and the slice in the cache key), and for each of
``--chunks`` chunks, one after another, as one host would: a cold 64 KiB peek at a random
block, the same peek again (a hit), then the whole chunk (what a reader that goes on
loads). And for other chunks: a cold whole-chunk GET. Recorded: latency medians, and the
bytes the store sent over the link ÷ the bytes the host asked for.
"""

from __future__ import annotations

import argparse
import http.client
import random
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import client, machine, median, new_bucket, write_shards  # noqa: E402
from farlink import far_store  # noqa: E402

from modelfs.dev.tiernode import TierNode  # noqa: E402
from modelfs.format.chunking import BLOCK  # noqa: E402
from modelfs.ops.tier_config import TierConfig  # noqa: E402

SLICE_EDITS = [
    ("            proxy_cache_key $uri;\n",
     "            slice {size};\n            proxy_set_header Range $slice_range;\n"
     "            proxy_cache_key $uri$slice_range;\n"),
    ("proxy_cache_valid 200 365d;", "proxy_cache_valid 200 206 365d;"),
]


class SlicedConfig(TierConfig):
    """The tier's configuration with ``slice`` (what the benchmark compares against)."""
    size = "1m"

    def render(self) -> str:
        text = super().render()
        for old, new in SLICE_EDITS:
            assert old in text, old
            text = text.replace(old, new.format(size=self.size))
        return text


def get(node: str, url: str, rng: tuple[int, int] | None) -> tuple[float, int, str]:
    """GET a presigned ``url`` through ``node``: (seconds, body bytes, X-Cache-Status)."""
    u, n = urlsplit(url), urlsplit(node)
    c = http.client.HTTPConnection(n.hostname, n.port, timeout=60)
    headers = {"Range": f"bytes={rng[0]}-{rng[1] - 1}"} if rng else {}
    t0 = time.monotonic()
    c.request("GET", f"{u.path}?{u.query}", headers=headers)
    r = c.getresponse()
    body = r.read()
    dt = time.monotonic() - t0
    assert r.status in (200, 206), (r.status, body[:200])
    c.close()
    return dt, len(body), r.headers.get("X-Cache-Status", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtt", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=1000.0)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--slice", default="1m")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    SlicedConfig.size = args.slice
    rnd = random.Random(7)
    rows: dict[str, dict[str, list[float]]] = {}
    with far_store(args.rtt, args.mbit, "tier-ranges") as (d, link, srv, env):
        m = d / "model"
        need = 2 * args.chunks * args.runs * 2
        write_shards(m, 1, 5 * need)  # ~4 MiB chunks
        c = client(srv)
        bucket = new_bucket(c, "ranges")
        subprocess.run([sys.executable, "-m", "modelfs", "publish", str(m), f"s3://{bucket}/reg", "--name", "m",
                        "-q"], env=dict(env, PYTHONPATH=str(HERE.parent)), check=True, cwd="/tmp")
        chunks = [(o["Key"], o["Size"]) for p in c.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="reg/chunks/") for o in p.get("Contents", [])]
        rnd.shuffle(chunks)
        assert len(chunks) >= need, f"{len(chunks)} chunks, {need} needed: fewer --chunks or --runs"
        print(f"  {len(chunks)} chunks, median {median([s for _, s in chunks]) / 2**20:.1f} MiB", flush=True)
        for run in range(args.runs):
            for mode in ("whole", f"slice {args.slice}"):
                take, chunks = chunks[:2 * args.chunks], chunks[2 * args.chunks:]
                peeked, other = take[:args.chunks], take[args.chunks:]
                node = TierNode(srv.endpoint, d / f"tier-{run}-{mode.split()[0]}", max_size="4g",
                                config=TierConfig if mode == "whole" else SlicedConfig)
                r = rows.setdefault(mode, {})
                try:
                    for key, size in peeked:
                        url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
                        lo = rnd.randrange(0, max(1, size // BLOCK)) * BLOCK
                        rng = (lo, min(size, lo + BLOCK))
                        before = link.forwarded()[1]
                        dt, n, status = get(node.url, url, rng)
                        r.setdefault("cold peek, ms", []).append(dt * 1e3)
                        r.setdefault("cold peek: store bytes ÷ asked", []).append((link.forwarded()[1] - before) / n)
                        dt, _, status = get(node.url, url, rng)
                        r.setdefault("peek again (hit), ms", []).append(dt * 1e3)
                        time.sleep(0.5)  # a whole-chunk miss behind the peek may still be filling
                        before = link.forwarded()[1]
                        dt, n, _ = get(node.url, url, None)
                        r.setdefault("whole chunk after a peek, ms", []).append(dt * 1e3)
                        r.setdefault("whole after peek: store bytes ÷ chunk", []).append(
                            (link.forwarded()[1] - before) / n)
                    for key, size in other:
                        url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
                        before = link.forwarded()[1]
                        dt, n, _ = get(node.url, url, None)
                        r.setdefault("cold whole chunk, ms", []).append(dt * 1e3)
                        r.setdefault("cold whole: MB/s", []).append(n / dt / 1e6)
                        r.setdefault("cold whole: store bytes ÷ chunk", []).append((link.forwarded()[1] - before) / n)
                finally:
                    node.stop()
                print(f"  run {run + 1} {mode}: done", flush=True)
    modes = list(rows)
    print(f"\nlink {args.rtt:g} ms / {args.mbit:g} Mbit/s, {args.chunks} chunks × {args.runs} runs per mode, "
          f"medians; {machine()}\n")
    print("| figure | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes))
    for fig in rows[modes[0]]:
        print(f"| {fig} | " + " | ".join(f"{median(rows[m][fig]):.2f}" for m in modes) + " |")


if __name__ == "__main__":
    main()

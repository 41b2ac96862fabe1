"""The cold random 4 KiB read tail: modelfs beside the other mounts and the store itself, in one run.

    .venv/bin/python benchmarks/random_reads.py [--size-mib 1024] [--preads 200] [--runs 3] [--base TREE]
    # as root, from another directory than the repository (see docs/benchmarks.md)

Each target gets what the suite's cold pread scenario gives it (a fresh mount and
cache, page cache dropped, the first 4 KiB of the file read once), then the same
``--preads`` random 4 KiB ``pread`` calls, one at a time. Beside them, the floor a
mount can approach for such a read: one 4 KiB ranged GET of the plain object per
offset, over a kept-alive connection (what a mount without a cache does, without
FUSE). Prints p50 / p90 / p99 / max per target (medians over runs) and the slowest
reads of modelfs with their place in the sequence, so a one-off cost (the first
read after mount) shows apart from the store's tail. ``--base TREE`` adds a mount of
another source tree of modelfs (e.g. ``git archive`` of an earlier commit unpacked
there) to the same run: an A/B on the same server and machine state.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).parent))
from common import client, drop_caches, machine, new_bucket, percentile  # noqa: E402
from suite import BIG, Target, first_4k_ms, make_targets, preads_ms  # noqa: E402
from wan import FarStore  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

QS = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def ranged_gets_ms(url: str, offsets: list[int], size: int) -> list[float]:
    """One ``size``-byte ranged GET per offset, one at a time, on one kept-alive connection."""
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    out = []
    try:
        for off in offsets:
            t = time.perf_counter()
            c.request("GET", f"{u.path}?{u.query}", headers={"Range": f"bytes={off}-{off + size - 1}"})
            r = c.getresponse()
            if r.status != 206 or len(r.read()) != size:
                raise RuntimeError(f"ranged GET at {off}: HTTP {r.status}")
            out.append((time.perf_counter() - t) * 1e3)
    finally:
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--preads", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=Path, help="another modelfs source tree to mount beside this one")
    ap.add_argument("--store-latency-ms", type=float, default=0.0,
                    help="reach the store through a proxy adding this first-byte delay per request (wan.py)")
    ap.add_argument("--store-mbps", type=float, default=0.0, help="… and capping each connection at this rate")
    args = ap.parse_args()
    res: dict[str, dict[str, list[float]]] = {}
    slowest: list[list[tuple[float, int]]] = []

    with tempfile.TemporaryDirectory(prefix="modelfs-random-") as tmp_s, SeaweedServer(Path(tmp_s) / "s3") as srv:
        tmp = Path(tmp_s)
        local = tmp / "local"
        local.mkdir()
        layers = max(1, round(1365 * args.size_mib / 1024))
        write_safetensors(local / BIG, layer_tensors(layers, 256, dtype="F16"), seed=1)
        size = (local / BIG).stat().st_size
        c = client(srv)
        plain, mb = new_bucket(c, "plain"), new_bucket(c, "modelfs")
        c.upload_file(str(local / BIG), plain, f"plain/{BIG}")
        subprocess.run([str(Path(sys.executable).parent / "modelfs"), "publish", str(local), f"s3://{mb}/reg",
                        "--name", "m", "-q"], env=dict(os.environ, **srv.env()), check=True, capture_output=True)
        if args.base:  # published by the base tree too: it may not read this tree's format
            based = new_bucket(c, "modelfs-base")
            subprocess.run([sys.executable, "-m", "modelfs", "publish", str(local), f"s3://{based}/reg",
                            "--name", "m", "-q"], env=dict(os.environ, **srv.env(),
                                                           PYTHONPATH=str(args.base.resolve())),
                           check=True, capture_output=True, cwd=tmp)
        far = FarStore(srv, args.store_latency_ms, args.store_mbps) if args.store_latency_ms or args.store_mbps \
            else srv
        url = client(far).generate_presigned_url("get_object", Params={"Bucket": plain, "Key": f"plain/{BIG}"},
                                                 ExpiresIn=7200)
        targets = [t for t in make_targets(tmp, far, plain, mb, local)
                   if t.name in ("modelfs", "rclone (cache off)", "s3fs")]
        if args.base:
            mine = targets[0]
            cmd = [a.replace(f"s3://{mb}/", f"s3://{based}/") for a in mine.cmd[1:]]
            targets.insert(1, Target(f"modelfs @ {args.base}", [sys.executable, "-m", "modelfs", *cmd],
                                     env={**mine.env, "PYTHONPATH": str(args.base.resolve())},
                                     persistent_cache=mine.persistent_cache))
        mnt = tmp / "mnt"
        mnt.mkdir()
        for run in range(args.runs):
            rng = random.Random(run)
            offsets = [rng.randrange(size - 4096) for _ in range(args.preads)]
            print(f"run {run + 1}/{args.runs}", flush=True)
            for t in targets:
                root = t.start(mnt, fresh=True)
                try:
                    drop_caches()
                    first_4k_ms(root / BIG)
                    lat = preads_ms(root / BIG, offsets, 4096)
                finally:
                    t.stop(mnt)
                if t.name == "modelfs":
                    slowest.append(sorted(((ms, i) for i, ms in enumerate(lat)), reverse=True)[:4])
                record(res, t.name, lat)
            drop_caches()
            record(res, "4 KiB ranged GET (no FUSE)", ranged_gets_ms(url, offsets, 4096))

    if args.store_latency_ms or args.store_mbps:
        print(f"\nstore through wan.py: +{args.store_latency_ms:g} ms per request, {args.store_mbps:g} MB/s per "
              "connection")
    print(f"\n{size >> 20} MiB safetensors, {args.preads} random 4 KiB preads per run, medians of "
          f"{args.runs}, ms; {machine()}\n")
    print("| target | " + " | ".join(q for q, _ in QS) + " | max |\n|---|---|---|---|---|")
    for name, m in res.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(m[q]):.1f}" for q in (*dict(QS), "max")) + " |")
    print("\nmodelfs's slowest reads per run (ms @ index in the sequence): "
          + "; ".join(", ".join(f"{ms:.0f}@{i}" for ms, i in run) for run in slowest))


def record(res: dict[str, dict[str, list[float]]], name: str, lat: list[float]) -> None:
    m = res.setdefault(name, {})
    for q, f in QS:
        m.setdefault(q, []).append(percentile(lat, f))
    m.setdefault("max", []).append(max(lat))
    print(f"  {name:28s} " + "  ".join(f"{q} {m[q][-1]:6.1f}" for q in (*dict(QS), "max")), flush=True)


if __name__ == "__main__":
    main()

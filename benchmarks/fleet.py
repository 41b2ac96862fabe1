"""A fleet rollout on one machine: N hosts load one model at once from a far store, with and
without a cache tier (issue 28, docs/fleet.md).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/fleet.py \
        [--hosts 1,2,4,8,16] [--tiers 0,1,2] [--shards 4] [--shard-mib 256] [--rtt 20] [--mbit 1000]   # as root

SeaweedFS runs behind :class:`farlink.FarLink` (``--rtt`` ms round trip, ``--mbit``); the
hosts and the tier nodes share the client side (a LAN beside the far store). For each K in
``--tiers`` (0: no tier) and N in ``--hosts``: K nginx nodes from ``modelfs tier-config``
(empty caches), N mounts of the model (``modelfs mount``, each its own empty cache
directory, one fetch worker, ``--cache-tier`` every node), then every host reads every
shard whole, all hosts at once. Recorded: bytes the store sent over the link ÷ the model's
stored bytes (the forwarder's counter, IP headers included), the time until every host has
read everything, and that time ÷ one host alone without a tier (N = 1, K = 0). ``--kill-tier
SECONDS``: also a rollout with N = max(--hosts) whose tier is killed (every nginx process)
that long after the start; every host must finish.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MiB, client, drop_caches, machine, new_bucket, proc_cpu_seconds, write_shards  # noqa: E402
from farlink import FarLink, far_store  # noqa: E402

from modelfs.dev.tiernode import TierNode  # noqa: E402

ROOT = str(HERE.parent)


def modelfs(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelfs", *args], env=dict(env, PYTHONPATH=ROOT), check=True,
                          capture_output=True, text=True, cwd="/tmp")


def rollout(d: Path, env: dict, ref: str, shards: list[str], link: FarLink, n: int, k: int,
            kill_after: float | None = None) -> dict:
    """One rollout: K nodes, N hosts, every host reads every shard; the figures."""
    run = d / f"run-{k}-{n}-{time.monotonic_ns()}"
    run.mkdir()
    nodes = [TierNode(env["AWS_ENDPOINT_URL"], run / f"tier{i}", max_size="64g") for i in range(k)]
    tier = [a for node in nodes for a in ("--cache-tier", node.url)]
    mnts = []
    try:
        for i in range(n):
            mnt = run / f"mnt{i}"
            mnt.mkdir()
            modelfs(env, "mount", ref, str(mnt), "--cache-dir", str(run / f"cache{i}"), "--fetch-workers", "1", *tier)
            mnts.append(mnt)
        drop_caches()
        before = link.forwarded()[1]
        done: list[float] = [0.0] * n
        errors: list[str] = []
        t0 = time.monotonic()

        def host(i: int) -> None:
            try:
                for s in shards:
                    with open(mnts[i] / s, "rb", buffering=0) as f:
                        while f.read(8 * MiB):
                            pass
                done[i] = time.monotonic() - t0
            except OSError as e:
                errors.append(f"host {i}: {e}")
        threads = [threading.Thread(target=host, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        killer = threading.Timer(kill_after, lambda: [node.stop(signal.SIGKILL) for node in nodes]) \
            if kill_after is not None else None
        if killer:
            killer.start()
        for t in threads:
            t.join()
        if killer:
            killer.cancel()
        store_bytes = link.forwarded()[1] - before
        stats = [json.loads(modelfs(env, "stats", str(m), "--json").stdout) for m in mnts]
        # the hosts' work (daemons and their workers), which N hosts on this one machine share
        # its cores for: what bounds "every host loaded" here, beside the link
        host_cpu = sum(proc_cpu_seconds(s["pid"]) for s in stats)
        return {"hosts": n, "tier_nodes": k, "all_loaded_s": max(done), "first_loaded_s": min(done),
                "store_bytes": store_bytes, "errors": errors,
                "tier_chunks": sum(s["tier_chunks"] for s in stats), "tier_hits": sum(s["tier_hits"] for s in stats),
                "store_chunks": sum(s["store_chunks"] for s in stats),
                "fallbacks": sum(s["tier_fallbacks"] for s in stats), "killed_after": kill_after,
                "host_cpu_s": host_cpu}
    finally:
        for m in mnts:
            subprocess.run([sys.executable, "-m", "modelfs", "unmount", str(m)], env=dict(env, PYTHONPATH=ROOT),
                           capture_output=True)
        for node in nodes:
            node.stop()
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", default="1,2,4,8,16")
    ap.add_argument("--tiers", default="0,1,2")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--rtt", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=1000.0)
    ap.add_argument("--kill-tier", type=float, help="seconds into a rollout of max(--hosts) with one node")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hosts = [int(x) for x in args.hosts.split(",")]
    tiers = [int(x) for x in args.tiers.split(",")]
    results = []
    with far_store(args.rtt, args.mbit, "fleet") as (d, link, srv, env):
        m = d / "model"
        shards = write_shards(m, args.shards, args.shard_mib)
        model_bytes = sum((m / s).stat().st_size for s in shards)
        bucket = new_bucket(client(srv), "fleet")
        modelfs(env, "publish", str(m), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "-q")
        ref = f"s3://{bucket}/reg/m@prod"
        for k in tiers:
            for n in hosts:
                r = rollout(d, env, ref, shards, link, n, k)
                results.append(r)
                print(f"  K={k} N={n:>2}: all loaded {r['all_loaded_s']:.1f} s, store bytes "
                      f"{r['store_bytes'] / model_bytes:.2f} × model, tier chunks {r['tier_chunks']} "
                      f"(hits {r['tier_hits']}), store chunks {r['store_chunks']}, errors {r['errors']}", flush=True)
        if args.kill_tier is not None:
            r = rollout(d, env, ref, shards, link, max(hosts), 1, kill_after=args.kill_tier)
            results.append(r)
            print(f"  tier killed after {args.kill_tier} s, N={max(hosts)}: all loaded {r['all_loaded_s']:.1f} s, "
                  f"errors {r['errors']}, fallbacks {r['fallbacks']}", flush=True)
    alone = next((r["all_loaded_s"] for r in results if r["hosts"] == 1 and r["tier_nodes"] == 0), None)
    print(f"\n{args.shards} × {args.shard_mib} MiB ({model_bytes / MiB:.0f} MiB), link {args.rtt:g} ms / "
          f"{args.mbit:g} Mbit/s, one run each; {machine()}\n")
    print("| tier nodes | hosts | every host loaded, s | ÷ one host alone | store bytes ÷ model | tier hits | "
          "fallbacks | hosts' CPU-s | errors |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        k = f"{r['tier_nodes']} (killed at {r['killed_after']:g} s)" if r["killed_after"] is not None \
            else str(r["tier_nodes"])
        ratio = f"{r['all_loaded_s'] / alone:.2f}" if alone else "–"
        print(f"| {k} | {r['hosts']} | {r['all_loaded_s']:.1f} | {ratio} | **{r['store_bytes'] / model_bytes:.2f}** | "
              f"{r['tier_hits']} | {r['fallbacks']} | {r['host_cpu_s']:.0f} | {len(r['errors'])} |")
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": model_bytes, "results": results}, indent=1))


if __name__ == "__main__":
    main()

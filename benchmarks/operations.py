"""Operations figures: priming a host (prefetch by ref, through a mount) against the raw store,
and what live stats cost.

    .venv/bin/python benchmarks/operations.py [--size-mib 1024] [--runs 3]

Baseline, same run, same machine: boto3 GETs of exactly the chunk objects the model
needs, 16 in parallel (what prefetch by ref must do at the least). Ratios are
medians over runs; each run starts from an empty cache and a dropped page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, client, drop_caches, machine, median, new_bucket, save  # noqa: E402

from modelfs.dev.devserver import SeaweedServer, free_ports  # noqa: E402
from modelfs.dev.sample import make_model  # noqa: E402


def modelfs(env, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "modelfs", *args], env=env, capture_output=True,
                          text=True, check=True, stdin=subprocess.DEVNULL).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-bench-") as tmp, \
            SeaweedServer(Path(tmp) / "s3") as srv:
        work = Path(tmp)
        env = dict(os.environ, **srv.env())
        c = client(srv)
        bucket = new_bucket(c, "ops")
        model = make_model(work / "model", size_mib=args.size_mib)
        ref = f"s3://{bucket}/reg/m@latest"
        modelfs(env, "publish", str(model), f"s3://{bucket}/reg", "--name", "m", "-q")
        doc = json.loads(modelfs(env, "inspect", "--json", ref))
        chunks = {h for f in doc["files"] for h, _ in f["chunks"]}
        total = sum(f["size"] for f in doc["files"])
        keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="reg/chunks/")
                for o in page.get("Contents", ()) if o["Key"].rsplit("/", 1)[-1] in chunks]
        assert len(keys) == len(chunks)
        fig: dict[str, list[float]] = {k: [] for k in ("boto3", "prefetch_ref", "prefetch_mount", "pull",
                                                       "stats_xattr_ms", "metrics_scrape_ms")}
        for run in range(args.runs):
            drop_caches()
            t = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                got = sum(pool.map(lambda k: len(c.get_object(Bucket=bucket, Key=k)["Body"].read()), keys))
            fig["boto3"].append(got / (time.perf_counter() - t) / MiB)

            cache = work / f"cache-ref-{run}"
            t = time.perf_counter()
            modelfs(env, "prefetch", ref, "--cache-dir", str(cache), "-q")
            fig["prefetch_ref"].append(total / (time.perf_counter() - t) / MiB)

            dest = work / f"pull-{run}"
            drop_caches()
            t = time.perf_counter()
            modelfs(env, "pull", ref, str(dest), "-q")
            fig["pull"].append(total / (time.perf_counter() - t) / MiB)
            shutil.rmtree(dest)

            mnt = work / f"mnt-{run}"
            mnt.mkdir()
            (port,) = free_ports(1)
            modelfs(env, "mount", ref, str(mnt), "--cache-dir", str(work / f"cache-mnt-{run}"),
                    "--metrics-port", str(port))
            try:
                drop_caches()
                t = time.perf_counter()
                modelfs(env, "prefetch", str(mnt), "-q")
                fig["prefetch_mount"].append(total / (time.perf_counter() - t) / MiB)
                xs = []
                for _ in range(200):
                    t = time.perf_counter()
                    os.getxattr(mnt, "user.modelfs.stats")
                    xs.append((time.perf_counter() - t) * 1000)
                fig["stats_xattr_ms"].append(median(xs))
                xs = []
                for _ in range(50):
                    t = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                        r.read()
                    xs.append((time.perf_counter() - t) * 1000)
                fig["metrics_scrape_ms"].append(median(xs))
            finally:
                modelfs(env, "unmount", str(mnt))
            shutil.rmtree(cache)
            shutil.rmtree(work / f"cache-mnt-{run}")
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in fig.items()), flush=True)
        med = {k: median(v) for k, v in fig.items()}
        result = {"machine": machine(), "size_mib": args.size_mib, "runs": args.runs, "chunks": len(chunks),
                  "median": med, "all": fig,
                  "ratios": {f"{k}/boto3": med[k] / med["boto3"] for k in ("prefetch_ref", "prefetch_mount", "pull")}}
        print(json.dumps({"median": med, "ratios": result["ratios"]}, indent=2))
        print(f"saved {save('operations', result)}")


if __name__ == "__main__":
    main()

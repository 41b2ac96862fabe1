"""Issue 10's many-core figures: a cold mount + ``load_file(..., device="cuda")`` against
download-then-load, on one host with its own SeaweedFS.

    .venv/bin/python benchmarks/gpu.py --size-gb 13.5 --shards 4 --device cuda     # as root, on the GPU host
    .venv/bin/python benchmarks/gpu.py --size-gb 0.5 --shards 2 --device cpu       # the same steps, small, anywhere

Steps, each on a dropped page cache: generate a bf16 safetensors model of ``--size-gb`` in
``--shards`` shards and publish it; the store's best ranged-GET rate (1, 4 and 8
processes × 8 threads × 8 MiB ranges); download (the best of those, to local disk) +
``load_file`` of every shard; ``load_file`` from local disk; a cold mount (fresh cache) +
``load_file`` through it, with the CPU the mount's processes used (→ cores); cold and warm
(remount on the full cache) sequential reads through the mount against local disk.
Prints a table and writes JSON to ``--out``. Needs torch for ``--device cuda``; with
``--device cpu`` and no torch a "load" reads every byte (NumPy has no bfloat16).

The target (issue 10): cold mount + load ≤ 0.8 × download + load; cold sequential
≥ 0.85 × the best ranged-GET rate; warm ≥ 0.7 × local disk.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import client, drop_caches, machine, new_bucket, proc_cpu_seconds, seq_read  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1 << 20
RANGE = 8 * MiB


def _load(paths: list[Path], device: str) -> float:
    t = time.perf_counter()
    try:
        from safetensors.torch import load_file
        for p in paths:
            tensors = load_file(str(p), device=device)
            if device == "cuda":
                import torch
                torch.cuda.synchronize()
            del tensors
    except ImportError:  # no torch: read every byte instead (NumPy has no bfloat16)
        if device != "cpu":
            raise
        for p in paths:
            seq_read(p)
    return time.perf_counter() - t


def _get_ranges(args: tuple[str, dict, str, list[str], int, int, str | None]) -> int:
    """One process: 8 threads GET 8 MiB ranges of its share of the objects (into memory, or
    into files under ``dest``)."""
    endpoint, env, bucket, keys, index, procs, dest = args
    import boto3
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    jobs = []
    for key in keys:
        size = c.head_object(Bucket=bucket, Key=key)["ContentLength"]
        jobs += [(key, off, min(off + RANGE, size)) for off in range(0, size, RANGE)]
    mine = jobs[index::procs]

    def get(job):
        key, lo, hi = job
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi - 1}")["Body"].read()
        if dest is not None:
            fd = os.open(os.path.join(dest, key), os.O_WRONLY)
            try:
                os.pwrite(fd, body, lo)
            finally:
                os.close(fd)
        return len(body)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(get, mine))


def ranged_get(srv: SeaweedServer, bucket: str, keys: list[str], procs: int, dest: Path | None = None) -> float:
    """Seconds for ``procs`` processes to GET every byte of ``keys``."""
    env = srv.env()
    if dest is not None:
        c = client(srv)
        for k in keys:
            with open(dest / k, "wb") as f:
                f.truncate(c.head_object(Bucket=bucket, Key=k)["ContentLength"])
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_get_ranges, [(srv.endpoint, env, bucket, keys, i, procs, str(dest) if dest else None)
                               for i in range(procs)])
    return time.perf_counter() - t


class Mount:
    def __init__(self, env: dict, ref: str, mnt: Path, cache: Path):
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        self.proc = subprocess.Popen([str(BIN / "modelfs"), "-j", "32", "mount", ref, str(mnt), "--foreground",
                                      "--cache-dir", str(cache), "--cache-size", "200G"],
                                     env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt) or not os.listdir(mnt):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the mount did not come up")
            time.sleep(0.1)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        self.proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=13.5)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workdir", type=Path, default=None, help="where the model, store and cache live (big)")
    ap.add_argument("--out", type=Path, default=Path("gpu-results.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-gpu-", dir=a.workdir))
    r: dict = {"machine": machine(), "device": a.device, "size_gb": a.size_gb, "shards": a.shards}
    try:
        with SeaweedServer(work / "s3") as srv:
            env = dict(os.environ, **srv.env())
            model = work / "model"
            model.mkdir()
            per_shard = a.size_gb * 1e9 / a.shards
            layers = max(1, int(per_shard / (6 * 4096 * 4096 * 2)))  # 6 bf16 4096² tensors a layer
            for i in range(a.shards):
                write_safetensors(model / f"model-{i + 1:05d}-of-{a.shards:05d}.safetensors",
                                  layer_tensors(layers, 4096, dtype="BF16"), seed=i)
            shards = sorted(model.glob("*.safetensors"))
            size = sum(p.stat().st_size for p in shards)
            r["bytes"] = size
            c = client(srv)
            raw, mfs = new_bucket(c, "raw"), new_bucket(c, "mfs")
            for p in shards:
                c.upload_file(str(p), raw, p.name)
            t = time.perf_counter()
            subprocess.run([str(BIN / "modelfs"), "-j", "32", "publish", str(model), f"s3://{mfs}/reg", "--name", "m",
                            "-q"], env=env, check=True, capture_output=True)
            r["publish_GBps"] = size / (time.perf_counter() - t) / 1e9
            keys = [p.name for p in shards]

            rates = {}
            for procs in (1, 4, 8):
                drop_caches()
                rates[procs] = size / ranged_get(srv, raw, keys, procs) / 1e9
            best = max(rates, key=rates.get)
            r["ranged_get_GBps"] = rates
            dl = work / "download"
            dl.mkdir()
            drop_caches()
            t_dl = ranged_get(srv, raw, keys, best, dest=dl)
            r["download_then_load_s"] = t_dl + _load(sorted(dl.glob("*.safetensors")), a.device)
            shutil.rmtree(dl)
            drop_caches()
            r["local_load_s"] = _load(shards, a.device)

            cache = work / "cache"
            drop_caches()
            m = Mount(env, f"s3://{mfs}/reg/m", work / "mnt", cache)
            try:
                c0, t0 = m.cpu(), time.perf_counter()
                r["mount_cold_load_s"] = _load(sorted((work / "mnt").glob("*.safetensors")), a.device)
                r["mount_cold_load_cores"] = (m.cpu() - c0) / (time.perf_counter() - t0)
            finally:
                m.close()
            shutil.rmtree(cache)
            m = Mount(env, f"s3://{mfs}/reg/m", work / "mnt", cache)
            try:
                drop_caches()
                c0 = m.cpu()
                t = sum(seq_read(work / "mnt" / k) for k in keys)
                r["mount_cold_seq_GBps"] = size / t / 1e9
                r["mount_cold_seq_cores"] = (m.cpu() - c0) / t
            finally:
                m.close()
            m = Mount(env, f"s3://{mfs}/reg/m", work / "mnt", cache)
            try:
                drop_caches()
                r["mount_warm_seq_GBps"] = size / sum(seq_read(work / "mnt" / k) for k in keys) / 1e9
            finally:
                m.close()
            drop_caches()
            r["local_seq_GBps"] = size / sum(seq_read(p) for p in shards) / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["ratios"] = {
        "cold mount + load / (download + load) (target <= 0.8)": r["mount_cold_load_s"] / r["download_then_load_s"],
        "cold seq / best ranged GET (target >= 0.85)": r["mount_cold_seq_GBps"] / max(r["ranged_get_GBps"].values()),
        "warm seq / local disk (target >= 0.7)": r["mount_warm_seq_GBps"] / r["local_seq_GBps"],
    }
    a.out.write_text(json.dumps(r, indent=2))
    for k, v in r.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")


if __name__ == "__main__":
    main()

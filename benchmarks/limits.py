"""What bounds the read path on this machine: modelfs beside the least each of its steps costs, in one run.

    .venv/bin/python benchmarks/limits.py [--size-mib 1024] [--runs 3]      # as root, from any directory

The suite (``suite.py``) says how modelfs compares with other tools; this says how
far modelfs is from the floor of what it must do, and where that floor lies against
issue 10's targets on this machine. Every scenario reads the same 1 GiB safetensors
file from the same SeaweedFS, page cache dropped before each, interleaved, medians:

cold (empty caches)
  * modelfs, a fresh mount: MB/s and CPU-s per GB of modelfs (all processes), the
    store and the reader;
  * the fetch workers' steps without FUSE, the way a mount runs them (2 processes ×
    8 threads over the model's chunk objects): GET only; GET + decode + BLAKE3;
    GET + decode + BLAKE3 + the LMDB cache write;
  * s3fs with ``use_cache`` (the best other mount in the suite's runs), if installed.
warm (a full cache, a new mount)
  * modelfs; the least a pyfuse3 server can do over the same LMDB cache
    (``minimal_fs.py lmdb``) and from memory (``minimal_fs.py ram``); s3fs
    ``use_cache``; the file on local disk.

The floor of a verified, cached cold read through FUSE is the workers' full step
(GET + BLAKE3 + cache write) plus the minimal server's cost of handing bytes to the
kernel; with the store's and the reader's cost beside it, it gives the most MB/s
this machine's cores allow: ``cores / (floor + store + reader)``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import MiB, client, drop_caches, machine, new_bucket, proc_cpu_seconds, seq_read  # noqa: E402
from suite import BIG, Target, make_targets  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.mount.mountpoint import set_kernel_readahead  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

HERE = Path(__file__).parent
STAGES = ("get", "verify", "write")


def _stage_proc(kind: str, cache_dir: str, objs: list[tuple[str, str]], threads: int, start, out) -> None:
    """One fetch-worker-like process: ``threads`` threads doing ``kind`` over ``objs``
    once every process is ready (``start``); puts its CPU seconds for the work in ``out``."""
    from modelfs.cache import BlockCache
    from modelfs.format.codec import HEADER, ChunkCodec
    from modelfs.config import Timeouts
    from modelfs.transfer.http import HttpClient
    from modelfs.transfer.worker import _bound_malloc
    _bound_malloc()
    gc.freeze()  # as a worker does once started
    getter, codec = HttpClient(Timeouts()), ChunkCodec(None)
    cache = BlockCache(Path(cache_dir), 64 << 30) if kind == "write" else None

    def one(obj: tuple[str, str]) -> None:
        h, url = obj
        blob = getter.get(url, 64 << 20)
        if kind == "get":
            return
        raw = codec.decode(blob, h, HEADER.unpack_from(blob)[-1])  # the raw size: the header's last field
        if cache is not None:
            cache.write([(h, raw)])

    with ThreadPoolExecutor(threads) as ex:
        start.wait()
        cpu = time.process_time()
        list(ex.map(one, objs))
    out.put(time.process_time() - cpu)


def _result(out, ps, kind: str) -> float:
    """One stage process's CPU seconds; RuntimeError as soon as one of them failed."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1)
        except queue.Empty:
            if any(p.exitcode for p in ps):
                raise RuntimeError(f"stage {kind}: a process failed") from None
    raise RuntimeError(f"stage {kind}: no result within 600 s")


def stage(kind: str, cache_dir: Path, objs: list[tuple[str, str]], store_pid: int,
          procs: int = 2, threads: int = 8) -> tuple[float, float, float]:
    """(seconds, CPU seconds of the processes, CPU seconds of the store) for ``procs``
    processes to run ``kind`` over all chunk objects, their start-up not counted."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_stage_proc, args=(kind, str(cache_dir), objs[i::procs], threads, start, out))
          for i in range(procs)]
    for p in ps:
        p.start()
    drop_caches()
    start.wait()
    t, s0 = time.perf_counter(), proc_cpu_seconds(store_pid)
    cpu = sum(_result(out, ps, kind) for _ in ps)
    secs, store = time.perf_counter() - t, proc_cpu_seconds(store_pid) - s0
    for p in ps:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"stage {kind}: a process failed ({p.exitcode})")
    return secs, cpu, store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    res: dict[str, list[float]] = {}

    def rec(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)
        print(f"  {key:40s} {value:8.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="modelfs-limits-") as tmp_s, SeaweedServer(Path(tmp_s) / "s3") as srv:
        tmp = Path(tmp_s)
        env = dict(os.environ, **srv.env())
        local = tmp / "local"
        local.mkdir()
        layers = max(1, round(1365 * args.size_mib / 1024))
        write_safetensors(local / BIG, layer_tensors(layers, 256, dtype="F16"), seed=1)
        size = (local / BIG).stat().st_size
        gb = size / 1e9
        c = client(srv)
        plain, mb = new_bucket(c, "plain"), new_bucket(c, "modelfs")
        c.upload_file(str(local / BIG), plain, f"plain/{BIG}")
        subprocess.run([str(Path(sys.executable).parent / "modelfs"), "publish", str(local), f"s3://{mb}/reg",
                        "--name", "m", "-q"], env=env, check=True, capture_output=True)
        objs = [(o["Key"].rsplit("/", 1)[1],
                 c.generate_presigned_url("get_object", Params={"Bucket": mb, "Key": o["Key"]}, ExpiresIn=3600))
                for page in c.get_paginator("list_objects_v2").paginate(Bucket=mb, Prefix="reg/chunks/")
                for o in page.get("Contents", [])]
        targets = {t.name: t for t in make_targets(tmp, srv, plain, mb, local)}
        modelfs, s3fs, disk = targets["modelfs"], targets.get("s3fs (use_cache)"), targets["local disk"]
        minimal = {m: Target(f"minimal ({m})", [sys.executable, str(HERE / "minimal_fs.py"),
                                                str(modelfs.persistent_cache), "{mnt}", m]) for m in ("lmdb", "ram")}
        mnt = tmp / "mnt"
        mnt.mkdir()

        def read(t: Target, key: str, fresh: bool = False) -> None:
            root = t.start(mnt, fresh=fresh)
            if t.name.startswith("minimal"):
                set_kernel_readahead(mnt, 1024)  # what a modelfs mount sets for itself
            drop_caches()
            pid = t.proc.pid if t.proc else None
            c0, s0, r0 = proc_cpu_seconds(pid) if pid else 0.0, proc_cpu_seconds(srv.proc.pid), time.process_time()
            secs = seq_read(root / BIG)
            rec(f"{key} MB/s", size / secs / 1e6)
            if pid:
                rec(f"{key} CPU-s/GB", (proc_cpu_seconds(pid) - c0) / gb)
            if fresh:
                rec(f"{key} store CPU-s/GB", (proc_cpu_seconds(srv.proc.pid) - s0) / gb)
                rec(f"{key} reader CPU-s/GB", (time.process_time() - r0) / gb)
            t.stop(mnt)

        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            read(modelfs, "cold modelfs", fresh=True)
            if s3fs:
                read(s3fs, "cold s3fs use_cache", fresh=True)
            for kind in STAGES:
                secs, cpu, store = stage(kind, tmp / "stage-cache", objs, srv.proc.pid)
                rec(f"stage {kind} MB/s", size / secs / 1e6)
                rec(f"stage {kind} CPU-s/GB", cpu / gb)
                rec(f"stage {kind} store CPU-s/GB", store / gb)
            read(modelfs, "warm modelfs")
            read(minimal["lmdb"], "warm minimal (LMDB)")
            read(minimal["ram"], "minimal (RAM)")
            if s3fs:
                read(s3fs, "warm s3fs use_cache")
            read(disk, "local disk")

    med = {k: statistics.median(v) for k, v in res.items()}
    cores = os.cpu_count() or 1
    print(f"\n{size / MiB:.0f} MiB safetensors, medians of {args.runs}; {machine()}\n")
    print("| scenario | MB/s | CPU-s/GB (itself) | store CPU-s/GB | reader CPU-s/GB |\n|---|---|---|---|---|")
    for key in dict.fromkeys(k.rsplit(" MB/s", 1)[0] for k in res if k.endswith(" MB/s")):
        g = lambda s: f"{med[key + s]:.2f}" if key + s in med else ""  # noqa: E731
        print(f"| {key} | {med[key + ' MB/s']:.0f} | {g(' CPU-s/GB')} | {g(' store CPU-s/GB')} | {g(' reader CPU-s/GB')} |")
    step, serving = med["stage write CPU-s/GB"], med["warm minimal (LMDB) CPU-s/GB"]
    floor = step + serving
    store, reader = med["cold modelfs store CPU-s/GB"], med["cold modelfs reader CPU-s/GB"]
    print(f"\nfloor of a verified, cached read through FUSE: {floor:.2f} CPU-s/GB "
          f"(workers' full step {step:.2f} + minimal FUSE serving {serving:.2f}); "
          f"modelfs cold: {med['cold modelfs CPU-s/GB']:.2f}")
    print(f"most this machine allows cold: {cores} cores / ({floor:.2f} + store {store:.2f} + reader {reader:.2f}) "
          f"= {cores / (floor + store + reader) * 1e3:.0f} MB/s; modelfs cold {med['cold modelfs MB/s']:.0f}")
    if s3fs:
        print(f"cold target 1.3 × s3fs use_cache = {1.3 * med['cold s3fs use_cache MB/s']:.0f} MB/s; "
              f"warm target 1.5 × s3fs use_cache warm = {1.5 * med['warm s3fs use_cache MB/s']:.0f} MB/s")
    print(f"warm: modelfs ÷ minimal (LMDB) {med['warm modelfs MB/s'] / med['warm minimal (LMDB) MB/s']:.2f}; "
          f"minimal (LMDB) ÷ local disk {med['warm minimal (LMDB) MB/s'] / med['local disk MB/s']:.2f}; "
          f"modelfs ÷ local disk {med['warm modelfs MB/s'] / med['local disk MB/s']:.2f} (target 0.7)")


if __name__ == "__main__":
    main()

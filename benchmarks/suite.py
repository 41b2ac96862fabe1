"""modelfs against the raw store and the tools users would pick instead, in one run.

    .venv/bin/python benchmarks/suite.py [--size-mib 2048] [--runs 3] [--preads 2000] [--out DIR]
    .venv/bin/python benchmarks/suite.py --quick          # small sizes; CI runs this (no timing asserted)

Run as root (it drops the page cache and mounts FUSE filesystems). It starts its
own SeaweedFS, generates a safetensors file with a real header (F16, so numpy can
load it) and a directory of ~200 small files, stores them both as a modelfs model
and as plain objects (for the other tools), then runs every scenario for every
target, interleaved, ``--runs`` times, and writes ``results.json``, ``results.md``
and ``chart.png`` under ``--out`` (default ``benchmarks/results/latest``).

Targets: modelfs mount; rclone mount (--vfs-cache-mode off, full); s3fs-fuse
(without and with use_cache); the file on local disk. Baselines: boto3 parallel
8 MiB ranged GETs into memory (8 and 16 in flight); download-first with s5cmd cp
and modelfs pull.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (MiB, PrivateMemory, client, drop_caches, load_safetensors_s, machine,  # noqa: E402
                    median, new_bucket, percentile, proc_cpu_seconds, proc_peak_rss_mib, seq_read)

from modelfs.dev.devserver import ACCESS_KEY, SECRET_KEY, SeaweedServer  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

BIG = "model.safetensors"
SMALL = "small"
BIN = Path(sys.executable).parent
# rclone's AWS SDK fails on a custom CA bundle it cannot apply to its transport
# (and the store here is plain HTTP on loopback anyway)
RCLONE_UNSET = ("AWS_CA_BUNDLE",)


# -- targets: something that shows the data as files ------------------------------------

@dataclass
class Target:
    name: str
    cmd: list[str] | None  # a FUSE daemon to start in the foreground; None: local disk
    env: dict = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # environment variables the tool must not see
    persistent_cache: Path | None = None  # survives a remount (warm reads)
    root: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self, mnt: Path, fresh: bool) -> Path:
        if self.cmd is None:
            return self.root
        if fresh and self.persistent_cache is not None:
            shutil.rmtree(self.persistent_cache, ignore_errors=True)
            self.persistent_cache.mkdir(parents=True)
        cmd = [str(mnt) if c == "{mnt}" else c for c in self.cmd]
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        self.proc = subprocess.Popen(cmd, env=dict(env, **self.env), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (os.path.ismount(mnt) and (mnt / BIG).exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: mount failed ({' '.join(cmd)})")
            time.sleep(0.1)
        return mnt

    def stop(self, mnt: Path) -> None:
        if self.proc is None:
            return
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        self.proc = None


def make_targets(tmp: Path, srv: SeaweedServer, bucket: str, modelfs_bucket: str, local: Path) -> list[Target]:
    rclone_env = {"RCLONE_CONFIG_S3_TYPE": "s3", "RCLONE_CONFIG_S3_PROVIDER": "Other",
                  "RCLONE_CONFIG_S3_ENDPOINT": srv.endpoint, "RCLONE_CONFIG_S3_ACCESS_KEY_ID": ACCESS_KEY,
                  "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": SECRET_KEY, "RCLONE_CONFIG_S3_REGION": "us-east-1"}
    pw = tmp / "s3fs.passwd"
    pw.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    pw.chmod(0o600)
    s3fs = ["s3fs", f"{bucket}:/plain", "{mnt}", "-f", "-o", f"url={srv.endpoint}", "-o",
            "use_path_request_style", "-o", f"passwd_file={pw}", "-o", "ro"]
    targets = [
        Target("modelfs", [str(BIN / "modelfs"), "mount", f"s3://{modelfs_bucket}/reg/m", "{mnt}",
                           "--foreground", "--cache-dir", str(tmp / "cache-modelfs"), "--cache-size", "64G"],
               env=srv.env(), persistent_cache=tmp / "cache-modelfs"),
        Target("rclone (cache off)", ["rclone", "mount", f"s3:{bucket}/plain", "{mnt}", "--read-only",
                                      "--vfs-cache-mode", "off", "--cache-dir", str(tmp / "cache-rclone-off")],
               env=rclone_env, unset=RCLONE_UNSET),
        Target("rclone (cache full)", ["rclone", "mount", f"s3:{bucket}/plain", "{mnt}", "--read-only",
                                       "--vfs-cache-mode", "full", "--cache-dir", str(tmp / "cache-rclone")],
               env=rclone_env, unset=RCLONE_UNSET, persistent_cache=tmp / "cache-rclone"),
        Target("s3fs", s3fs),
        Target("s3fs (use_cache)", s3fs + ["-o", f"use_cache={tmp / 'cache-s3fs'}"],
               persistent_cache=tmp / "cache-s3fs"),
        Target("local disk", None, root=local),
    ]
    return [t for t in targets if t.cmd is None or shutil.which(t.cmd[0])]


# -- scenarios ---------------------------------------------------------------------------

def first_4k_ms(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.read(4096)
    return (time.perf_counter() - t) * 1e3


def preads_ms(path: Path, offsets: list[int], size: int) -> list[float]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t = time.perf_counter()
            os.pread(fd, size, off)
            out.append((time.perf_counter() - t) * 1e3)
    finally:
        os.close(fd)
    return out


def small_files_s(root: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["ls", "-lR", str(root)], stdout=subprocess.DEVNULL, check=True)
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                f.read()
    return time.perf_counter() - t


def ranged_gets_s(c, bucket: str, key: str, size: int, inflight: int, part: int = 8 * MiB) -> float:
    def get(off):
        end = min(off + part, size) - 1
        return len(c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"].read())
    t = time.perf_counter()
    with ThreadPoolExecutor(inflight) as ex:
        assert sum(ex.map(get, range(0, size, part))) == size
    return time.perf_counter() - t


def run_target(t: Target, tmp: Path, size: int, offsets: list[int], rec) -> None:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    big = lambda root: root / BIG  # noqa: E731

    def preads(root: Path, state: str) -> None:
        for label, n in (("4KiB", 4096), ("1MiB", MiB)):
            lat = preads_ms(big(root), offsets, n)
            rec(t.name, f"pread_{label}_{state}_p50_ms", percentile(lat, 0.5))
            rec(t.name, f"pread_{label}_{state}_p99_ms", percentile(lat, 0.99))

    # cold: fresh daemon and empty cache, page cache dropped; then hot (page cache)
    root = t.start(mnt, fresh=True)
    drop_caches()
    cpu0 = proc_cpu_seconds(t.proc.pid) if t.proc else 0.0
    with PrivateMemory(t.proc.pid if t.proc else None) as private:
        rec(t.name, "seq_cold_MBps", size / seq_read(big(root)) / 1e6)
    if t.proc:
        rec(t.name, "cpu_s_per_GB_cold", (proc_cpu_seconds(t.proc.pid) - cpu0) / (size / 1e9))
        rec(t.name, "peak_rss_MiB", proc_peak_rss_mib(t.proc.pid))
        rec(t.name, "peak_private_MiB", private.peak_mib)
    rec(t.name, "seq_hot_MBps", size / seq_read(big(root)) / 1e6)
    t.stop(mnt)
    # warm: remount on the cache the cold read filled (if the tool keeps one), page cache dropped
    root = t.start(mnt, fresh=False)
    drop_caches()
    rec(t.name, "seq_warm_MBps", size / seq_read(big(root)) / 1e6)
    drop_caches()
    preads(root, "warm")
    t.stop(mnt)
    # first bytes (the first access of a fresh mount: a tool that downloads the whole
    # file on open pays for it here), then random reads, all cold
    root = t.start(mnt, fresh=True)
    drop_caches()
    rec(t.name, "first_4KiB_cold_ms", first_4k_ms(big(root)))
    preads(root, "cold")
    t.stop(mnt)
    # loading every tensor (mmap) from a cold start; metadata + small files from a cold start
    root = t.start(mnt, fresh=True)
    drop_caches()
    rec(t.name, "safetensors_load_cold_s", load_safetensors_s(big(root)))
    rec(t.name, "small_files_cold_s", small_files_s(root / SMALL))
    t.stop(mnt)


def _stored_bytes(c, bucket: str) -> int:
    total = 0
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="reg/chunks/"):
        total += sum(o["Size"] for o in page.get("Contents", ()))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--small-files", type=int, default=200)
    ap.add_argument("--preads", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (for CI)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest")
    args = ap.parse_args()
    # a SIGTERM must unwind like Ctrl-C: unmount, stop the server, remove temp files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.size_mib, args.small_files, args.preads, args.runs = 48, 20, 20, 1
    args.out.mkdir(parents=True, exist_ok=True)
    values: dict[str, dict[str, list[float]]] = {}

    def rec(target: str, metric: str, v: float) -> None:
        values.setdefault(target, {}).setdefault(metric, []).append(v)

    with tempfile.TemporaryDirectory(prefix="modelfs-suite-") as tmp_s, \
            SeaweedServer(Path(tmp_s) / "s3") as srv:
        tmp = Path(tmp_s)
        env = dict(os.environ, **srv.env())
        c = client(srv)
        data = tmp / "data"
        (data / SMALL).mkdir(parents=True)
        layers = max(1, args.size_mib * MiB // (6 * 256 * 256 * 2 + 1024))
        write_safetensors(data / BIG, layer_tensors(layers, 256, dtype="F16"), seed=1)
        rng = random.Random(0)
        for i in range(args.small_files):
            sub = data / SMALL / f"d{i % 10}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:03d}.json").write_bytes(rng.randbytes(rng.randrange(100, 64 << 10)))
        size = (data / BIG).stat().st_size
        plain = new_bucket(c, "plain")
        for p in sorted(data.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), plain, f"plain/{p.relative_to(data).as_posix()}")
        mfs = new_bucket(c, "mfs")
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "modelfs"), "publish", str(data), f"s3://{mfs}/reg", "--name", "m", "-q"],
                       env=env, check=True, capture_output=True)
        rec("modelfs", "publish_MBps", size / (time.perf_counter() - t0) / 1e6)
        targets = make_targets(tmp, srv, plain, mfs, data)
        rng = random.Random(7)
        offsets = [rng.randrange(size - MiB) for _ in range(args.preads)]
        assert len(set(offsets)) > len(offsets) // 2
        for run in range(args.runs):
            for inflight in (8, 16):
                rec("boto3 ranged GETs", f"seq_cold_MBps_{inflight}",
                    size / ranged_gets_s(c, plain, f"plain/{BIG}", size, inflight) / 1e6)
            # download first, then load from local disk
            for name, cmd in (("s5cmd cp", [str(BIN / "s5cmd"), "--endpoint-url", srv.endpoint, "cp",
                                             f"s3://{plain}/plain/{BIG}", str(tmp / "dl" / BIG)]),
                              ("modelfs pull", [str(BIN / "modelfs"), "pull", "-q", f"s3://{mfs}/reg/m",
                                                str(tmp / "dl")])):
                shutil.rmtree(tmp / "dl", ignore_errors=True)
                (tmp / "dl").mkdir()
                drop_caches()
                t = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                dl = time.perf_counter() - t
                rec(name, "download_MBps", size / dl / 1e6)
                rec(name, "download_then_load_s", dl + load_safetensors_s(tmp / "dl" / BIG))
            for t in targets:
                try:
                    run_target(t, tmp, size, offsets, rec)
                finally:
                    t.stop(tmp / "mnt")
            print(f"run {run + 1}/{args.runs} done", flush=True)
        # last, because it changes the file: re-publish after changing 1% of its bytes
        # (one region, like a retrained layer); bytes counted from the store's listing
        before = _stored_bytes(c, mfs)
        with open(data / BIG, "r+b") as f:
            f.seek(size // 3)
            f.write(os.urandom(size // 100))
        subprocess.run([str(BIN / "modelfs"), "publish", str(data), f"s3://{mfs}/reg", "--name", "m", "-q"],
                       env=env, check=True, capture_output=True)
        rec("modelfs", "republish_1pct_uploaded_MiB", (_stored_bytes(c, mfs) - before) / MiB)

    med = {t: {m: round(median(v), 3) for m, v in ms.items()} for t, ms in values.items()}
    report(args, size, med, values)


def report(args, size: int, med: dict, values: dict) -> None:
    mounts = [t for t in med if t not in ("modelfs", "local disk", "boto3 ranged GETs", "s5cmd cp", "modelfs pull")
              and "seq_cold_MBps" in med[t]]
    m = med["modelfs"]
    limit = max(med["boto3 ranged GETs"].values())
    best = lambda metric, hi=True: (max if hi else min)(med[t][metric] for t in mounts) if mounts else float("nan")  # noqa: E731
    ratios = {
        "modelfs cold seq / boto3 limit (target >= 0.85)": m["seq_cold_MBps"] / limit,
        "modelfs cold seq / best other mount (target >= 1.5)": m["seq_cold_MBps"] / best("seq_cold_MBps"),
        "modelfs cold load / (s5cmd cp + local load) (target <= 1)":
            m["safetensors_load_cold_s"] / med["s5cmd cp"]["download_then_load_s"],
        "modelfs warm seq / best other mount warm (target >= 2)": m["seq_warm_MBps"] / best("seq_warm_MBps"),
        "modelfs cold 4KiB p99 / best other mount (target <= 1)":
            m["pread_4KiB_cold_p99_ms"] / best("pread_4KiB_cold_p99_ms", hi=False),
    }
    res = {"machine": machine(), "command": " ".join(sys.argv), "bytes": size, "runs": args.runs,
           "preads": args.preads, "small_files": args.small_files, "medians": med,
           "ratios": {k: round(v, 3) for k, v in ratios.items()}, "all": values}
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    metrics = ["seq_cold_MBps", "seq_warm_MBps", "seq_hot_MBps", "first_4KiB_cold_ms",
               "pread_4KiB_cold_p50_ms", "pread_4KiB_cold_p99_ms", "pread_4KiB_warm_p99_ms",
               "pread_1MiB_cold_p99_ms", "safetensors_load_cold_s", "small_files_cold_s",
               "cpu_s_per_GB_cold", "peak_rss_MiB", "peak_private_MiB"]
    rows = [t for t in med if "seq_cold_MBps" in med[t]]
    lines = [f"{size / MiB:.0f} MiB safetensors, {args.small_files} small files, {args.preads} preads, "
             f"medians of {args.runs} run(s); {machine()}", "",
             "| target | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for t in rows:
        lines.append(f"| {t} | " + " | ".join(f"{med[t].get(k, float('nan')):.1f}" for k in metrics) + " |")
    lines += ["", "| baseline | value |", "|---|---|"]
    for k, v in med["boto3 ranged GETs"].items():
        lines.append(f"| boto3 ranged 8 MiB GETs, {k.rsplit('_', 1)[1]} in flight (MB/s) | {v:.1f} |")
    for name in ("s5cmd cp", "modelfs pull"):
        lines.append(f"| {name}: download MB/s / download + load s | {med[name]['download_MBps']:.1f} / "
                     f"{med[name]['download_then_load_s']:.2f} |")
    lines.append(f"| modelfs publish (MB/s) | {m['publish_MBps']:.1f} |")
    lines.append(f"| modelfs re-publish after a 1% change: MiB uploaded ({0.01 * size / MiB:.1f} MiB changed) "
                 f"| {m['republish_1pct_uploaded_MiB']:.1f} |")
    lines += ["", "| ratio (one run, same machine) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    chart(args.out / "chart.png", med, rows)
    print("\n".join(lines))
    print(f"\nwrote {args.out}/results.json, results.md, chart.png")


def chart(path: Path, med: dict, rows: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.27
    for i, (metric, label) in enumerate((("seq_cold_MBps", "cold"), ("seq_warm_MBps", "warm (remount)"),
                                         ("seq_hot_MBps", "hot"))):
        ax1.bar([x + (i - 1) * w for x in range(len(rows))], [med[t][metric] for t in rows], w, label=label)
    ax1.axhline(max(med["boto3 ranged GETs"].values()), color="k", ls="--", lw=1, label="boto3 ranged GET limit")
    ax1.set_yscale("log")
    ax1.set_ylabel("MB/s (log)")
    ax1.set_title("Sequential read of the safetensors file")
    ax1.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
    ax1.legend(fontsize=8)
    for i, (metric, label) in enumerate((("pread_4KiB_cold_p50_ms", "4 KiB p50"), ("pread_4KiB_cold_p99_ms", "4 KiB p99"),
                                         ("pread_1MiB_cold_p99_ms", "1 MiB p99"))):
        ax2.bar([x + (i - 1) * w for x in range(len(rows))], [max(med[t][metric], 0.001) for t in rows], w, label=label)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (log)")
    ax2.set_title("Random preads, cold")
    ax2.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

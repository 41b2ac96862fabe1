"""Read-path benchmark: the mount against the raw store and local disk, as ratios in one run.

    .venv/bin/python benchmarks/mount.py [--size-mib 2048] [--runs 3]

One SeaweedFS, one safetensors file (published with modelfs, and also stored as
one plain object for the baselines). Per run, interleaved:

* limit: boto3 parallel 8 MiB ranged GETs of the plain object into memory (8 and 16 in flight);
* small GET: one 4 KiB ranged GET (median of 20);
* cold: fresh mount, empty cache, page cache dropped, sequential 1 MiB reads;
* first bytes: fresh mount, empty cache: 4 KiB preads at 10 far-apart offsets (median);
* warm: remount on the same cache, page cache dropped, sequential read; vs. the
  same file on local disk with a cold page cache;
* hot: the same mount again (kernel page cache).

The daemon's peak RSS (VmHWM) after a cold read is reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import client, machine, median, new_bucket, save  # noqa: E402

from modelfs.devserver import SeaweedServer  # noqa: E402
from modelfs.sample import layer_tensors, write_safetensors  # noqa: E402

MiB = 1 << 20


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        print(f"warning: cannot drop the page cache ({e}); cold figures are warm", file=sys.stderr)


def seq_read(path: Path, block: int = MiB) -> float:
    """Seconds to read the file sequentially in ``block`` reads (like dd bs=1M)."""
    buf = bytearray(block)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def ranged_gets(c, bucket: str, key: str, size: int, inflight: int, part: int = 8 * MiB) -> float:
    def get(off):
        end = min(off + part, size) - 1
        return len(c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"].read())
    t = time.perf_counter()
    with ThreadPoolExecutor(inflight) as ex:
        total = sum(ex.map(get, range(0, size, part)))
    assert total == size
    return time.perf_counter() - t


class Mount:
    def __init__(self, env, ref: str, mnt: Path, cache: Path):
        r = subprocess.run([sys.executable, "-m", "modelfs", "mount", ref, str(mnt), "--cache-dir",
                            str(cache), "--cache-size", "64G"], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        self.pid = int(r.stdout.split("(pid ")[1].split(";")[0])
        self.mnt = mnt

    def peak_rss_mib(self) -> float:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self, env) -> None:
        subprocess.run([sys.executable, "-m", "modelfs", "unmount", str(self.mnt)], env=env, check=True,
                       capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}

    def rec(k: str, v: float) -> None:
        rows.setdefault(k, []).append(v)

    with tempfile.TemporaryDirectory(prefix="modelfs-bench-") as tmp, \
            SeaweedServer(Path(tmp) / "s3") as srv:
        tmp = Path(tmp)
        env = dict(os.environ, **srv.env())
        c = client(srv)
        model = tmp / "model"
        model.mkdir()
        layers = args.size_mib * MiB // (6 * 256 * 256 * 2 + 1024)
        write_safetensors(model / "model.safetensors", layer_tensors(layers, 256), seed=1)
        local = model / "model.safetensors"
        size = local.stat().st_size
        b = new_bucket(c, "bench")
        c.upload_file(str(local), b, "plain/model.safetensors")
        subprocess.run([sys.executable, "-m", "modelfs", "publish", str(model), f"s3://{b}/reg",
                        "--name", "m", "-q"], env=env, check=True, capture_output=True)
        ref = f"s3://{b}/reg/m"
        for run in range(args.runs):
            for inflight in (8, 16):
                rec(f"boto3_ranged_{inflight}_MBps", size / ranged_gets(c, b, "plain/model.safetensors",
                                                                        size, inflight) / 1e6)
            lat = []
            for i in range(20):
                t = time.perf_counter()
                c.get_object(Bucket=b, Key="plain/model.safetensors", Range=f"bytes={i * 4096}-{i * 4096 + 4095}")["Body"].read()
                lat.append(time.perf_counter() - t)
            rec("small_get_4KiB_ms", statistics.median(lat) * 1e3)

            cache = tmp / f"cache{run}"
            mnt = tmp / f"mnt{run}"
            mnt.mkdir()
            # first bytes, cold: far-apart offsets, fresh mount and cache
            m = Mount(env, ref, mnt, tmp / f"first{run}")
            drop_caches()
            fd = os.open(mnt / "model.safetensors", os.O_RDONLY)
            lat = []
            for i in range(10):
                off = (i * 2 + 1) * size // 21
                t = time.perf_counter()
                os.pread(fd, 4096, off)
                lat.append(time.perf_counter() - t)
            os.close(fd)
            rec("mount_first_4KiB_ms", statistics.median(lat) * 1e3)
            m.close(env)
            # cold sequential
            m = Mount(env, ref, mnt, cache)
            drop_caches()
            rec("mount_cold_seq_MBps", size / seq_read(mnt / "model.safetensors") / 1e6)
            rec("daemon_peak_rss_MiB", m.peak_rss_mib())
            m.close(env)
            # warm (persistent cache, page cache dropped) and hot (page cache)
            m = Mount(env, ref, mnt, cache)
            drop_caches()
            rec("mount_warm_seq_MBps", size / seq_read(mnt / "model.safetensors") / 1e6)
            rec("mount_hot_seq_MBps", size / seq_read(mnt / "model.safetensors") / 1e6)
            m.close(env)
            drop_caches()
            rec("local_cold_seq_MBps", size / seq_read(local) / 1e6)
            rec("local_hot_seq_MBps", size / seq_read(local) / 1e6)
            print(f"run {run + 1}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in rows.items()), flush=True)

    med = {k: round(median(v), 2) for k, v in rows.items()}
    limit = max(med["boto3_ranged_8_MBps"], med["boto3_ranged_16_MBps"])
    ratios = {
        "cold_seq_over_boto3_limit": round(med["mount_cold_seq_MBps"] / limit, 3),
        "first_4KiB_over_small_get": round(med["mount_first_4KiB_ms"] / med["small_get_4KiB_ms"], 2),
        "warm_over_local_cold": round(med["mount_warm_seq_MBps"] / med["local_cold_seq_MBps"], 3),
        "hot_over_local_hot": round(med["mount_hot_seq_MBps"] / med["local_hot_seq_MBps"], 3),
    }
    res = {"machine": machine(), "bytes": size, "runs": args.runs, "medians": med, "ratios": ratios,
           "all": rows}
    print(save("mount", res))
    for k, v in {**med, **ratios}.items():
        print(f"{k:32} {v}")


if __name__ == "__main__":
    main()

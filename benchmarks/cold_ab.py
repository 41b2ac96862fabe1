"""A cold sequential read through a fresh mount: this tree against another, interleaved.

    .venv/bin/python benchmarks/cold_ab.py --base TREE [--size-mib 1024] [--runs 3]   # as root, from /tmp

Publishes a 1 GiB F16 safetensors file to its own SeaweedFS once, then, for each run
and each tree (this one and ``--base``, e.g. an earlier commit's ``git archive``; the
order alternates between runs): a mount with an empty cache, page cache dropped, the
file read like ``dd bs=1M``. Prints MB/s and the CPU seconds per GB of the daemon and
of its fetch workers (from /proc, the read only), each run and medians.

What it is for: a change of a few percent of the daemon's CPU is below this machine's
noise between runs (±20%), but not between the two halves of one pair; read the
pairs, not only the medians. Both trees must read the version as published (this
tree publishes it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import _children, ab_arguments, ab_setup, client, drop_caches, machine, new_bucket  # noqa: E402


def cpu_seconds(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().split(")")[-1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cold_read(tree: str, env: dict, ref: str, mnt: Path, cache: Path, f: str) -> tuple[float, float, float]:
    """(MB/s, daemon CPU-s/GB, workers CPU-s/GB) of one cold read of ``f`` through a fresh mount."""
    shutil.rmtree(cache, ignore_errors=True)
    p = subprocess.Popen([sys.executable, "-m", "modelfs", "mount", ref, str(mnt), "--foreground",
                          "--cache-dir", str(cache)], env=dict(env, PYTHONPATH=tree), cwd="/tmp")
    try:
        for _ in range(300):
            if os.path.ismount(mnt):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"the mount of {tree} did not come up")
        time.sleep(1.0)  # the workers report ready
        workers = _children(p.pid)
        drop_caches()
        c0 = {q: cpu_seconds(q) for q in [p.pid, *workers]}
        t, n = time.perf_counter(), 0
        with open(mnt / f, "rb", buffering=0) as fh:
            while k := len(fh.read(1 << 20)):
                n += k
        secs = time.perf_counter() - t
        c1 = {q: cpu_seconds(q) for q in c0}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        p.wait()
    gb = n / 1e9
    return n / secs / 1e6, (c1[p.pid] - c0[p.pid]) / gb, sum(c1[q] - c0[q] for q in workers) / gb


def main() -> None:
    args = ab_arguments(__doc__, "mount")
    if args.base is None:
        raise SystemExit("--base TREE is required (a modelfs source tree to compare with)")
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"this tree": here, f"base {args.base}": str(args.base.resolve())}
    res: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    with ab_setup("cold-ab", args.size_mib) as (d, srv, env, f):
        size = f.stat().st_size
        c = client(srv)
        b = new_bucket(c, "cold")
        subprocess.run([sys.executable, "-m", "modelfs", "publish", str(d / "m"), f"s3://{b}/reg", "--name", "m",
                        "-q"], env=dict(env, PYTHONPATH=here), check=True, capture_output=True, cwd="/tmp")
        mnt = d / "mnt"
        mnt.mkdir()
        for run in range(args.runs):
            for name in (list(trees) if run % 2 == 0 else list(trees)[::-1]):
                r = cold_read(trees[name], env, f"s3://{b}/reg/m", mnt, d / "cache", f.name)
                res[name].append(r)
                print(f"run {run + 1} {name:30s} {r[0]:5.0f} MB/s  daemon {r[1]:.2f}  workers {r[2]:.2f} CPU-s/GB",
                      flush=True)
    print(f"\n{size >> 20} MiB safetensors, medians of {args.runs}; {machine()}\n")
    print("| tree | MB/s | daemon CPU-s/GB | workers CPU-s/GB | all |\n|---|---|---|---|---|")
    for name, rs in res.items():
        m = [statistics.median(r[i] for r in rs) for i in range(3)]
        print(f"| {name} | {m[0]:.0f} | {m[1]:.2f} | {m[2]:.2f} | {statistics.median(r[1] + r[2] for r in rs):.2f} |")


if __name__ == "__main__":
    main()

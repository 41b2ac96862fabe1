"""How long ``modelfs mount`` takes to return (mounted, first read servable), and its first read.

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/mount_start.py [--runs 5] [--base TREE] \
        [--link RTT_MS:MBIT]

Publishes a small safetensors model (``--size-mib``, default 64) to its own SeaweedFS
(with ``--link``, on the far side of a :class:`farlink.FarLink`), then for each run and tree (this one, and ``--base`` if given, order alternating):

* warm host: a cache that already holds the version (a mount of it read it whole
  before), page cache dropped, then Python's own files read back (a host that runs
  mounts has them in memory);
* cold host: an empty cache directory.

Each: the wall time of ``modelfs mount REF MNT`` (the background start: it returns once
the daemon serves), then of reading the first 4 KiB of the file, then of the
whole file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ab_setup, client, drop_caches, machine, new_bucket, recache_programs  # noqa: E402

from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402


def mount_once(tree: str, env: dict, ref: str, mnt: Path, cache: Path, f: str) -> tuple[float, float, float]:
    """(mount seconds, first 4 KiB seconds, whole file seconds) of one mount of ``ref``."""
    drop_caches()
    e = dict(env, PYTHONPATH=tree)
    recache_programs(e)  # a host that runs mounts has Python's files in its page cache
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "modelfs", "mount", ref, str(mnt), "--cache-dir", str(cache)],
                       env=e, capture_output=True, text=True, cwd="/tmp")
    t_mount = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"mount of {tree} failed: {r.stderr}")
    try:
        t = time.perf_counter()
        with open(mnt / f, "rb", buffering=0) as fh:
            fh.read(4096)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        with open(mnt / f, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass
        t_all = time.perf_counter() - t
    finally:
        subprocess.run([sys.executable, "-m", "modelfs", "unmount", str(mnt)], env=e, capture_output=True)
    return t_mount, t_first, t_all


@contextlib.contextmanager
def far_setup(link: str, size_mib: int) -> Iterator[tuple[Path, object, dict, Path]]:
    """As ``ab_setup``, with the store behind a far link of ``RTT_MS:MBIT``."""
    from farlink import far_store

    rtt, mbit = (float(x) for x in link.split(":"))
    with far_store(rtt, mbit, "start") as (d, _, srv, env):
        (d / "m").mkdir()
        f = d / "m" / "model.safetensors"
        write_safetensors(f, layer_tensors(max(1, round(1365 * size_mib / 1024)), 256, dtype="F16"), seed=1)
        yield d, srv, env, f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", type=Path, help="another modelfs source tree, measured beside this one")
    ap.add_argument("--link", help="RTT_MS:MBIT: the store behind a far link (benchmarks/farlink.py; 0 = unshaped)")
    a = ap.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"this tree": here} | ({f"base {a.base}": str(a.base)} if a.base else {})
    with (far_setup(a.link, a.size_mib) if a.link else ab_setup("start", a.size_mib)) as (d, srv, env, f):
        bucket = new_bucket(client(srv), "start")
        subprocess.run([sys.executable, "-m", "modelfs", "publish", str(d / "m"), f"s3://{bucket}/reg", "--name", "m",
                        "--tag", "prod", "-q"], env=dict(env, PYTHONPATH=here), check=True, capture_output=True)
        ref = f"s3://{bucket}/reg/m@prod"
        mnt = d / "mnt"
        mnt.mkdir()
        res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for run in range(a.runs):
            order = list(trees.items()) if run % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                for host in ("cold", "warm"):
                    cache = d / f"cache-{abs(hash(name))}"
                    if host == "cold":
                        shutil.rmtree(cache, ignore_errors=True)  # then the cold run fills it for the warm one
                    r = mount_once(tree, env, ref, mnt, cache, "model.safetensors")
                    res.setdefault((name, host), []).append(r)
                    print(f"run {run + 1} {name:<30} {host}: mount {r[0]:.3f} s, first 4 KiB {r[1] * 1e3:.1f} ms, "
                          f"whole {r[2]:.2f} s", flush=True)
        where = f"the store behind a {a.link} (RTT ms : Mbit/s) link" if a.link else "the store on this host"
        print(f"\n{a.size_mib} MiB model, {where}, medians of {a.runs}; {machine()}\n")
        print("| tree | host | `modelfs mount` returns | first 4 KiB after | whole file |\n|---|---|---|---|---|")
        for (name, host), rs in res.items():
            med = [statistics.median(x[i] for x in rs) for i in range(3)]
            print(f"| {name} | {host} | **{med[0]:.3f} s** | {med[1] * 1e3:.1f} ms | {med[2]:.2f} s |")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root: it drops the page cache and mounts")
    main()

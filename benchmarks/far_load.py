"""A model loaded from a far store: copy-then-load, pull-then-load and a cold mount, one run.

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/far_load.py \
        [--regimes 0:0,20:1000,20:2500] [--shards 4] [--shard-mib 512] [--runs 3] \
        [--loader load_file|keys|read] [--targets copy,pull,mount] [--base TREE] [--trace DIR] [--perf DIR] \
        [--cold-programs]   # as root

For each regime ``RTT_MS:MBIT`` (``0:0``: the plain link, forwarding only) it builds a
:class:`farlink.FarLink`, starts SeaweedFS on its far side, writes ``--shards`` F16
safetensors shards of ``--shard-mib`` MiB, uploads them as plain objects (for s5cmd) and
publishes them as a modelfs model, then runs every target ``--runs`` times, interleaved,
the page cache dropped before each (then the programs' own files, Python's and the tree's
modules and s5cmd's binary, read back, as on a host that runs them; ``--cold-programs``:
not):

* **copy**: ``s5cmd cp`` of the shards into a fresh directory, then the loader on each;
* **pull**: ``modelfs pull`` (empty cache), then the loader on each (``--base TREE``: the
  same with another source tree too);
* **mount**: ``modelfs mount`` (empty cache, background start) and the loader on each
  shard through it; ``--base TREE`` adds the same with another source tree.

Loaders: ``load_file`` (``safetensors.numpy.load_file``: mmap, the file in offset order),
``keys`` (``safe_open`` + ``get_tensor`` in sorted-name order) or ``read`` (the file read
whole, in order, then parsed). Time to first tensor: the first
shard's first tensor, for copy measured as ``s5cmd cp`` of that one shard then that
tensor, for a mount as mount + that tensor. Prints, per regime, medians: total seconds and
ratio to copy, first-tensor ratio, CPU seconds of the command's processes, of the
forwarder (what shaping costs the two cores), of the store and of the loader (this
process), and the share of the cores all of them kept busy over the run ("cores busy":
near 100 %, the two cores, not the link or the pipeline, bound the run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (client, drop_caches, machine, new_bucket, proc_cpu_seconds, recache_programs,  # noqa: E402
                    write_shards)
from farlink import FarLink, far_store  # noqa: E402

from modelfs.mount.xattrs import PID  # noqa: E402

ROOT = str(HERE.parent)


def load(path: Path, loader: str, first_only: bool = False) -> None:
    """``load_file``: safetensors' own (mmap; it walks the file in offset order); ``keys``:
    ``safe_open`` + ``get_tensor`` of each name in ``keys()`` order (sorted names, as
    loaders that ask tensor by tensor do); ``read``: the whole file read sequentially,
    then parsed (``safetensors.numpy.load``), as loaders that read first do."""
    from safetensors import safe_open
    from safetensors.numpy import load as parse, load_file
    if first_only:
        with safe_open(str(path), "numpy") as f:
            f.get_tensor(next(iter(f.keys())))
    elif loader == "read":
        with open(path, "rb") as f:
            parse(f.read())
    elif loader == "keys":
        with safe_open(str(path), "numpy") as f:
            for k in f.keys():  # sorted names: layers 1, 10, 100, … far apart in the file
                f.get_tensor(k)
    else:
        load_file(str(path))


def busy(r: dict) -> float:
    """The share of the machine's cores that the command, forwarder, store and loader kept
    busy over the whole run: near 100 %, the run was bound by the CPU, not the link."""
    return (r["cpu"] + r["fwd_cpu"] + r["store_cpu"] + r["loader_cpu"]) / ((os.cpu_count() or 1) * r["total"])


def cpu_of(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return 0.0


class Run:
    def __init__(self, d: Path, env: dict, shards: list[str], loader: str, link: FarLink, store_pid: int):
        self.d, self.env, self.shards, self.loader, self.link = d, env, shards, loader, link
        self.store_pid = store_pid  # SeaweedFS: its CPU is part of what the two cores do
        self.trace_dir: Path | None = None  # --trace: each mount's timeline (benchmarks/timeline.py)
        self.traced = 0
        self.mount_args: list[str] = []  # --mount-args
        self.perf_dir: Path | None = None  # --perf: `perf record -a` of each mount's load
        self.cold_programs = False  # --cold-programs: the programs' own files dropped too

    def _drop(self, tree: str = ROOT) -> None:
        """Drop the page cache before a target; then, unless --cold-programs, read the
        programs' own files back (Python's and the tree's modules, s5cmd's binary), as on
        a host that runs them: every target starts with the model's bytes cold, the
        programs warm."""
        drop_caches()
        if not self.cold_programs:
            recache_programs(dict(self.env, PYTHONPATH=tree))

    def _fwd_cpu(self) -> float:
        return cpu_of(self.link.proc.pid)

    def _others(self) -> dict[str, float]:
        """The store's CPU-s and this process's own (the loader's), so far."""
        t = os.times()
        return {"store_cpu": cpu_of(self.store_pid), "loader_cpu": t.user + t.system}

    def _others_since(self, was: dict[str, float]) -> dict[str, float]:
        return {k: v - was[k] for k, v in self._others().items()}

    def _download_then_load(self, cmd: list[str], out: Path, env: dict) -> dict:
        """``cmd`` downloads the shards into ``out``; then the loader reads each there."""
        shutil.rmtree(out, ignore_errors=True)
        self._drop(env.get("PYTHONPATH", ROOT))
        f0, o0 = self._fwd_cpu(), self._others()
        r0 = os.times()
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd="/tmp")
        t_cmd = time.perf_counter() - t
        r1 = os.times()
        for s in self.shards:
            load(out / s, self.loader)
        total = time.perf_counter() - t
        fwd = self._fwd_cpu() - f0
        others = self._others_since(o0)
        shutil.rmtree(out)
        return {"total": total, "command": t_cmd, "fwd_cpu": fwd,
                "cpu": (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system), **others}

    def _s5cmd(self, src: str, out: Path) -> list[str]:
        return [str(Path(sys.executable).parent / "s5cmd"), "--endpoint-url", self.env["AWS_ENDPOINT_URL"],
                "cp", src, str(out) + "/"]

    def copy(self, bucket: str) -> dict:
        out = self.d / "copy"
        r = self._download_then_load(self._s5cmd(f"s3://{bucket}/plain/*", out), out, self.env)
        # the first tensor after a copy of its shard alone
        self._drop()
        t = time.perf_counter()
        subprocess.run(self._s5cmd(f"s3://{bucket}/plain/{self.shards[0]}", out), env=self.env, check=True,
                       capture_output=True)
        load(out / self.shards[0], self.loader, first_only=True)
        r["first"] = time.perf_counter() - t
        shutil.rmtree(out)
        return r

    def pull(self, tree: str, ref: str) -> dict:
        out = self.d / "pulled"
        return self._download_then_load([sys.executable, "-m", "modelfs", "pull", ref, str(out), "--no-cache", "-q"],
                                        out, dict(self.env, PYTHONPATH=tree))

    def mount(self, tree: str, ref: str) -> dict:
        mnt, cache = self.d / "mnt", self.d / "mount-cache"
        mnt.mkdir(exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(self.env, PYTHONPATH=tree)
        if self.trace_dir is not None:
            self.traced += 1
            env["MODELFS_TRACE"] = str(self.trace_dir / f"mount-{self.traced}.jsonl")
        self._drop(tree)
        perf = None
        if self.perf_dir is not None:  # the whole machine, while this mount loads
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "299", "-o",
                                     str(self.perf_dir / f"mount-{self.traced or 1}.data")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        f0, o0 = self._fwd_cpu(), self._others()
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modelfs", "mount", ref, str(mnt), "--cache-dir", str(cache),
                        *self.mount_args],
                       env=env, check=True, capture_output=True, cwd="/tmp")
        t_mount = time.perf_counter() - t
        pid = int(os.getxattr(mnt, PID))
        try:
            load(mnt / self.shards[0], self.loader, first_only=True)
            first = time.perf_counter() - t
            for s in self.shards:
                load(mnt / s, self.loader)
            total = time.perf_counter() - t
            cpu = cpu_of(pid)
            others = self._others_since(o0)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait()
        finally:
            subprocess.run([sys.executable, "-m", "modelfs", "unmount", str(mnt)], env=env, capture_output=True)
        fwd = self._fwd_cpu() - f0
        shutil.rmtree(cache, ignore_errors=True)
        return {"total": total, "command": t_mount, "first": first, "cpu": cpu, "fwd_cpu": fwd, **others}


def regime(args, rtt: float, mbit: float) -> dict[str, list[dict]]:
    with far_store(rtt, mbit, "farload", limit=args.queue,
                   store_sysctls=dict(x.split("=", 1) for x in args.store_sysctl)) as (d, link, srv, env):
        m = d / "model"
        shards = write_shards(m, args.shards, args.shard_mib)
        c = client(srv)
        bucket = new_bucket(c, "farload")
        for s in shards:
            c.upload_file(str(m / s), bucket, f"plain/{s}")
        subprocess.run([sys.executable, "-m", "modelfs", "publish", str(m), f"s3://{bucket}/reg", "--name", "m",
                        "--tag", "prod", "-q"], env=dict(env, PYTHONPATH=ROOT), check=True, capture_output=True)
        ref = f"s3://{bucket}/reg/m@prod"
        run = Run(d, env, shards, args.loader, link, srv.proc.pid)
        run.trace_dir, run.perf_dir, run.mount_args = args.trace, args.perf, shlex.split(args.mount_args)
        run.cold_programs = args.cold_programs
        trees = {"mount": ROOT} | ({"mount (base)": str(args.base)} if args.base else {})
        res: dict[str, list[dict]] = {}
        for i in range(args.runs):
            # the copy first; then each command's trees, their order alternating between runs, so
            # that each tree follows the same targets as often as the other (a target run right
            # after the copy pays for the memory the copy freed: benchmarks.md, fifth stop)
            order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
            jobs = []
            if "copy" in args.targets:
                jobs.append(("copy", lambda: run.copy(bucket)))
            if "pull" in args.targets:
                jobs += [(n.replace("mount", "pull"), (lambda tr=tr: run.pull(tr, ref))) for n, tr in order]
            if "mount" in args.targets:
                jobs += [(n, (lambda tr=tr: run.mount(tr, ref))) for n, tr in order]
            for name, job in jobs:
                r = job()
                res.setdefault(name, []).append(r)
                print(f"  {rtt:g} ms/{mbit:g} Mbit run {i + 1} {name:<13} " +
                      " ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default="0:0,20:1000,20:2500")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loader", choices=("load_file", "keys", "read"), default="load_file")
    ap.add_argument("--targets", default="copy,pull,mount")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--mount-args", default="", help="more options for `modelfs mount` (e.g. \"--concurrency 8\")")
    ap.add_argument("--queue", type=int, default=1000, help="the link's queue per direction, packets (netem's default)")
    ap.add_argument("--store-sysctl", action="append", default=[],
                    help="KEY=VALUE set in the store's namespace (e.g. net.ipv4.tcp_slow_start_after_idle=0)")
    ap.add_argument("--perf", type=Path, help="a directory: `perf record -a -g` of each mount's load")
    ap.add_argument("--trace", type=Path, help="a directory: each mount's trace (benchmarks/timeline.py)")
    ap.add_argument("--cold-programs", action="store_true",
                    help="leave the programs' own files (Python's modules, s5cmd) out of the page cache too")
    args = ap.parse_args()
    everything = {}
    for spec in args.regimes.split(","):
        rtt, mbit = (float(x) for x in spec.split(":"))
        everything[spec] = regime(args, rtt, mbit)
    med = statistics.median
    print(f"\n{args.shards} × {args.shard_mib} MiB F16 safetensors, loader {args.loader}, medians of {args.runs}; "
          f"{machine()}\n")
    print("| link (RTT ms / Mbit/s) | target | total s | ÷ copy | command s | first tensor ÷ copy | "
          "CPU-s (processes) | forwarder CPU-s | store CPU-s | loader CPU-s | cores busy |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, res in everything.items():
        rtt, mbit = spec.split(":")
        link = "unshaped (forwarding only)" if spec in ("0:0",) else f"{rtt} / {mbit}"
        copy_t = med(r["total"] for r in res["copy"]) if "copy" in res else float("nan")
        copy_f = med(r["first"] for r in res["copy"]) if "copy" in res else float("nan")
        for name, rs in res.items():
            tot = med(r["total"] for r in rs)
            first = f"{med(r['first'] for r in rs) / copy_f:.2f}" if "first" in rs[0] and name != "copy" else "–"
            print(f"| {link} | {name} | {tot:.2f} | **{tot / copy_t:.2f}** | {med(r['command'] for r in rs):.2f} | "
                  f"{first} | {med(r['cpu'] for r in rs):.1f} | {med(r['fwd_cpu'] for r in rs):.1f} | "
                  f"{med(r['store_cpu'] for r in rs):.1f} | {med(r['loader_cpu'] for r in rs):.1f} | "
                  f"{med(busy(r) for r in rs):.0%} |")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root: it makes network namespaces, drops the page cache and mounts")
    main()

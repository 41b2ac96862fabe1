"""Shared pieces of the benchmarks: a server, buckets, page-cache control, timed reads."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3

from modelfs.dev.devserver import SeaweedServer
from modelfs.dev.sample import layer_tensors, write_safetensors

RESULTS = Path(__file__).parent / "results"
MiB = 1 << 20


def client(srv: SeaweedServer):
    e = srv.env()
    return boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])


def new_bucket(c, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=name)
    return name


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"fresh pages written at {fresh_page_rate():.1f} GB/s")


def fresh_page_rate(mib: int = 256) -> float:
    """GB/s of copying 256 MiB into newly allocated memory. A VM whose balloon driver reports
    free pages to its host faults each new page in again, at a cost that varies over
    hours; a mount (its cache's pages besides the file's) pays more of it than a copy.
    Printed beside every table, so runs on differing machines are not compared blindly
    (docs/benchmarks.md, 2026-12-07)."""
    src = bytes(mib << 20)
    dst = bytearray(mib << 20)  # calloc'd: its pages are not there until written
    t = time.perf_counter()
    dst[:] = src
    return (mib << 20) / (time.perf_counter() - t) / 1e9


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=2))
    return p


def write_shards(d: Path, shards: int, shard_mib: int, hidden: int = 256) -> list[str]:
    """``shards`` F16 safetensors shards of about ``shard_mib`` MiB each in a new directory
    ``d`` (``model-0000N-of-0000M.safetensors``, as Hugging Face names them); their names."""
    from modelfs.dev.sample import layer_tensors, write_safetensors

    d.mkdir()
    layers = max(1, shard_mib * MiB // ((5 * hidden * hidden + hidden * hidden) * 2))
    names = []
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(d / name, layer_tensors(layers, hidden, dtype="F16", first=i * layers), seed=i)
        names.append(name)
    return names


def drop_caches() -> None:
    """Drop the kernel page cache (root only), so the next read is cold."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        print(f"warning: cannot drop the page cache ({e}); cold figures are warm", file=sys.stderr)


PROGRAMS = ("import modelfs.cli, boto3, pyfuse3, trio, lmdb, blake3, zstandard, xxhash, fastcdc, cachetools, "
            "cryptography, prometheus_client")


def recache_programs(env: dict) -> None:
    """Read the programs' own files back after ``drop_caches`` (the model's bytes stay
    dropped): Python's and modelfs's modules (``PYTHONPATH`` in ``env`` names the tree) and
    s5cmd's binary, as on a host that runs them."""
    subprocess.run([sys.executable, "-c", PROGRAMS], env=env, check=True, cwd="/tmp")
    s5cmd = Path(sys.executable).parent / "s5cmd"
    if s5cmd.exists():
        subprocess.run([str(s5cmd), "version"], env=env, check=True, capture_output=True)


def seq_read(path: Path, block: int = MiB) -> float:
    """Seconds to read the file sequentially in ``block`` reads (like dd bs=1M)."""
    buf = bytearray(block)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (a modelfs mount's fetch workers): live ones
    by their own counters, exited and reaped ones through the parent's cutime/cstime."""
    def own(p: int, reaped: bool) -> float:
        f = open(f"/proc/{p}/stat").read().split(")")[-1].split()
        ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped else 0)
        return ticks / os.sysconf("SC_CLK_TCK")
    total = own(pid, True)
    for c in _children(pid):
        try:
            total += own(c, False)
        except OSError:
            pass
    return total


def proc_peak_rss_mib(pid: int) -> float:
    """Peak RSS (VmHWM) of ``pid`` plus that of each live child, summed: an upper bound for
    the whole daemon (shared libraries and mapped cache pages count once per process)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024 if total else float("nan")


def private_mib(pids: list[int]) -> float:
    """Memory the processes own (anonymous and shared-memory pages, e.g. memfds), summed.
    Mapped file pages (a cache's LMDB map) are the kernel's page cache: not counted."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(("RssAnon:", "RssShmem:")))
        except OSError:
            pass
    return total / 1024


class PrivateMemory:
    """Samples ``private_mib`` of a process and its children every 20 ms while in use."""

    def __init__(self, pid: int | None):
        self.pid, self.peak_mib = pid, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak_mib = max(self.peak_mib, private_mib([self.pid, *_children(self.pid)]))

    def __enter__(self) -> "PrivateMemory":
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self.pid is not None:
            self._thread.join()


def load_safetensors_s(path: Path) -> float:
    """Seconds to read every tensor of a safetensors file the way loaders do (sorted names)."""
    from safetensors import safe_open
    t = time.perf_counter()
    with safe_open(str(path), "numpy") as f:
        for k in f.keys():
            f.get_tensor(k)
    return time.perf_counter() - t


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, CPU seconds of the command and its children) of one run."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    secs = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return secs, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def rate_table(first_column: str, size: int, res: dict[str, list[tuple[float, float]]]) -> None:
    """Print a markdown table of MB/s (median, then each run) and CPU-s/GB (median) for
    ``res``: name → [(seconds, CPU seconds)] of runs moving ``size`` bytes."""
    print(f"| {first_column} | MB/s (runs) | CPU-s/GB, with its workers |\n|---|---|---|")
    for name, rs in res.items():
        mbps = [size / s / 1e6 for s, _ in rs]
        print(f"| {name} | **{statistics.median(mbps):.0f}** ({' / '.join(f'{x:.0f}' for x in mbps)}) | "
              f"{statistics.median(cpu / (size / 1e9) for _, cpu in rs):.2f} |")


def ab_arguments(doc: str, verb: str) -> argparse.Namespace:
    """The options of an A/B benchmark of one command (``pull.py``, ``publish.py``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=Path, help=f"another modelfs source tree to {verb} with, beside this one")
    return ap.parse_args()


@contextlib.contextmanager
def ab_setup(name: str, size_mib: int) -> Iterator[tuple[Path, SeaweedServer, dict, Path]]:
    """A scratch directory under /var/tmp with its own SeaweedFS: (the directory, the server,
    the environment for modelfs commands, ``<dir>/m/model.safetensors`` of ~``size_mib`` MiB
    of F16 tensors)."""
    with tempfile.TemporaryDirectory(prefix=f"modelfs-{name}-", dir="/var/tmp") as d_s, \
            SeaweedServer(Path(d_s) / "s3") as srv:
        d = Path(d_s)
        (d / "m").mkdir()
        f = d / "m" / "model.safetensors"
        write_safetensors(f, layer_tensors(max(1, round(1365 * size_mib / 1024)), 256, dtype="F16"), seed=1)
        yield d, srv, dict(os.environ, **srv.env()), f

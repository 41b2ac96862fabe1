"""Where a sequential read's CPU goes, cold and warm: per process (daemon, fetch workers, store).

    .venv/bin/python benchmarks/profile_cold.py [LAYERS] [-- extra mount flags]     # as root
    PYSPY=1 .venv/bin/python benchmarks/profile_cold.py        # also py-spy the daemon and a worker
                                                              # (pip install py-spy; writes /tmp/spy-{cold,warm}-*.txt)

Publishes a ~1 GiB F16 safetensors file (LAYERS=1365) to its own SeaweedFS, mounts it,
drops the page cache, reads the file like ``dd bs=1M`` and prints user/sys CPU seconds
per GB for each process, from /proc. Then the same warm: a new mount on the now full
cache, page cache dropped, beside the same read of the source file on local disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import _children, client, drop_caches, new_bucket, seq_read  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

BIN = Path(sys.executable).parent


def cpu(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, or of one of its threads."""
    f = open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read().split(")")[-1].split()
    t = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / t, int(f[12]) / t


def threads(pid: int) -> dict[str, tuple[float, float]]:
    """CPU of each of a process's threads, by thread name (cache threads summed)."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            u, s = cpu(pid, int(tid))
        except OSError:
            continue
        name = "main (trio, FUSE)" if tid == str(pid) else name
        a, b = out.get(name, (0.0, 0.0))
        out[name] = (a + u, b + s)
    return out


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "--" else 1365
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with tempfile.TemporaryDirectory(prefix="modelfs-prof-") as d_s, SeaweedServer(Path(d_s) / "s3") as srv:
        d = Path(d_s)
        env = dict(os.environ, **srv.env())
        (d / "m").mkdir()
        write_safetensors(d / "m" / "model.safetensors", layer_tensors(layers, 256, dtype="F16"), seed=1)
        size = (d / "m" / "model.safetensors").stat().st_size
        b = new_bucket(client(srv), "p")
        subprocess.run([str(BIN / "modelfs"), "publish", str(d / "m"), f"s3://{b}/reg", "--name", "m", "-q"],
                       env=env, check=True, capture_output=True)
        mnt = d / "mnt"
        mnt.mkdir()
        rows = []
        for phase in ("cold", "warm"):
            rows.append((phase, *_read_through_mount(phase, env, b, d, mnt, srv, extra)))
        drop_caches()
        local = seq_read(d / "m" / "model.safetensors")
    gb = size / 1e9
    for phase, t, c0, c1, th in rows:
        print(f"{phase}: {size / 2**20:.0f} MiB in {t:.2f} s = {size / t / 1e6:.0f} MB/s")
        total = 0.0
        for k in c0:
            u, s = c1[k][0] - c0[k][0], c1[k][1] - c0[k][1]
            total += (u + s) if k != "store" else 0
            print(f"  {k:8s} user {u / gb:5.2f}  sys {s / gb:5.2f}  CPU-s/GB")
        print(f"  modelfs, all processes: {total / gb:.2f} CPU-s/GB")
        for name, (u, s) in sorted(th.items(), key=lambda kv: -sum(kv[1])):
            if u + s >= 0.01:
                print(f"    daemon thread {name:20s} user {u / gb:5.2f}  sys {s / gb:5.2f}  CPU-s/GB")
    print(f"local disk, page cache dropped: {size / local / 1e6:.0f} MB/s; "
          f"warm / local = {local / rows[1][1]:.2f}")


def _read_through_mount(phase: str, env: dict, bucket: str, d: Path, mnt: Path, srv: SeaweedServer, extra: list[str]):
    proc = subprocess.Popen([str(BIN / "modelfs"), "mount", f"s3://{bucket}/reg/m", str(mnt), "--foreground",
                             "--cache-dir", str(d / "cache"), *extra], env=env, stdin=subprocess.DEVNULL)
    try:
        while not (mnt / "model.safetensors").exists():
            if proc.poll() is not None:
                raise SystemExit(f"the mount exited ({proc.returncode}) before serving: see its output above")
            time.sleep(0.1)
        drop_caches()
        pids = {"daemon": proc.pid, **{f"worker{i}": c for i, c in enumerate(_children(proc.pid))},
                "store": srv.proc.pid}
        c0 = {k: cpu(p) for k, p in pids.items()}
        t0 = threads(proc.pid)
        spies = []
        if os.environ.get("PYSPY"):
            for k in ("daemon", "worker0"):
                spies.append(subprocess.Popen(
                    [str(BIN / "py-spy"), "record", "-r", "200", "-d", "4", "-f", "raw", "-n",
                     "-o", f"/tmp/spy-{phase}-{k}.txt", "--pid", str(pids[k])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        t = seq_read(mnt / "model.safetensors")
        for sp in spies:
            sp.wait()
        c1 = {k: cpu(p) for k, p in pids.items()}
        t1 = threads(proc.pid)
        th = {k: (t1[k][0] - t0.get(k, (0, 0))[0], t1[k][1] - t0.get(k, (0, 0))[1]) for k in t1}
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        proc.wait(60)
    return t, c0, c1, th


if __name__ == "__main__":
    main()

"""Adoption against the same bytes published natively (issue 29, docs/adopt.md).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/adopt.py [--shards 4] [--shard-mib 256] [--runs 3] \
        [--rtt 20 --mbit 1000]   # as root

One SeaweedFS (loopback; with ``--rtt``/``--mbit`` behind :class:`farlink.FarLink`, a store
across a network); a DVC checkout (real ``dvc`` from ``.venv-dvc``) of a model of
``--shards`` safetensors shards, pushed to a DVC remote bucket; the same directory published
natively. Per run, interleaved: ``modelfs adopt`` into an empty registry (every object read)
against ``modelfs pull --no-cache`` of the native version (the same bytes from the store,
verified, onto disk); then a cold mount of each version read whole (empty cache, page cache
dropped), then the same mounts read again (warm: from the cache). Recorded: medians, the
ratios, and the bytes adopt uploaded ÷ the model's bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import client, drop_caches, machine, median, new_bucket, seq_read, timed, write_shards  # noqa: E402

import tempfile  # noqa: E402

from farlink import far_store  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402

ROOT = HERE.parent
DVC = ROOT / ".venv-dvc" / "bin" / "dvc"
MODELFS = [sys.executable, "-m", "modelfs"]


def run(cmd: list, env: dict, cwd: Path | str = "/tmp") -> str:
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{cmd} failed: {r.stdout[-1000:]}{r.stderr[-2000:]}")
    return r.stdout


def read_mount(env: dict, ref: str, mnt: Path, cache: Path, files: list[str], cold: bool) -> float:
    """Seconds to read every file of ``ref`` through a mount with cache ``cache``."""
    mnt.mkdir(exist_ok=True)
    run([*MODELFS, "mount", ref, mnt, "--cache-dir", cache], env)
    try:
        if cold:
            drop_caches()
        t0 = time.perf_counter()
        for f in files:
            seq_read(mnt / f)
        return time.perf_counter() - t0
    finally:
        run([*MODELFS, "unmount", mnt], env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rtt", type=float, help="the store behind a link of this round trip (ms) ...")
    ap.add_argument("--mbit", type=float, default=1000.0, help="... and this rate")
    args = ap.parse_args()
    if not DVC.exists():
        raise SystemExit(f"{DVC} is missing: bash scripts/setup.sh installs it")
    res: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        if args.rtt is not None:
            d, _, srv, _ = stack.enter_context(far_store(args.rtt, args.mbit, "adopt"))
        else:
            d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modelfs-adopt-", dir="/var/tmp")))
            srv = stack.enter_context(SeaweedServer(d / "s3"))
        env = dict(os.environ, **srv.env(), PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
        c = client(srv)
        repo = d / "repo"
        repo.mkdir()
        shards = write_shards(repo / "model", args.shards, args.shard_mib)
        files = [f"model/{s}" for s in shards]
        model_bytes = sum((repo / f).stat().st_size for f in files)
        dvc_bucket = new_bucket(c, "dvc")
        run(["git", "init", "-q"], env, repo)
        for cmd in (["init", "-q"], ["remote", "add", "-d", "s", f"s3://{dvc_bucket}/store"],
                    ["remote", "modify", "s", "endpointurl", srv.endpoint], ["add", "-q", "model"], ["push", "-q"]):
            run([DVC, *cmd], env, repo)
        native_bucket = new_bucket(c, "native")
        run([*MODELFS, "publish", repo / "model", f"s3://{native_bucket}/reg", "--name", "m", "-q"], env)
        native = f"s3://{native_bucket}/reg/m@latest"
        uploaded = []
        for i in range(args.runs):
            reg_bucket = new_bucket(c, "adopted")
            drop_caches()
            s, cpu = timed([*MODELFS, "adopt", repo, f"s3://{reg_bucket}/reg", "--name", "m", "-q"], env)
            res.setdefault("adopt, s", []).append(s)
            res.setdefault("adopt, CPU-s", []).append(cpu)
            uploaded.append(sum(o["Size"] for o in c.list_objects_v2(Bucket=reg_bucket).get("Contents", [])))
            out = d / f"pulled{i}"
            drop_caches()
            s, cpu = timed([*MODELFS, "pull", native, out, "--no-cache", "-q"], env)
            res.setdefault("pull (native), s", []).append(s)
            res.setdefault("pull (native), CPU-s", []).append(cpu)
            shutil.rmtree(out)
            adopted = f"s3://{reg_bucket}/reg/m@latest"
            for name, ref in (("adopted", adopted), ("native", native)):
                cache = d / f"cache-{name}-{i}"
                files_in = [f.removeprefix("model/") for f in files] if name == "native" else files
                res.setdefault(f"cold mount read, {name}, s", []).append(
                    read_mount(env, ref, d / f"mnt-{name}", cache, files_in, cold=True))
                res.setdefault(f"warm mount read, {name}, s", []).append(
                    read_mount(env, ref, d / f"mnt-{name}", cache, files_in, cold=True))
                shutil.rmtree(cache)
            print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items()), flush=True)
    m = {k: median(v) for k, v in res.items()}
    gb = model_bytes / 1e9
    link = f"{args.rtt:g} ms / {args.mbit:g} Mbit/s" if args.rtt is not None else "loopback"
    print(f"\n{args.shards} × {args.shard_mib} MiB ({model_bytes / 2**20:.0f} MiB), {link} SeaweedFS, "
          f"medians of {args.runs}; {machine()}\n")
    print("| figure | adopted | native | adopted rate ÷ native | target |\n|---|---|---|---|---|")
    print(f"| adopt vs `pull --no-cache`, MB/s | {model_bytes / m['adopt, s'] / 1e6:.0f} | "
          f"{model_bytes / m['pull (native), s'] / 1e6:.0f} | **{m['pull (native), s'] / m['adopt, s']:.2f}** | ≥ 0.9 |")
    print(f"| … CPU-s/GB | {m['adopt, CPU-s'] / gb:.2f} | {m['pull (native), CPU-s'] / gb:.2f} | | |")
    for kind in ("cold", "warm"):
        a, n = m[f"{kind} mount read, adopted, s"], m[f"{kind} mount read, native, s"]
        print(f"| {kind} mount, read every shard, MB/s | {model_bytes / a / 1e6:.0f} | {model_bytes / n / 1e6:.0f} | "
              f"**{n / a:.2f}** | ≥ 0.9 |")
    print(f"| bytes adopt uploaded ÷ model | {median(uploaded) / model_bytes * 100:.3f} % | | | < 0.5 % |")


if __name__ == "__main__":
    main()

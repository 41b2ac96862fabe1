"""modelfs publish beside raw parallel uploads of the same bytes, in one run (and another
tree, for an A/B).

    .venv/bin/python benchmarks/publish.py [--size-mib 1024] [--runs 3] [--base TREE]   # from /tmp

Writes a F16 safetensors file, then, interleaved, each into a fresh bucket of its own
SeaweedFS: ``modelfs publish`` (a subprocess, as users run it: start-up, cutting,
hashing, HEADs, uploads, manifest; this tree, and with ``--base`` another source tree
of modelfs, e.g. an earlier commit's ``git archive``), ``s5cmd cp`` of the file as one
object (multipart), and raw boto3 ``put_object`` of 4 MiB pieces from 16 threads of
this process. Prints MB/s and the CPU seconds per GB of each (publish: with its worker
processes), medians. Then a copy with 1% of its bytes changed is re-published and
the bytes the server received are reported.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ab_arguments, ab_setup, client, machine, new_bucket, rate_table, timed  # noqa: E402


BIN = Path(sys.executable).parent
PIECE = 4 << 20


def raw_upload(c, path: Path, jobs: int = 16) -> tuple[float, float]:
    data = path.read_bytes()
    b = new_bucket(c, "raw")
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(lambda o: c.put_object(Bucket=b, Key=f"p{o}", Body=data[o:o + PIECE]),
                    range(0, len(data), PIECE)))
    secs, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return secs, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def stored_bytes(c, bucket: str) -> int:
    return sum(o["Size"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="r/chunks/")
               for o in page.get("Contents", []))


def main() -> None:
    args = ab_arguments(__doc__, "publish")
    res: dict[str, list[tuple[float, float]]] = {}
    with ab_setup("publish", args.size_mib) as (d, srv, env, f):
        model, size = f.parent, f.stat().st_size
        c = client(srv)
        publishers = {"modelfs publish": ([str(BIN / "modelfs")], env)}
        if args.base:
            publishers[f"modelfs publish @ {args.base}"] = ([sys.executable, "-m", "modelfs"],
                                                            dict(env, PYTHONPATH=str(args.base.resolve())))
        s5 = BIN / "s5cmd" if (BIN / "s5cmd").exists() else shutil.which("s5cmd")
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            for name, (cmd, e) in publishers.items():
                b = new_bucket(c, "pub")
                res.setdefault(name, []).append(timed([*cmd, "publish", str(model), f"s3://{b}/r", "--name", "m",
                                                       "-q"], e))
            if s5:
                b = new_bucket(c, "s5")
                res.setdefault("s5cmd cp (one object, multipart)", []).append(
                    timed([str(s5), "--endpoint-url", srv.endpoint, "cp", str(f), f"s3://{b}/model.safetensors"],
                          env))
            res.setdefault("boto3 put_object, 16 threads × 4 MiB", []).append(raw_upload(c, f))
            for name, rs in res.items():
                print(f"  {name:45s} {size / rs[-1][0] / 1e6:6.0f} MB/s", flush=True)
        # re-publish after changing 1% of the bytes (one contiguous region, like a retrained layer)
        b = new_bucket(c, "re")
        timed([str(BIN / "modelfs"), "publish", str(model), f"s3://{b}/r", "--name", "m", "-q"], env)
        before = stored_bytes(c, b)
        with open(f, "r+b") as fh:
            fh.seek(size // 3)
            fh.write(os.urandom(size // 100))
        timed([str(BIN / "modelfs"), "publish", str(model), f"s3://{b}/r", "--name", "m", "-q"], env)
        changed = stored_bytes(c, b) - before
    print(f"\n{size >> 20} MiB F16 safetensors, medians of {args.runs}; {machine()}\n")
    rate_table("upload", size, res)
    print(f"\nre-publish after changing 1% of the bytes: the server received {changed / 2**20:.1f} MiB "
          f"({changed / size:.1%} of the file)")


if __name__ == "__main__":
    main()

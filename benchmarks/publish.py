"""Publish throughput against raw boto3 parallel uploads of the same bytes, as ratios.

    .venv/bin/python benchmarks/publish.py [--size-mib 512] [--runs 3]

Each run uploads the same safetensors file twice, interleaved: once as raw
4 MiB objects with 16 boto3 threads (the limit for this server and machine),
once with ``modelfs publish`` (a subprocess, as users run it), each into a
fresh bucket. Then a 1%-changed copy is re-published and the bytes the server
received are reported. Medians of the runs.
"""

from __future__ import annotations

import argparse
import os
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

PIECE = 4 << 20


def raw_upload(c, data: bytes, jobs: int) -> float:
    b = new_bucket(c, "raw")
    t = time.perf_counter()
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(lambda o: c.put_object(Bucket=b, Key=f"p{o}", Body=data[o:o + PIECE]),
                    range(0, len(data), PIECE)))
    return time.perf_counter() - t


def publish(env, c, model: Path, bucket: str | None = None) -> tuple[float, str]:
    b = bucket or new_bucket(c, "pub")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "modelfs", "publish", str(model), f"s3://{b}/r",
                        "--name", "m", "-q"], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-bench-") as tmp, \
            SeaweedServer(Path(tmp) / "s3") as srv:
        env = dict(os.environ, **srv.env())
        c = client(srv)
        model = Path(tmp) / "model"
        model.mkdir()
        layers = args.size_mib * (1 << 20) // (6 * 256 * 256 * 2 + 1024)
        write_safetensors(model / "model.safetensors", layer_tensors(layers, 256), seed=1)
        data = (model / "model.safetensors").read_bytes()
        n = len(data)
        raw_s, pub_s = [], []
        for _ in range(args.runs):
            raw_s.append(raw_upload(c, data, 16))
            pub_s.append(publish(env, c, model)[0])
        # re-publish after changing 1% of the bytes (one contiguous region, like a retrained layer)
        b = new_bucket(c, "re")
        publish(env, c, model, b)
        with open(model / "model.safetensors", "r+b") as f:
            f.seek(n // 3)
            f.write(os.urandom(n // 100))
        before = sum(o["Size"] for o in c.list_objects_v2(Bucket=b, Prefix="r/chunks/").get("Contents", []))
        pub_stdout = publish(env, c, model, b)[1]
        after = sum(o["Size"] for o in c.list_objects_v2(Bucket=b, Prefix="r/chunks/").get("Contents", []))
    raw_mb, pub_mb = n / median(raw_s) / 1e6, n / median(pub_s) / 1e6
    res = {"machine": machine(), "bytes": n, "runs": args.runs,
           "raw_boto3_MBps_median": round(raw_mb, 1), "publish_MBps_median": round(pub_mb, 1),
           "ratio_publish_over_raw": round(pub_mb / raw_mb, 3),
           "raw_seconds": [round(x, 2) for x in raw_s], "publish_seconds": [round(x, 2) for x in pub_s],
           "republish_1pct_changed_bytes_uploaded": after - before,
           "republish_1pct_changed_fraction": round((after - before) / n, 4),
           "republish_report": pub_stdout.strip().splitlines()[2].strip()}
    print(save("publish", res))
    for k, v in res.items():
        print(f"{k:40} {v}")


if __name__ == "__main__":
    main()

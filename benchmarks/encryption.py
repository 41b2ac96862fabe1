"""What encrypting a registry costs: publish, cold and warm sequential read, encrypted ÷ plain.

    .venv/bin/python benchmarks/encryption.py [--size-mib 1024] [--runs 3] [--out DIR]   # as root (drops caches)

One SeaweedFS, one F16 safetensors file (weights: stored raw, as most are). Each run
publishes it to a fresh plain registry and a fresh encrypted one (order alternating),
then reads each through a cold mount (new cache directory, page cache dropped) like
``dd bs=1M``, and again through a warm one (a remount on that cache, page cache
dropped). The encrypted registry is read a second way too, with ``--encrypt-cache``
(the cache keeps chunks encrypted, so a warm read decrypts). Prints medians and the
ratios, and writes results/encryption.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import client, drop_caches, machine, median, new_bucket, save, seq_read  # noqa: E402

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.dev.sample import layer_tensors, write_safetensors  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write encryption.json here (default: benchmarks/results)")
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in (
        "publish plain", "publish encrypted", "cold plain", "cold encrypted", "cold encrypt-cache",
        "warm plain", "warm encrypted", "warm encrypt-cache")}
    with tempfile.TemporaryDirectory(prefix="modelfs-enc-") as d_s, SeaweedServer(Path(d_s) / "s3") as srv:
        d = Path(d_s)
        env = dict(os.environ, **srv.env())
        (d / "m").mkdir()
        layers = max(1, args.size_mib * 1365 // 1024)
        write_safetensors(d / "m" / "model.safetensors", layer_tensors(layers, 256, dtype="F16"), seed=1)
        size = (d / "m" / "model.safetensors").stat().st_size
        subprocess.run([str(BIN / "modelfs"), "keygen", str(d / "k")], check=True, capture_output=True)
        c = client(srv)
        for run in range(args.runs):
            modes = ["plain", "encrypted"] if run % 2 == 0 else ["encrypted", "plain"]
            for mode in modes:
                key = ["--encryption-key", str(d / "k")] if mode == "encrypted" else []
                b = new_bucket(c, "e")
                drop_caches()
                t0 = time.perf_counter()
                subprocess.run([str(BIN / "modelfs"), "publish", str(d / "m"), f"s3://{b}/reg", "--name", "m",
                                "-q", *key], env=env, check=True, capture_output=True)
                times[f"publish {mode}"].append(time.perf_counter() - t0)
                cache = d / f"cache-{run}-{mode}"
                times[f"cold {mode}"].append(_read(env, b, cache, d / "mnt", key))
                times[f"warm {mode}"].append(_read(env, b, cache, d / "mnt", key))
                if mode == "encrypted":
                    key += ["--encrypt-cache"]
                    cache = d / f"cache-{run}-sealed"
                    times["cold encrypt-cache"].append(_read(env, b, cache, d / "mnt", key))
                    times["warm encrypt-cache"].append(_read(env, b, cache, d / "mnt", key))
    med = {k: median(v) for k, v in times.items()}
    result = {"machine": machine(), "size_bytes": size, "runs": args.runs, "seconds": times,
              "median_seconds": med,
              "publish_ratio": med["publish encrypted"] / med["publish plain"],
              "cold_read_ratio": med["cold encrypted"] / med["cold plain"],
              "warm_read_ratio": med["warm encrypted"] / med["warm plain"],
              "encrypt_cache_warm_ratio": med["warm encrypt-cache"] / med["warm encrypted"],
              "encrypt_cache_cold_ratio": med["cold encrypt-cache"] / med["cold encrypted"]}
    for k, v in med.items():
        print(f"{k:20s} {v:6.2f} s  {size / v / 1e6:6.0f} MB/s")
    print(f"encrypted ÷ plain (time): publish {result['publish_ratio']:.2f}, cold read "
          f"{result['cold_read_ratio']:.2f}, warm read {result['warm_read_ratio']:.2f}")
    print(f"--encrypt-cache ÷ plaintext cache, encrypted registry (time): warm read "
          f"{result['encrypt_cache_warm_ratio']:.2f}, cold read {result['encrypt_cache_cold_ratio']:.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encryption.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out / 'encryption.json'}")
    else:
        print(f"wrote {save('encryption', result)}")


def _read(env: dict, bucket: str, cache: Path, mnt: Path, key: list[str]) -> float:
    """Seconds to read the model through a fresh mount on ``cache``, page cache dropped."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(BIN / "modelfs"), "mount", f"s3://{bucket}/reg/m", str(mnt), "--foreground",
                             "--cache-dir", str(cache), *key], env=env, stdin=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (mnt / "model.safetensors").exists():
                break
            if proc.poll() is not None:
                raise SystemExit(f"the mount exited with {proc.returncode}")
            time.sleep(0.1)
        drop_caches()
        return seq_read(mnt / "model.safetensors")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        proc.wait(60)


if __name__ == "__main__":
    main()

"""Model-aware readahead: a cold safetensors load through a mount, readahead in the loader's
order (tensor names sorted) against plain sequential readahead (file order).

    .venv/bin/python benchmarks/tensor_order.py [--layers 40] [--hidden 1024] [--runs 3]

Run as root (drops the page cache). Loaders (``safetensors.safe_open``/``load_file``,
vLLM, transformers) read tensors in sorted-name order; files lay them out in write
order, so ``layers.1`` is followed by ``layers.10`` and a file-order readahead
keeps resetting. The model here is written in layer order with F32 norms between
the F16 matrices, like a real checkpoint. Each run: fresh cache, page cache dropped,
a fresh mount, then every tensor read with ``safe_open(..., "numpy")``.
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
from common import (MiB, client, drop_caches, load_safetensors_s, machine, median, new_bucket,  # noqa: E402
                    proc_cpu_seconds)

from modelfs.dev.devserver import SeaweedServer  # noqa: E402
from modelfs.dev.sample import write_safetensors  # noqa: E402

BIN = Path(sys.executable).parent


def tensors(layers: int, hidden: int) -> dict[str, tuple[str, list[int]]]:
    out: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": ("F16", [4 * hidden, hidden])}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ("F32", [hidden])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = ("F16", [hidden, hidden])
        out[f"{p}.post_attention_layernorm.weight"] = ("F32", [hidden])
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}.mlp.{name}.weight"] = ("F16", [hidden, hidden])
    out["model.norm.weight"] = ("F32", [hidden])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-order-") as tmp_s, \
            SeaweedServer(Path(tmp_s) / "s3") as srv:
        tmp = Path(tmp_s)
        env = dict(os.environ, **srv.env())
        src = tmp / "model"
        src.mkdir()
        write_safetensors(src / "model.safetensors", tensors(args.layers, args.hidden), seed=3)
        size = (src / "model.safetensors").stat().st_size
        bucket = new_bucket(client(srv), "order")
        subprocess.run([str(BIN / "modelfs"), "publish", str(src), f"s3://{bucket}/reg", "--name", "m", "-q"],
                       env=env, check=True, capture_output=True)
        results: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for run in range(args.runs):
            for mode in ("file", "tensors"):
                mnt, cache = tmp / "mnt", tmp / f"cache-{mode}-{run}"
                mnt.mkdir(exist_ok=True)
                proc = subprocess.Popen(
                    [str(BIN / "modelfs"), "mount", f"s3://{bucket}/reg/m", str(mnt), "--foreground",
                     "--cache-dir", str(cache), "--readahead-order", mode],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    deadline = time.monotonic() + 60
                    while not (mnt / "model.safetensors").exists():
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError("mount failed")
                        time.sleep(0.1)
                    drop_caches()
                    c0 = proc_cpu_seconds(proc.pid)
                    results.setdefault(mode, []).append(load_safetensors_s(mnt / "model.safetensors"))
                    cpu.setdefault(mode, []).append(proc_cpu_seconds(proc.pid) - c0)
                finally:
                    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                    proc.wait(60)
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in results.items()),
                  flush=True)
    med = {m: median(v) for m, v in results.items()}
    out = {"machine": machine(), "command": " ".join(sys.argv), "bytes": size, "runs": args.runs,
           "load_cold_s": results, "daemon_cpu_s": cpu, "median_s": med,
           "tensors_over_file": med["tensors"] / med["file"]}
    print(json.dumps(out, indent=2))
    print(f"\n{size / MiB:.0f} MiB, {args.layers} layers: cold safe_open load, median of {args.runs}: "
          f"file-order readahead {med['file']:.2f} s, tensor-order {med['tensors']:.2f} s "
          f"= {med['tensors'] / med['file']:.2f}x")


if __name__ == "__main__":
    main()

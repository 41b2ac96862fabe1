"""modelfs pull beside s5cmd cp from the same store, in one run (and another tree, for an A/B).

    .venv/bin/python benchmarks/pull.py [--size-mib 1024] [--runs 3] [--base TREE]   # as root, from /tmp

Publishes a 1 GiB F16 safetensors file to its own SeaweedFS (and the same file as one
plain object for s5cmd), warms a block cache with it (``prefetch``), then, interleaved,
page cache dropped before each: ``modelfs pull`` into an empty directory (this tree,
fetching everything, the same with ``--verify``, and copying from that cache; with ``--base``, also another source
tree of modelfs, e.g. an earlier commit's ``git archive``, as it pulls by default) and
``s5cmd cp`` of the plain object.
Prints MB/s (the whole command: start-up, manifest, fetch, verify, SHA-256, fsync) and
the CPU seconds of the pull and its worker processes, medians.

``pull`` fsyncs each file before renaming it into place; ``s5cmd cp`` does not, so part
of the gap is durability, not speed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ab_arguments, ab_setup, client, drop_caches, machine, new_bucket, rate_table, timed  # noqa: E402


BIN = Path(sys.executable).parent


def main() -> None:
    args = ab_arguments(__doc__, "pull")
    res: dict[str, list[tuple[float, float]]] = {}
    with ab_setup("pull", args.size_mib) as (d, srv, env, f):
        size = f.stat().st_size
        c = client(srv)
        b = new_bucket(c, "pull")
        c.upload_file(str(d / "m" / "model.safetensors"), b, "plain/model.safetensors")
        subprocess.run([str(BIN / "modelfs"), "publish", str(d / "m"), f"s3://{b}/reg", "--name", "m", "-q"],
                       env=env, check=True, capture_output=True)
        cache = d / "cache"  # the host's cache, warmed once: what a pull after a mount or prefetch finds
        subprocess.run([str(BIN / "modelfs"), "prefetch", f"s3://{b}/reg/m", "--cache-dir", str(cache), "-q"],
                       env=env, check=True, capture_output=True)
        pulls = {"modelfs pull": ([str(BIN / "modelfs")], env, ["--no-cache"]),
                 "modelfs pull --verify": ([str(BIN / "modelfs")], env, ["--no-cache", "--verify"]),
                 "modelfs pull, chunks in the host's cache": ([str(BIN / "modelfs")], env,
                                                               ["--cache-dir", str(cache)])}
        if args.base:
            pulls[f"modelfs pull @ {args.base}"] = ([sys.executable, "-m", "modelfs"],
                                                    dict(env, PYTHONPATH=str(args.base.resolve())), [])
        s5 = BIN / "s5cmd" if (BIN / "s5cmd").exists() else shutil.which("s5cmd")
        out = d / "out"
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            for name, (cmd, e, opts) in pulls.items():
                shutil.rmtree(out, ignore_errors=True)
                drop_caches()
                res.setdefault(name, []).append(timed([*cmd, "pull", f"s3://{b}/reg/m", str(out), "-q", *opts], e))
                print(f"  {name:40s} {size / res[name][-1][0] / 1e6:6.0f} MB/s", flush=True)
            if s5:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                drop_caches()
                res.setdefault("s5cmd cp", []).append(
                    timed([str(s5), "--endpoint-url", srv.endpoint, "cp", f"s3://{b}/plain/model.safetensors",
                           f"{out}/"], env))
                print(f"  {'s5cmd cp':40s} {size / res['s5cmd cp'][-1][0] / 1e6:6.0f} MB/s", flush=True)
    print(f"\n{size >> 20} MiB safetensors, medians of {args.runs}; {machine()}\n")
    rate_table("command", size, res)


if __name__ == "__main__":
    main()

"""The README's end-to-end demo: a local S3 server, a generated model, the real CLI:
publish, re-publish a change, ls, inspect, pull, mount, read, unmount.

``python -m modelfs.dev.demo [--size-mib N]`` runs every step with the ``modelfs``
command as a user would, prints each command and its output, checks the
bytes that come back, and stops the server it started.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3

from .devserver import SeaweedServer
from .sample import make_model


def _sha(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64, help="weights size of the sample model")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelfs-demo-") as tmp:
        work = Path(tmp)
        print(f"# starting a local S3 server (SeaweedFS) in {work}/s3", flush=True)
        with SeaweedServer(work / "s3") as srv:
            env = dict(os.environ, **srv.env())
            boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                         aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="models")
            model = make_model(work / "llama-demo", size_mib=args.size_mib)
            print(f"# generated a sample model in {model}\n", flush=True)

            def run(*cmd: str) -> None:
                print("$ modelfs " + " ".join(shlex.quote(c) for c in cmd), flush=True)
                subprocess.run([sys.executable, "-m", "modelfs", *cmd], env=env, check=True)
                print(flush=True)

            reg = "s3://models/registry"
            run("publish", str(model), reg, "--name", "llama-demo", "--tag", "prod")
            (model / "config.json").write_text('{"model_type": "llama", "fine_tuned": true}')
            run("publish", str(model), reg, "--name", "llama-demo", "--tag", "staging")
            run("ls", reg)
            run("inspect", f"{reg}/llama-demo@staging")
            run("pull", f"{reg}/llama-demo@staging", str(work / "pulled"))
            same = _sha(model) == _sha(work / "pulled")
            print(f"# pulled files are byte-identical to the source: {same}\n")
            if not same:
                return 1
            if not os.path.exists("/dev/fuse"):
                print("# skipping the mount: /dev/fuse is not available on this machine")
                return 0
            mnt = work / "mnt"
            mnt.mkdir()
            run("mount", reg, str(mnt), "--cache-dir", str(work / "cache"))
            try:
                print(f"$ ls {mnt} {mnt}/llama-demo")
                print(" ".join(sorted(os.listdir(mnt))), "|", " ".join(sorted(os.listdir(mnt / "llama-demo"))))
                served = _sha(mnt / "llama-demo" / "staging")
                print(f"# files read through the mount are byte-identical: {served == _sha(model)}\n")
                run("stats", str(mnt))
            finally:
                run("unmount", str(mnt))
            return 0 if served == _sha(model) else 1


if __name__ == "__main__":
    sys.exit(main())

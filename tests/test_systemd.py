"""The daemon driven exactly as systemd's unit drives it: --foreground, NOTIFY_SOCKET, SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time

from conftest import cli


def test_ready_only_when_files_are_readable_and_stopping_on_sigterm(env, bucket, sample_model, tmp_path):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "-q")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "modelfs", "mount", "--foreground", f"s3://{bucket}/reg/m@latest",
                             str(mnt), "--cache-dir", str(tmp_path / "cache")],
                            env=dict(env, NOTIFY_SOCKET=str(sock_path)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = sock.recv(4096).decode()
        # at the very moment READY=1 arrives, files must already be readable
        assert (mnt / "config.json").read_bytes() == (sample_model / "config.json").read_bytes()
        assert first.startswith("READY=1") and f"STATUS=serving s3://{bucket}/reg/m@latest" in first
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0 and time.monotonic() - t < 30
        assert not os.path.ismount(mnt)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])

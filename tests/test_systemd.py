"""The daemon driven exactly as systemd drives it, and the unit files checked by systemd itself.

``run_unit`` takes ``ExecStart=`` from ``systemd/modelfs@.service`` and runs it as the
service manager would: ``%i`` and ``${VAR}`` expanded, ``$CONFIGURATION_DIRECTORY`` and
``$CACHE_DIRECTORY`` set (pointing into the test's directory), ``$NOTIFY_SOCKET`` on a
socket the test reads, stderr a file named by ``$JOURNAL_STREAM``, and the unit's
capability bounding set and no-new-privileges applied with ``setpriv``.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def unit_settings(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def unit_command(instance: str, env: dict) -> list[str]:
    """``ExecStart=`` of the template, expanded as systemd would, under its restrictions."""
    unit = unit_settings(UNITS / "modelfs@.service")
    line = unit["ExecStart"].replace("%i", instance)
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
    argv = shlex.split(line)
    assert argv[0] == "/usr/local/bin/modelfs"
    argv = [sys.executable, "-m", "modelfs", *argv[1:]]
    caps = [c.removeprefix("CAP_").lower() for c in unit["CapabilityBoundingSet"].split()]
    prefix = ["setpriv", "--bounding-set", "-all," + ",".join("+" + c for c in caps),
              "--inh-caps", "-all"]
    if unit.get("NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    return prefix + argv


class Notifications:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(90)

    def next(self, prefix: str) -> str:
        """The next message starting with ``prefix`` (others, e.g. STATUS=, are passed over)."""
        while True:
            msg = self.sock.recv(4096).decode()
            if msg.startswith(prefix):
                return msg


def start(cmd, env, stderr_file):
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file)


@pytest.mark.fuse  # the unit mounts
def test_unit_lifecycle_ready_status_crash_restart_stop(env, bucket, sample_model, tmp_path):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "-q")
    etc, cache, mnt = tmp_path / "etc", tmp_path / "cache", tmp_path / "mnt"
    for d in (etc, cache, mnt):
        d.mkdir()
    (etc / "test.toml").write_text(f'source = "s3://{bucket}/reg/m@latest"\nmountpoint = "{mnt}"\n'
                                   'log_level = "info"\n')
    notes = Notifications(tmp_path / "notify.sock")
    log_path = tmp_path / "stderr.log"
    stderr_file = open(log_path, "wb")
    st = os.fstat(stderr_file.fileno())
    uenv = dict(env, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), CONFIGURATION_DIRECTORY=str(etc),
                CACHE_DIRECTORY=str(cache), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    cmd = unit_command("test", uenv)
    want = (sample_model / "config.json").read_bytes()
    procs = [start(cmd, uenv, stderr_file)]
    try:
        ready = notes.next("READY=1")
        # at the very moment READY=1 arrives, files must already be readable
        assert (mnt / "config.json").read_bytes() == want
        assert f"STATUS=serving s3://{bucket}/reg/m@latest" in ready
        with open(f"/proc/{procs[0].pid}/status") as f:  # it serves with CAP_SYS_ADMIN alone
            caps = dict(line.split(":\t") for line in f if line.startswith("Cap"))
        assert int(caps["CapBnd"], 16) == int(caps["CapEff"], 16) == 1 << 21
        # STATUS= lines with live figures follow (every 5 s)
        status = notes.next("STATUS=")
        while " 0 B served" in status:
            status = notes.next("STATUS=")
        assert re.search(r"[1-9][\d.]* (B|KiB|MiB) served, .* chunk hits, cache .* of 16\.0 GiB", status), status
        stats = json.loads(cli(env, "stats", "--json", str(mnt)).stdout)
        assert stats["bytes_served"] >= len(want) and stats["errors"] == 0
        assert (cache / "blocks" / "data.mdb").exists()  # CacheDirectory= is the default cache

        # a crash: Restart=on-failure starts the same line again on the same (dead) mount point
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(30)
        with pytest.raises(OSError):
            os.listdir(mnt)
        procs.append(start(cmd, uenv, stderr_file))
        notes.next("READY=1")
        assert (mnt / "config.json").read_bytes() == want

        # systemctl stop: SIGTERM → STOPPING=1, a clean unmount, exit 0
        t = time.monotonic()
        procs[1].send_signal(signal.SIGTERM)
        notes.next("STOPPING=1")
        assert procs[1].wait(30) == 0 and time.monotonic() - t < 30
        assert not os.path.ismount(mnt)
    finally:
        notes.sock.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stderr_file.close()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    # journald keeps levels: every line starts with its syslog priority
    lines = log_path.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>") and "serving" in line for line in lines)
    assert any(line.startswith("<4>") and "stale mount" in line for line in lines)


def test_systemd_analyze_verify_every_unit(tmp_path):
    """systemd's own checker, with no warnings, on copies that point at the installed modelfs."""
    exe = shutil.which("modelfs", path=os.path.dirname(sys.executable)) or shutil.which("modelfs")
    assert exe, "modelfs is not installed"
    units = sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".mount"))
    assert len(units) >= 2
    for unit in units:
        name = unit.name.replace("@.", "@test.")  # a template is verified as an instance
        (tmp_path / name).write_text(unit.read_text().replace("/usr/local/bin/modelfs", exe))
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (unit.name, r.stderr)
        if unit.suffix == ".service":  # and its hardening does not regress: exposure 4.2 now, "OK"
            r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=45", "--no-pager",
                                str(tmp_path / name)], capture_output=True, text=True, cwd=tmp_path)
            assert r.returncode == 0, r.stdout[-400:]

"""The mount point as the OS sees it: checks before mounting, unmounting, waiting for the
daemon, the kernel's readahead for the mount. No FUSE session and no trio here: this is
what ``modelfs mount`` checks before starting a daemon and what ``modelfs unmount`` does.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelfsError, UsageError
from .xattrs import PID as PID_XATTR

log = logging.getLogger(__name__)

FSTYPE = "fuse.modelfs"  # what the mount options (subtype=modelfs) make mountinfo say


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().removeprefix("fusermount3: ")
        if "busy" in msg.lower():
            msg += " (files are open on it; close them, or use --lazy)"
        raise ModelfsError(f"cannot unmount {mountpoint}: {msg}")


@dataclass(frozen=True)
class Unmounted:
    pid: int | None  # the daemon's, when the mount answered
    still_running: bool  # the daemon outlived the wait
    other_mounts: list[str]  # bind mounts of the same filesystem still in place (this namespace)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(device "major:minor", mount point, filesystem type) of every mount in this namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and "-" in fields:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                out.append((fields[2], point, fields[fields.index("-") + 1]))
    return out


def mounts_of_device(dev: int) -> list[str]:
    """Mount points in this mount namespace of the filesystem with st_dev ``dev``."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    return [point for d, point, _ in _mountinfo() if d == want]


def mount_type(mountpoint: Path) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (the top one), or None. Read from
    mountinfo, so a dead FUSE mount (whose stat fails) is found too."""
    path = os.path.abspath(mountpoint)
    found = [t for _, point, t in _mountinfo() if point == path]
    return found[-1] if found else None


def unmount_and_wait(mountpoint: Path, lazy: bool = False, timeout: float = 30.0) -> Unmounted:
    """Unmount, then wait for the daemon to exit — unless a bind mount of the same
    filesystem keeps it serving (the kernel ends a FUSE session only with its last mount)."""
    kind = mount_type(mountpoint)
    if kind is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if kind != FSTYPE:
        raise UsageError(f"{mountpoint} is not a modelfs mount (it is {kind})")
    try:
        pid: int | None = int(os.getxattr(mountpoint, PID_XATTR))
        dev: int | None = os.stat(mountpoint).st_dev
    except (OSError, ValueError):
        pid = dev = None
    unmount(mountpoint, lazy)
    others = mounts_of_device(dev) if dev is not None else []
    if pid is None:
        return Unmounted(None, False, others)
    deadline = time.monotonic() + (0 if lazy or others else timeout)
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Unmounted(pid, _alive(pid), others)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's daemon: alive
        return True
    return True


def check_mountpoint(mountpoint: Path, nonempty: bool = False) -> None:
    """A usable, not-yet-mounted, empty directory (``nonempty``: or not empty); a dead
    FUSE mount there is cleared first. Mounting over files hides them, which is what
    other mount tools refuse by default too."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # "Transport endpoint is not connected": a dead daemon
            _clear_dead_mount(mountpoint)
        elif e.errno == errno.ENOENT:
            raise UsageError(f"mount point {mountpoint} does not exist") from None
        else:
            raise UsageError(f"mount point {mountpoint}: {e.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        # stat may be answered from the kernel's attribute cache even when the daemon
        # is gone; listing the directory always asks the daemon
        try:
            os.listdir(mountpoint)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                _clear_dead_mount(mountpoint)
                return
        raise UsageError(f"{mountpoint} is already a mount point (busy); unmount it first")
    if not nonempty:
        try:
            entries = os.listdir(mountpoint)
        except OSError as e:
            raise UsageError(f"mount point {mountpoint}: {e.strerror}") from None
        if entries:
            raise UsageError(f"mount point {mountpoint} is not empty ({len(entries)} entries, e.g. "
                             f"{sorted(entries)[0]!r}): the mount would hide them; pass --nonempty to "
                             "mount over them anyway")


def _clear_dead_mount(mountpoint: Path) -> None:
    log.warning("%s: clearing the stale mount of a daemon that died", mountpoint)
    unmount(mountpoint, lazy=True)


def set_kernel_readahead(mountpoint: Path, kb: int) -> None:
    """Bigger kernel reads per request (CernVM-FS does the same); root only, best effort."""
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("could not set %s: %s", path, e)

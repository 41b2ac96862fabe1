"""``mount.modelfs``: the helper mount(8) runs for ``-t modelfs`` (fstab lines, ``.mount`` units).

mount(8) calls ``/sbin/mount.modelfs SOURCE DIR [-sfnv] [-o OPTIONS]``. Options
that name a mount setting (``cache_size=200G``, ``allow_other``,
``config=/etc/modelfs/models.toml``) become ``modelfs mount`` flags; the generic
ones mount(8) and systemd use for themselves (``ro``, ``_netdev``, ``nofail``,
``x-systemd.*``, …) are ignored. Then it becomes ``modelfs mount`` (background),
which returns once the mount serves files, as mount(8) expects.
"""

from __future__ import annotations

import os
import sys

from ..config import KEYS

_GENERIC = {"ro", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev",
            "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime",
            "async", "sync"}
_GLOBAL = {"endpoint_url", "region", "profile", "concurrency", "log_level"}  # before "mount"
_FLAGS = {"allow_other": "--allow-other", "no_allow_other": "--no-allow-other", "nonempty": "--nonempty"}


class HelperError(Exception):
    pass


def mount_args(argv: list[str]) -> list[str]:
    """mount(8)'s arguments → ``modelfs mount`` arguments."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg == "-t":
            next(it, None)
        elif arg.startswith("-") and len(arg) > 1:
            continue  # -s (sloppy), -f (fake), -n (no mtab), -v (verbose)
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError("usage: mount.modelfs SOURCE MOUNTPOINT [-o OPTIONS]")
    before: list[str] = []
    out = ["mount", *positional]
    for opt in filter(None, options):
        name, eq, value = opt.partition("=")
        key = name.replace("-", "_")
        if name in _GENERIC or name.startswith(("x-", "comment")):
            continue
        if name == "rw":
            raise HelperError("modelfs mounts are read-only; drop 'rw' from the options")
        if key in _FLAGS and not eq:
            out.append(_FLAGS[key])
        elif key == "config" and eq:
            out += ["--config", value]
        elif key in KEYS and key not in ("source", "mountpoint", *_FLAGS) and eq:
            (before if key in _GLOBAL else out).extend(["--" + key.replace("_", "-"), value])
        else:
            raise HelperError(f"unknown mount option {opt!r} (see docs/operations.md)")
    return before + out


def main() -> None:
    try:
        args = mount_args(sys.argv[1:])
    except HelperError as e:
        print(f"mount.modelfs: {e}", file=sys.stderr)
        sys.exit(1)  # mount(8): "incorrect invocation"
    os.execv(sys.executable, [sys.executable, "-m", "modelfs", *args])


if __name__ == "__main__":
    main()

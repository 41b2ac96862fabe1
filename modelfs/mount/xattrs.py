"""The names of the extended attributes a mount shows: the one list, for the daemon that
answers them and for the commands that read them (``modelfs stats``, ``unmount``,
``prefetch``), which import this module and nothing of FUSE.

On every node (where it applies): ``model``, ``version``, ``tag``; on a file ``sha256``,
``chunks``, ``description``; on a version's root ``created``. On the mount's root also
``pid`` (the daemon's, for ``modelfs unmount`` to wait for) and ``stats`` (live figures).
"""

from __future__ import annotations

import os

PREFIX = "user.modelfs."
PID = PREFIX + "pid"  # on a mount's root: the daemon's PID
STATS = PREFIX + "stats"  # on a mount's root: a metrics snapshot (JSON), made when asked


def key_of(name: str) -> str | None:
    """``sha256`` for ``user.modelfs.sha256``; None for a name that is not ours."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def on_a_mount(path: str) -> bool:
    """Whether ``path`` is a file or directory on a modelfs mount (it carries our attributes)."""
    try:
        return any(a.startswith(PREFIX) for a in os.listxattr(path))
    except OSError:
        return False

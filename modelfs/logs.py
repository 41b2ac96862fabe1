"""Log lines on stderr, in the form whoever reads stderr keeps best.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with the
syslog priority, ``<3>`` … ``<7>``, which journald turns into the entry's level
(``journalctl -p warning`` works) and strips; it adds its own time and unit
name. A terminal gets ``modelfs: level: message``; anything else (the
background daemon's log file) gets a timestamp too.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_NOISY = ("botocore", "boto3", "urllib3", "s3transfer")


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # every line of a traceback keeps the level, or journald files it as info
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected (not a pipe we were handed later)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: str) -> None:
    """(Re)configure the root logger; safe to call again once a config file names a level."""
    if stderr_is_journal():
        fmt: logging.Formatter = JournalFormatter("%(name)s: %(message)s")
    elif sys.stderr.isatty():
        fmt = logging.Formatter("modelfs: %(levelname)s: %(message)s")
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in _NOISY:  # their INFO lines are noise for users ("Found credentials ...")
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def to_file(path: Path, level: str) -> None:
    """A detached process's output (the background daemon's, its helper's): stdin from
    /dev/null, stdout and stderr appended to ``path`` (made 0600), log lines set up for it."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    setup(level)  # now for a log file (timestamped)

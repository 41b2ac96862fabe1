"""A timeline of a process's loads, for finding where a read path leaves the link idle.

Off unless ``MODELFS_TRACE`` names a file: then every flight's start, hand-over and end
(``Lanes``) and every read that waits for a chunk (the mount's reader) is one JSON line
``{"t": monotonic seconds, "ev": ..., ...}`` appended to it. ``benchmarks/timeline.py``
turns a trace into link use over time, bytes in flight and readers' waits.

For measurement, not operations: nothing reads it back, and a write that fails turns
tracing off rather than disturb a read.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import IO, Any

ENV = "MODELFS_TRACE"


class Trace:
    """Appends events to one file, a line at a time (a daemon may end without flushing);
    ``event`` costs a few µs, cheap enough for every chunk."""

    def __init__(self, out: IO[str]):
        self._out: IO[str] | None = out

    def event(self, ev: str, **fields: Any) -> None:
        if self._out is None:
            return
        try:
            self._out.write(json.dumps({"t": round(time.monotonic(), 5), "ev": ev, **fields}) + "\n")
        except (OSError, ValueError):
            self._out = None

    def close(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except OSError:
                pass
            self._out = None


_trace: Trace | None | bool = False  # False: not looked at yet


def tracer() -> Trace | None:
    """This process's trace, or None (the usual case: ``MODELFS_TRACE`` unset)."""
    global _trace
    if _trace is False:
        path = os.environ.get(ENV)
        _trace = Trace(open(path, "a", buffering=1)) if path else None
        if _trace is not None:
            atexit.register(_trace.close)
    return _trace if isinstance(_trace, Trace) else None

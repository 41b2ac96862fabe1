"""Progress of long work (publish, pull): thread-safe counters and a tqdm bar on stderr.

tqdm draws only on a terminal by default, so CI logs and pipes stay clean.
Workers update both from many threads; locks keep updates whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class Counters:
    """Base for a run's figures: worker threads ``add`` to them, the summary reads them."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class Progress:
    def __init__(self, desc: str, enabled: bool | None = None):
        self.desc = desc
        self.enabled = enabled  # None: only on a terminal
        self._bar: tqdm | None = None
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        self._bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True,
                         unit_divisor=1024, disable=None if self.enabled is None else not self.enabled,
                         dynamic_ncols=True, leave=False)

    def advance(self, n: int, note: str | None = None) -> None:
        if self._bar is None:
            return
        with self._lock:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


"""In-process stand-ins for the unit tier: an object store in memory. The real tier (SeaweedFS,
FUSE) stays the judge; these let the logic above a store be tested in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Iterator

from modelfs.errors import NotFoundError, StoreUnavailableError
from modelfs.registry.store import ObjectInfo


class MemoryStore:
    """The slice of :class:`modelfs.registry.store.Store` a registry uses, in a dict.
    ``down = True``: every request fails as an unreachable store does; ``requests``
    counts them (what a cache saved is what it did not ask)."""

    endpoint = "memory://store"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.down = False
        self.requests = 0

    def _ask(self) -> None:
        self.requests += 1
        if self.down:
            raise StoreUnavailableError(f"cannot reach the object store at {self.endpoint}: connection refused")

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self._ask()
        if key not in self.objects:
            raise NotFoundError(key)
        return self.objects[key][0][start:end]

    def put(self, key: str, data: bytes, content_type: str = "") -> None:
        self._ask()
        self.objects[key] = (bytes(data), time.time())

    def delete(self, key: str) -> None:
        self._ask()
        self.objects.pop(key, None)

    def stat(self, key: str) -> ObjectInfo | None:
        self._ask()
        return ObjectInfo(key, len(self.objects[key][0]), self.objects[key][1]) if key in self.objects else None

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[ObjectInfo | str]:
        self._ask()
        seen = set()
        for key, (data, when) in sorted(self.objects.items()):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in seen:
                    seen.add(common)
                    yield common
            else:
                yield ObjectInfo(key, len(data), when)

    def check_bucket(self) -> None:
        self._ask()

    def presign(self, key: str, expires: int = 900, method: str = "GET") -> str:
        return f"{self.endpoint}/{key}"

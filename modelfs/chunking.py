"""Content-defined chunking: where a file is cut into chunks.

FastCDC (the ``fastcdc`` package's Cython implementation, ~2 GB/s here) picks
cut points from the content itself, so inserting bytes — a safetensors header
that grew by a few hundred bytes — moves only the chunks around the edit, and
every later chunk keeps its bytes and its hash. The sizes are recorded in each
manifest, so they can change later without breaking old versions; see
``docs/design.md`` for the measurement behind the defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import blake3
from fastcdc import fastcdc

MiB = 1 << 20
HASH_ALGORITHM = "blake3"


@dataclass(frozen=True)
class ChunkParams:
    min_size: int = 1 * MiB
    avg_size: int = 4 * MiB
    max_size: int = 8 * MiB
    algorithm: str = "fastcdc"

    def as_json(self) -> dict:
        return {"algorithm": self.algorithm, "min_size": self.min_size,
                "avg_size": self.avg_size, "max_size": self.max_size}


DEFAULT_PARAMS = ChunkParams()


def cut(data: memoryview | bytes, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each chunk of ``data``, in order, covering it exactly."""
    if len(data) == 0:
        return
    for c in fastcdc(data, min_size=params.min_size, avg_size=params.avg_size,
                     max_size=params.max_size, fat=False, hf=None):
        yield c.offset, c.length


def chunk_hash(data: bytes | memoryview) -> str:
    """The chunk's id: hex BLAKE3 of its raw bytes (fast, and releases the GIL)."""
    return blake3.blake3(data).hexdigest()

"""Content-defined chunking: where a file is cut into chunks.

FastCDC (the ``fastcdc`` package's Cython implementation, ~2 GB/s here) picks
cut points from the content itself, so inserting bytes — a safetensors header
that grew by a few hundred bytes — moves only the chunks around the edit, and
every later chunk keeps its bytes and its hash. The sizes are recorded in each
manifest, so they can change later without breaking old versions; see
``docs/design.md`` for the measurement behind the defaults.

A chunk's id is a two-level BLAKE3 tree ("blake3-blocks"): the BLAKE3 of the
32-byte BLAKE3 digests of its 64 KiB blocks. The digests travel with the stored
chunk (:mod:`modelfs.format.codec`), so a small read can fetch just the blocks it
touches plus the digest list, and check both against the id, instead of the
whole chunk its id covers. Manifests written before name chunks with plain
BLAKE3 of their bytes ("blake3"); those are still read, whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import blake3

MiB = 1 << 20
HASH_ALGORITHM = "blake3-blocks"  # what new manifests name their chunks with
PLAIN_HASH_ALGORITHM = "blake3"  # manifests before block digests
BLOCK = 64 << 10  # what a small read fetches and checks on its own
DIGEST = 32


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
    from fastcdc import fastcdc  # only publish cuts: not on a mount's start (hashlib, ~10 ms)

    if len(data) == 0:
        return
    for c in fastcdc(data, min_size=params.min_size, avg_size=params.avg_size,
                     max_size=params.max_size, fat=False, hf=None):
        yield c.offset, c.length


def block_digests(data: bytes | memoryview) -> bytes:
    """The BLAKE3 digest of each ``BLOCK`` of ``data``, concatenated (32 bytes per block)."""
    mv = memoryview(data)
    return b"".join([blake3.blake3(mv[i:i + BLOCK]).digest() for i in range(0, len(mv), BLOCK)])


def blocks_of(size: int) -> int:
    """How many blocks (and digests) a chunk of ``size`` bytes has."""
    return -(-size // BLOCK)


def root_of(digests: bytes | memoryview) -> str:
    """The chunk id a list of block digests stands for."""
    return blake3.blake3(digests).hexdigest()


def chunk_hash(data: bytes | memoryview) -> str:
    """The chunk's id (``HASH_ALGORITHM``): hex BLAKE3 of its blocks' BLAKE3 digests."""
    return root_of(block_digests(data))


def plain_hash(data: bytes | memoryview) -> str:
    """A chunk's id in manifests before block digests: hex BLAKE3 of its bytes."""
    return blake3.blake3(data).hexdigest()


def id_matches(data: bytes | memoryview, h: str) -> bool:
    """Whether ``data`` is the chunk named ``h`` by its blocks or by its bytes (for cache
    entries, which hold raw bytes and do not say which naming they were fetched under)."""
    return chunk_hash(data) == h or plain_hash(data) == h

"""The stored form of a chunk: a 16-byte header, then the payload.

    offset size  field
    0      4     magic  b"MFC1"
    4      1     encoding: 0 raw, 1 zstd (2.. reserved: encryption, other codecs)
    5      3     reserved, zero
    8      8     raw length, little-endian u64

The header lets the format grow (new encodings, encryption) without a break:
a reader that meets an encoding it does not know refuses the chunk clearly.
Every decoded chunk is checked against its BLAKE3 id before anyone sees it.
"""

from __future__ import annotations

import struct

import zstandard

from .chunking import chunk_hash
from .errors import IntegrityError

MAGIC = b"MFC1"
RAW, ZSTD = 0, 1
HEADER = struct.Struct("<4sB3xQ")
ZSTD_LEVEL = 3
PROBE = 64 * 1024  # compress a sample first; skip the rest when it does not pay
# Keep zstd only when it at least halves the chunk. Reads pay for compression: zstd
# decodes ~0.65 GB/s per core on weights (1.5 CPU-s per GB of output, measured here),
# while receiving a byte costs ~0.7 CPU-s/GB. bf16 weights shrink only ~22%: zstd would
# save 0.15 CPU-s/GB of transfer and spend 1.5 decoding, making cold reads slower than
# the store. JSON, tokenizers and zero-padded tensors shrink 2-20x: there it pays.
MIN_SAVING = 0.50


def encode(raw: bytes | memoryview, compress: bool = True) -> bytes:
    """The stored object for ``raw``: zstd where it at least halves it (JSON, tokenizers,
    sparse tensors), raw otherwise (bf16/fp16/fp32 weights)."""
    n = len(raw)
    if compress and n >= 4096:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        probe = raw[:PROBE]
        if len(cctx.compress(probe)) < MIN_SAVING * len(probe):
            packed = cctx.compress(raw)
            if len(packed) < MIN_SAVING * n:
                return HEADER.pack(MAGIC, ZSTD, n) + packed
    return HEADER.pack(MAGIC, RAW, n) + bytes(raw)


def max_stored_size(raw_size: int) -> int:
    """The largest stored object a chunk of ``raw_size`` bytes can be (zstd is kept only
    when it is smaller than raw): anything longer is refused before it is read."""
    return HEADER.size + raw_size


def decode(blob: bytes | bytearray, expected_hash: str, expected_size: int) -> bytes | memoryview:
    """The verified raw bytes of a stored chunk, or :class:`IntegrityError`.

    A raw chunk comes back as a view into ``blob`` (no copy of 4 MiB)."""
    if len(blob) < HEADER.size:
        raise IntegrityError(f"chunk {expected_hash[:16]}: truncated ({len(blob)} bytes)")
    magic, encoding, n = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError(f"chunk {expected_hash[:16]}: not a modelfs chunk (bad magic)")
    if n != expected_size:
        raise IntegrityError(f"chunk {expected_hash[:16]}: length {n}, expected {expected_size}")
    payload = memoryview(blob)[HEADER.size:]
    if encoding == RAW:
        raw = payload if len(payload) == n else None
    elif encoding == ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {expected_hash[:16]}: bad zstd payload: {e}") from None
    else:
        raise IntegrityError(f"chunk {expected_hash[:16]}: unknown encoding {encoding}")
    if raw is None or len(raw) != n or chunk_hash(raw) != expected_hash:
        raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    return raw

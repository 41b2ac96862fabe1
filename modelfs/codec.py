"""The stored form of a chunk: a 16-byte header, then the payload.

    offset size  field
    0      4     magic  b"MFC1"
    4      1     encoding: 0 raw, 1 zstd, 2 AES-256-GCM (3.. reserved: other codecs)
    5      3     reserved, zero
    8      8     raw length, little-endian u64

An encrypted chunk (encoding 2) is ``header ‖ nonce ‖ AES-256-GCM(inner) ‖ tag``,
where ``inner`` is the chunk's plain stored form (raw or zstd, header included:
compression happens before encryption, and whether a chunk was compressed is
not visible outside). The associated data is the outer header and the chunk id,
so a ciphertext neither opens under another id nor with another length.

The header lets the format grow without a break: a reader that meets an encoding
it does not know refuses the chunk clearly. Every decoded chunk is checked
against its id (BLAKE3, keyed in an encrypted registry) before anyone sees it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import zstandard

from .chunking import HASH_ALGORITHM, chunk_hash
from .encryption import OVERHEAD, RegistryKey, Sealer
from .errors import IntegrityError

MAGIC = b"MFC1"
RAW, ZSTD, AES_GCM = 0, 1, 2
KEYED_HASH_ALGORITHM = "blake3-keyed"
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
    return b"".join(encode_parts(raw, compress))


def encode_parts(raw: bytes | memoryview, compress: bool = True) -> tuple[bytes, bytes | memoryview]:
    """:func:`encode`'s result as (header, payload), the payload ``raw`` itself when it is
    stored raw: an upload sends the two without copying the chunk."""
    n = len(raw)
    if compress and n >= 4096:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        probe = raw[:PROBE]
        if len(cctx.compress(probe)) < MIN_SAVING * len(probe):
            packed = cctx.compress(raw)
            if len(packed) < MIN_SAVING * n:
                return HEADER.pack(MAGIC, ZSTD, n), packed
    return HEADER.pack(MAGIC, RAW, n), raw


def max_stored_size(raw_size: int) -> int:
    """The largest stored object a chunk of ``raw_size`` bytes can be (zstd is kept only
    when it is smaller than raw): anything longer is refused before it is read."""
    return HEADER.size + raw_size


def decode(blob: bytes | bytearray, expected_hash: str, expected_size: int,
           hash_fn: Callable[[bytes | memoryview], str] | None = chunk_hash) -> bytes | memoryview:
    """The verified raw bytes of a plain stored chunk, or :class:`IntegrityError`
    (``hash_fn`` None: the caller has authenticated ``blob`` otherwise).

    A raw chunk comes back as a view into ``blob`` (no copy of 4 MiB)."""
    encoding, n = _header(blob, expected_hash, expected_size)
    payload = memoryview(blob)[HEADER.size:]
    if encoding == AES_GCM:
        raise IntegrityError(f"chunk {expected_hash[:16]} is encrypted: this registry needs its encryption key")
    if encoding == RAW:
        raw = payload if len(payload) == n else None
    elif encoding == ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {expected_hash[:16]}: bad zstd payload: {e}") from None
    else:
        raise IntegrityError(f"chunk {expected_hash[:16]}: unknown encoding {encoding}")
    if raw is None or len(raw) != n or (hash_fn is not None and hash_fn(raw) != expected_hash):
        raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    return raw


def _header(blob: bytes | bytearray | memoryview, h: str, expected_size: int) -> tuple[int, int]:
    if len(blob) < HEADER.size:
        raise IntegrityError(f"chunk {h[:16]}: truncated ({len(blob)} bytes)")
    magic, encoding, n = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError(f"chunk {h[:16]}: not a modelfs chunk (bad magic)")
    if n != expected_size:
        raise IntegrityError(f"chunk {h[:16]}: length {n}, expected {expected_size}")
    return encoding, n


class ChunkCodec:
    """How one registry names and stores its chunks: plain (BLAKE3 ids, raw or zstd),
    or encrypted under a registry key (keyed BLAKE3 ids, AES-256-GCM around the plain
    form). Publish, pull, prefetch and the fetch workers all go through one of these.

    Invariant: with a key, only encrypted chunks are accepted (a plain object under a
    keyed id was written by someone without the key)."""

    def __init__(self, key: RegistryKey | None = None):
        self.key = key
        self._id_key = key.derive("chunk ids") if key is not None else None
        self._sealer = Sealer(key.derive("chunk cipher")) if key is not None else None

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def hash_algorithm(self) -> str:
        """What a manifest records as its chunk hash ("blake3" or "blake3-keyed")."""
        return KEYED_HASH_ALGORITHM if self.encrypted else HASH_ALGORITHM

    def hash(self, raw: bytes | memoryview) -> str:
        """The chunk's id: hex BLAKE3 of its bytes, keyed in an encrypted registry."""
        if self._id_key is None:
            return chunk_hash(raw)
        return blake3.blake3(raw, key=self._id_key).hexdigest()

    def max_stored_size(self, raw_size: int) -> int:
        n = max_stored_size(raw_size)
        return n + HEADER.size + OVERHEAD if self.encrypted else n

    def encode(self, raw: bytes | memoryview, h: str, compress: bool = True) -> bytes:
        return b"".join(self.encode_parts(raw, h, compress))

    def encode_parts(self, raw: bytes | memoryview, h: str,
                     compress: bool = True) -> tuple[bytes | memoryview, ...]:
        """The stored form of chunk ``h`` as pieces to send one after another (a raw chunk's
        bytes are not copied)."""
        parts = encode_parts(raw, compress)
        if self._sealer is None:
            return parts
        head = HEADER.pack(MAGIC, AES_GCM, len(raw))
        return (head + self._sealer.seal(b"".join(parts), head + bytes.fromhex(h)),)

    def decode(self, blob: bytes | bytearray, h: str, n: int, *, check_id: bool = True) -> bytes | memoryview:
        """The verified raw bytes of a stored chunk, or :class:`IntegrityError`.

        ``check_id`` False (encrypted chunks only): trust AES-GCM's tag alone, which
        authenticates the whole stored form and, through the associated data, its id.
        For a sealed cache's entries, which were checked against their id when fetched."""
        if self._sealer is None:
            return decode(blob, h, n)
        encoding, _ = _header(blob, h, n)
        if encoding != AES_GCM:
            raise IntegrityError(f"chunk {h[:16]} is not encrypted, in an encrypted registry: refused")
        head = bytes(memoryview(blob)[:HEADER.size])
        inner = self._sealer.open(memoryview(blob)[HEADER.size:], head + bytes.fromhex(h), f"chunk {h[:16]}")
        if len(inner) >= HEADER.size and HEADER.unpack_from(inner)[1] == AES_GCM:
            raise IntegrityError(f"chunk {h[:16]}: encrypted twice")
        return decode(inner, h, n, self.hash if check_id else None)

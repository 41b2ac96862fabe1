"""The stored form of a chunk: a 16-byte header, the block digests, then the payload.

    offset size    field
    0      4       magic  b"MFC1"
    4      1       encoding: 0 raw, 1 zstd, 2 AES-256-GCM (3.. reserved: other codecs)
    5      1       flags: bit 0 BLOCKS (the block digests follow the header); others zero
    6      2       reserved, zero
    8      8       raw length, little-endian u64
    16     32 × b  with BLOCKS: the BLAKE3 digest of each 64 KiB block of the raw chunk
                   (b = ⌈length / 64 KiB⌉); the chunk's id is the BLAKE3 of these

A chunk named with block digests ("blake3-blocks", see :mod:`modelfs.format.chunking`)
carries them, raw or zstd, so a reader of a few KiB of a raw chunk can GET the
header with the digests and only the blocks it needs (:func:`check_blocks`): the
digests are checked against the id, each block against its digest. A chunk
without BLOCKS (written before; the inner form of an encrypted chunk) is checked
whole against BLAKE3 of its bytes (keyed, in an encrypted registry). Which of
the two a stored chunk is, the chunk says: either way its bytes must match its
id, and no content matches an id under the other naming (a preimage).

An encrypted chunk (encoding 2) is ``header ‖ nonce ‖ AES-256-GCM(inner) ‖ tag``,
where ``inner`` is the chunk's plain stored form (raw or zstd, header included:
compression happens before encryption, and whether a chunk was compressed is
not visible outside). The associated data is the outer header and the chunk id,
so a ciphertext neither opens under another id nor with another length.

The header lets the format grow without a break: a reader that meets an encoding
or flag it does not know refuses the chunk clearly. Every decoded chunk is checked
against its id before anyone sees it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import blake3
import zstandard

from .chunking import (BLOCK, DIGEST, HASH_ALGORITHM, PLAIN_HASH_ALGORITHM, block_digests, blocks_of, plain_hash,
                       root_of)
from ..errors import IntegrityError

if TYPE_CHECKING:  # imported with a key only: a plain registry's fetch worker starts without it
    from .encryption import RegistryKey, Sealer

MAGIC = b"MFC1"
RAW, ZSTD, AES_GCM = 0, 1, 2
BLOCKS = 1  # flag: block digests follow the header
KEYED_HASH_ALGORITHM = "blake3-keyed"
HEADER = struct.Struct("<4sBB2xQ")
ZSTD_LEVEL = 3
PROBE = 64 * 1024  # compress a sample first; skip the rest when it does not pay
# Keep zstd only when it at least halves the chunk. Reads pay for compression: zstd
# decodes ~0.65 GB/s per core on weights (1.5 CPU-s per GB of output, measured here),
# while receiving a byte costs ~0.7 CPU-s/GB. bf16 weights shrink only ~22%: zstd would
# save 0.15 CPU-s/GB of transfer and spend 1.5 decoding, making cold reads slower than
# the store. JSON, tokenizers and zero-padded tensors shrink 2-20x: there it pays.
MIN_SAVING = 0.50


def encode(raw: bytes | memoryview, compress: bool = True) -> bytes:
    """The stored object for ``raw`` (named with block digests): zstd where it at least
    halves it (JSON, tokenizers, sparse tensors), raw otherwise (bf16/fp16/fp32 weights)."""
    return b"".join(encode_parts(raw, compress, block_digests(raw)))


def encode_parts(raw: bytes | memoryview, compress: bool = True,
                 digests: bytes | None = None) -> tuple[bytes, bytes | memoryview]:
    """:func:`encode`'s result as (header with ``digests``, payload), the payload ``raw``
    itself when it is stored raw: an upload sends the two without copying the chunk.
    ``digests`` None: no BLOCKS (a chunk named by plain or keyed BLAKE3)."""
    n = len(raw)
    flags, tail = (0, b"") if digests is None else (BLOCKS, digests)
    if compress and n >= 4096:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        probe = raw[:PROBE]
        if len(cctx.compress(probe)) < MIN_SAVING * len(probe):
            packed = cctx.compress(raw)
            if len(packed) < MIN_SAVING * n:
                return HEADER.pack(MAGIC, ZSTD, flags, n) + tail, packed
    return HEADER.pack(MAGIC, RAW, flags, n) + tail, raw


def max_stored_size(raw_size: int) -> int:
    """The largest stored object a chunk of ``raw_size`` bytes can be (zstd is kept only
    when it is smaller than raw): anything longer is refused before it is read."""
    return head_size(raw_size) + raw_size


def head_size(raw_size: int) -> int:
    """Header and block digests of a chunk of ``raw_size`` bytes: where its payload starts."""
    return HEADER.size + DIGEST * blocks_of(raw_size)


def decode(blob: bytes | bytearray | memoryview, expected_hash: str, expected_size: int,
           hash_fn: Callable[[bytes | memoryview], str] | None = plain_hash) -> bytes | memoryview:
    """The verified raw bytes of a plain stored chunk, or :class:`IntegrityError`
    (``hash_fn``: the id of a chunk without block digests; None: the caller has
    authenticated ``blob`` otherwise).

    A raw chunk comes back as a view into ``blob`` (no copy of 4 MiB)."""
    encoding, flags, n = _header(blob, expected_hash, expected_size)
    digests = b""
    start = HEADER.size
    if flags & BLOCKS:
        start = head_size(n)
        digests = bytes(memoryview(blob)[HEADER.size:start])
        if len(digests) != start - HEADER.size:
            raise IntegrityError(f"chunk {expected_hash[:16]}: truncated ({len(blob)} bytes)")
    payload = memoryview(blob)[start:]
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
    if raw is None or len(raw) != n:
        raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    if flags & BLOCKS:
        if hash_fn is not None and (root_of(digests) != expected_hash or block_digests(raw) != digests):
            raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    elif hash_fn is not None and hash_fn(raw) != expected_hash:
        raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    return raw


def check_raw(raw: bytes | memoryview, expected_hash: str, expected_size: int) -> bytes | memoryview:
    """``raw`` itself if it is chunk ``expected_hash`` (named by its blocks' digests):
    an adopted chunk, read as raw bytes of another store's object, which carries no
    header; anything else (the object changed) is an :class:`IntegrityError`."""
    if len(raw) != expected_size or root_of(block_digests(raw)) != expected_hash:
        raise IntegrityError(f"chunk {expected_hash[:16]}: content does not match its hash")
    return raw


def check_head(head: bytes | memoryview, h: str, size: int) -> bytes | None:
    """From the first :func:`head_size` bytes of stored chunk ``h``: its block digests,
    checked against ``h``, if its payload is raw and its blocks can be read one by one;
    None if it cannot (zstd, or a chunk without digests). IntegrityError if it lies."""
    encoding, flags, _ = _header(head, h, size)
    if not flags & BLOCKS or encoding != RAW:
        return None
    digests = bytes(memoryview(head)[HEADER.size:head_size(size)])
    if len(digests) != head_size(size) - HEADER.size or root_of(digests) != h:
        raise IntegrityError(f"chunk {h[:16]}: block digests do not match its id")
    return digests


def check_blocks(body: bytes | memoryview, first: int, digests: bytes, h: str) -> None:
    """Check ``body``, the raw chunk's blocks from block ``first`` on (the last one may
    be the chunk's short tail), against ``digests`` (from :func:`check_head`)."""
    got = block_digests(body)
    if got != digests[first * DIGEST:first * DIGEST + len(got)] or not got:
        raise IntegrityError(f"chunk {h[:16]}: block {first}+ does not match its digest")


def block_span(lo: int, hi: int, size: int) -> tuple[int, int, int]:
    """For bytes [lo, hi) of a raw chunk of ``size`` bytes: (first block, start and end
    of the whole blocks that hold them, as offsets in the stored object)."""
    first = lo // BLOCK
    base = head_size(size)
    return first, base + first * BLOCK, base + min(-(-hi // BLOCK) * BLOCK, size)


def _header(blob: bytes | bytearray | memoryview, h: str, expected_size: int) -> tuple[int, int, int]:
    if len(blob) < HEADER.size:
        raise IntegrityError(f"chunk {h[:16]}: truncated ({len(blob)} bytes)")
    magic, encoding, flags, n = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError(f"chunk {h[:16]}: not a modelfs chunk (bad magic)")
    if flags & ~BLOCKS:
        raise IntegrityError(f"chunk {h[:16]}: unknown flags {flags:#x}")
    if n != expected_size:
        raise IntegrityError(f"chunk {h[:16]}: length {n}, expected {expected_size}")
    return encoding, flags, n


class ChunkCodec:
    """How one registry names and stores its chunks: plain (ids from the BLAKE3 digests
    of their blocks, which the stored chunk carries; raw or zstd), or encrypted under a
    registry key (keyed BLAKE3 ids, AES-256-GCM around the plain form). Publish, pull,
    prefetch and the fetch workers all go through one of these.

    Invariant: with a key, only encrypted chunks are accepted (a plain object under a
    keyed id was written by someone without the key)."""

    def __init__(self, key: RegistryKey | None = None):
        self.key = key
        self._id_key = key.derive("chunk ids") if key is not None else None
        self._sealer: Sealer | None = None
        self._overhead = 0  # what sealing adds to a chunk
        if key is not None:
            from . import encryption
            self._sealer = encryption.Sealer(key.derive("chunk cipher"))
            self._overhead = HEADER.size + encryption.OVERHEAD

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def hash_algorithm(self) -> str:
        """What a manifest it writes records as its chunk hash ("blake3-blocks" or
        "blake3-keyed")."""
        return KEYED_HASH_ALGORITHM if self.encrypted else HASH_ALGORITHM

    def reads(self, algorithm: str) -> bool:
        """Whether this codec can verify chunks a manifest names with ``algorithm``
        (a plain registry also holds versions published before block digests)."""
        return algorithm in ((KEYED_HASH_ALGORITHM,) if self.encrypted else (HASH_ALGORITHM, PLAIN_HASH_ALGORITHM))

    def name(self, raw: bytes | memoryview) -> tuple[str, bytes | None]:
        """The chunk's id, and the block digests it is computed from (None in an
        encrypted registry, whose ids are keyed BLAKE3 of the whole chunk)."""
        if self._id_key is None:
            digests = block_digests(raw)
            return root_of(digests), digests
        return blake3.blake3(raw, key=self._id_key).hexdigest(), None

    def hash(self, raw: bytes | memoryview) -> str:
        """The chunk's id (see :meth:`name`)."""
        return self.name(raw)[0]

    def max_stored_size(self, raw_size: int) -> int:
        n = max_stored_size(raw_size)
        return n + self._overhead

    def encode(self, raw: bytes | memoryview, h: str, compress: bool = True) -> bytes:
        return b"".join(self.encode_parts(raw, h, compress))

    def encode_parts(self, raw: bytes | memoryview, h: str, compress: bool = True,
                     digests: bytes | None = None) -> tuple[bytes | memoryview, ...]:
        """The stored form of chunk ``h`` as pieces to send one after another (a raw chunk's
        bytes are not copied). ``digests``: its block digests, if :meth:`name` gave them."""
        if self._sealer is None:
            return encode_parts(raw, compress, digests if digests is not None else block_digests(raw))
        inner = b"".join(encode_parts(raw, compress))
        head = HEADER.pack(MAGIC, AES_GCM, 0, len(raw))
        return (head + self._sealer.seal(inner, head + bytes.fromhex(h)),)

    def decode(self, blob: bytes | bytearray, h: str, n: int, *, check_id: bool = True) -> bytes | memoryview:
        """The verified raw bytes of a stored chunk, or :class:`IntegrityError`.

        ``check_id`` False (encrypted chunks only): trust AES-GCM's tag alone, which
        authenticates the whole stored form and, through the associated data, its id.
        For a sealed cache's entries, which were checked against their id when fetched."""
        if self._sealer is None:
            return decode(blob, h, n)
        encoding, _, _ = _header(blob, h, n)
        if encoding != AES_GCM:
            raise IntegrityError(f"chunk {h[:16]} is not encrypted, in an encrypted registry: refused")
        head = bytes(memoryview(blob)[:HEADER.size])
        inner = self._sealer.open(memoryview(blob)[HEADER.size:], head + bytes.fromhex(h), f"chunk {h[:16]}")
        if len(inner) >= HEADER.size and HEADER.unpack_from(inner)[1] == AES_GCM:
            raise IntegrityError(f"chunk {h[:16]}: encrypted twice")
        if len(inner) >= HEADER.size and HEADER.unpack_from(inner)[2] & BLOCKS:
            raise IntegrityError(f"chunk {h[:16]}: block digests inside an encrypted chunk")
        return decode(inner, h, n, self.hash if check_id else None)

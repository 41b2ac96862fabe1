import os
import random

import pytest

from modelfs.format import codec
from modelfs.format.chunking import BLOCK, ChunkParams, block_digests, chunk_hash, cut, plain_hash
from modelfs.errors import IntegrityError

SMALL = ChunkParams(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10)


def test_cuts_cover_data_exactly():
    data = random.Random(1).randbytes(3 << 20)
    cuts = list(cut(data, SMALL))
    assert cuts[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(cuts, cuts[1:]))
    assert sum(n for _, n in cuts) == len(data)
    assert all(n <= SMALL.max_size for _, n in cuts)
    assert list(cut(b"", SMALL)) == []


def test_insertion_moves_only_nearby_chunks():
    data = random.Random(2).randbytes(4 << 20)
    before = {chunk_hash(data[o:o + n]) for o, n in cut(data, SMALL)}
    grown = data[:1000] + os.urandom(300) + data[1000:]
    after = [chunk_hash(grown[o:o + n]) for o, n in cut(grown, SMALL)]
    assert sum(h not in before for h in after) <= 2


@pytest.mark.parametrize("payload", [os.urandom(1 << 20), b"{\"a\": 1}" * 100_000, b"", b"x"])
def test_codec_round_trip_and_encoding_choice(payload):
    blob = codec.encode(payload)
    magic, encoding, flags, n = codec.HEADER.unpack_from(blob)
    assert magic == b"MFC1" and n == len(payload) and flags == codec.BLOCKS
    # random bytes do not compress: stored raw; JSON does: stored zstd and smaller
    if len(payload) > 4096:
        assert encoding == (codec.RAW if payload[:4] != b"{\"a\"" else codec.ZSTD)
    assert codec.decode(blob, chunk_hash(payload), len(payload)) == payload


def test_codec_rejects_corruption():
    payload = os.urandom(100_000)
    h = chunk_hash(payload)
    blob = bytearray(codec.encode(payload))
    blob[5000] ^= 1
    with pytest.raises(IntegrityError, match="does not match"):
        codec.decode(bytes(blob), h, len(payload))
    with pytest.raises(IntegrityError, match="truncated"):
        codec.decode(bytes(blob[:10]), h, len(payload))
    bad = bytearray(codec.encode(payload))
    bad[5] = 2
    with pytest.raises(IntegrityError, match="unknown flags"):
        codec.decode(bytes(bad), h, len(payload))
    bad[5] = codec.BLOCKS
    bad[4] = 9
    with pytest.raises(IntegrityError, match="unknown encoding"):
        codec.decode(bytes(bad), h, len(payload))
    with pytest.raises(IntegrityError, match="bad magic"):
        codec.decode(b"XXXX" + bytes(blob[4:]), h, len(payload))
    packed = codec.encode(b"{\"a\": 1}" * 10_000)
    with pytest.raises(IntegrityError):
        codec.decode(packed[:-10], chunk_hash(b"{\"a\": 1}" * 10_000), 80_000)


def test_a_chunk_names_itself_by_its_blocks_and_older_chunks_still_decode():
    payload = os.urandom(5 * BLOCK + 123)
    h = chunk_hash(payload)
    assert h == __import__("blake3").blake3(block_digests(payload)).hexdigest() != plain_hash(payload)
    # written before block digests: no BLOCKS flag, named by BLAKE3 of its bytes
    old = b"".join(codec.encode_parts(payload, digests=None))
    assert codec.decode(old, plain_hash(payload), len(payload)) == payload
    with pytest.raises(IntegrityError, match="does not match"):
        codec.decode(old, h, len(payload))  # the same bytes under the new name: refused
    with pytest.raises(IntegrityError, match="does not match"):
        codec.decode(codec.encode(payload), plain_hash(payload), len(payload))


def test_a_few_blocks_are_checked_against_the_digests_and_the_digests_against_the_id():
    payload = os.urandom(5 * BLOCK + 123)
    h, n = chunk_hash(payload), len(payload)
    blob = codec.encode(payload)
    head = blob[:codec.head_size(n)]
    digests = codec.check_head(head, h, n)
    assert digests == block_digests(payload)
    first, a, b = codec.block_span(3 * BLOCK + 10, 5 * BLOCK + 20, n)  # the last two blocks, the tail short
    assert (first, a, b) == (3, codec.head_size(n) + 3 * BLOCK, len(blob))
    codec.check_blocks(blob[a:b], first, digests, h)
    flipped = bytearray(blob[a:b])
    flipped[BLOCK + 7] ^= 1
    with pytest.raises(IntegrityError, match="block 3"):
        codec.check_blocks(bytes(flipped), first, digests, h)
    with pytest.raises(IntegrityError, match="block 3"):
        codec.check_blocks(blob[a:b - 1], first, digests, h)  # a short body
    lying = bytearray(head)
    lying[codec.HEADER.size] ^= 1  # a digest changed: no longer the id's
    with pytest.raises(IntegrityError, match="digests do not match"):
        codec.check_head(bytes(lying), h, n)
    with pytest.raises(IntegrityError, match="digests do not match"):
        codec.check_head(head[:-1], h, n)
    # zstd and chunks without digests cannot be read by blocks: the reader loads them whole
    text = b"{\"a\": 1}" * 100_000
    assert codec.check_head(codec.encode(text)[:64], chunk_hash(text), len(text)) is None
    assert codec.check_head(b"".join(codec.encode_parts(payload)), plain_hash(payload), n) is None

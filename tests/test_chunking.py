import os
import random

import pytest

from modelfs import codec
from modelfs.chunking import ChunkParams, chunk_hash, cut
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
    magic, encoding, n = codec.HEADER.unpack_from(blob)
    assert magic == b"MFC1" and n == len(payload)
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
    bad[4] = 9
    with pytest.raises(IntegrityError, match="unknown encoding"):
        codec.decode(bytes(bad), h, len(payload))
    with pytest.raises(IntegrityError, match="bad magic"):
        codec.decode(b"XXXX" + bytes(blob[4:]), h, len(payload))
    packed = codec.encode(b"{\"a\": 1}" * 10_000)
    with pytest.raises(IntegrityError):
        codec.decode(packed[:-10], chunk_hash(b"{\"a\": 1}" * 10_000), 80_000)

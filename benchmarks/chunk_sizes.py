"""Which FastCDC sizes to use: dedup after edits vs. object count, measured locally.

    .venv/bin/python benchmarks/chunk_sizes.py [--size-mib 256]

For several (min, avg, max) settings it cuts a safetensors-like file, then
(a) the same file with one 100 KB region changed, (b) the same file with a
header grown by 400 bytes (every later offset shifts), and reports the bytes
that would be uploaded again and the number of objects per GiB.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from modelfs.format.chunking import ChunkParams, MiB, chunk_hash, cut  # noqa: E402

SETTINGS = [(256 << 10, 1 * MiB, 4 * MiB), (512 << 10, 2 * MiB, 8 * MiB),
            (1 * MiB, 4 * MiB, 8 * MiB), (1 * MiB, 4 * MiB, 16 * MiB), (2 * MiB, 8 * MiB, 32 * MiB)]


def chunks(data: bytes, p: ChunkParams) -> dict[str, int]:
    return {chunk_hash(data[o:o + n]): n for o, n in cut(data, p)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    rng = random.Random(0)
    base = b"".join(rng.randbytes(MiB) for _ in range(args.size_mib))
    edited = bytearray(base)
    edited[len(base) // 2:len(base) // 2 + 100_000] = os.urandom(100_000)
    grown = base[:4096] + os.urandom(400) + base[4096:]
    rows = []
    for mn, avg, mx in SETTINGS:
        p = ChunkParams(mn, avg, mx)
        t = time.perf_counter()
        old = chunks(base, p)
        secs = time.perf_counter() - t
        e = chunks(bytes(edited), p)
        g = chunks(grown, p)
        rows.append({"min": mn, "avg": avg, "max": mx, "chunks_per_GiB": round(len(old) * 1024 / args.size_mib),
                     "edit_100KB_reupload_bytes": sum(n for h, n in e.items() if h not in old),
                     "header_grow_400B_reupload_bytes": sum(n for h, n in g.items() if h not in old),
                     "cut_and_hash_MBps": round(len(base) / secs / 1e6)})
    print(save("chunk_sizes", {"size_bytes": len(base), "rows": rows}))
    print(f"{'min/avg/max (KiB)':>22} {'chunks/GiB':>10} {'edit reupload':>14} {'header reupload':>16} {'MB/s':>6}")
    for r in rows:
        sizes = f"{r['min'] >> 10}/{r['avg'] >> 10}/{r['max'] >> 10}"
        print(f"{sizes:>22} {r['chunks_per_GiB']:>10} {r['edit_100KB_reupload_bytes'] / MiB:>12.1f}Mi "
              f"{r['header_grow_400B_reupload_bytes'] / MiB:>14.1f}Mi {r['cut_and_hash_MBps']:>6}")


if __name__ == "__main__":
    main()

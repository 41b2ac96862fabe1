"""Where a cold read leaves the link idle: a mount's trace (``MODELFS_TRACE=FILE``) as a timeline.

    .venv/bin/python benchmarks/timeline.py TRACE [--bucket-ms 250]

Prints, per time bucket: MB fetched (loads that ended in it, spread over their
duration), loads in flight (mean), how many of them readahead started, and how long
readers waited for chunks; then totals: idle time (no load in flight), readers'
waits by file, peeks, and the time from each file's first wait to its last.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--bucket-ms", type=float, default=250)
    a = ap.parse_args()
    evs = [json.loads(x) for x in a.trace.read_text().splitlines() if x.strip()]
    if not evs:
        raise SystemExit("empty trace")
    t0 = min(e["t"] for e in evs)
    start: dict[tuple[str, str], dict] = {}
    spans = []  # (t_start, t_end, size, kind, urgent)
    waits = []
    for e in evs:
        t = e["t"] - t0
        if e["ev"] == "start":
            start[(e["kind"], e["h"])] = dict(e, t=t)
        elif e["ev"] == "done":
            s = start.pop((e["kind"], e["h"]), None)
            if s is not None:
                spans.append((s["t"], t, e["size"] if e.get("fetched") else 0, e["kind"], s["urgent"]))
        elif e["ev"] == "wait":
            waits.append((t - e["secs"], t, e["path"], e["size"]))
    end = max(s[1] for s in spans) if spans else 0
    b = a.bucket_ms / 1000
    n = int(end / b) + 1
    mb, inflight, ahead, waited = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n

    def spread(lo: float, hi: float, arr: list[float], total: float, per_second: bool = False) -> None:
        dur = max(hi - lo, 1e-9)
        i = int(lo / b)
        while i < n and i * b < hi:
            overlap = min(hi, (i + 1) * b) - max(lo, i * b)
            arr[i] += overlap / b if per_second else total * overlap / dur
            i += 1

    for lo, hi, size, kind, urgent in spans:
        spread(lo, hi, mb, size / 1e6)
        spread(lo, hi, inflight, 0, per_second=True)
        if not urgent:
            spread(lo, hi, ahead, 0, per_second=True)
    for lo, hi, _, _ in waits:
        spread(lo, hi, waited, 0, per_second=True)
    print("| t (s) | MB/s | loads in flight | of them readahead | readers waiting |\n|---|---|---|---|---|")
    for i in range(n):
        print(f"| {i * b:.2f} | {mb[i] / b:.0f} | {inflight[i]:.1f} | {ahead[i]:.1f} | {waited[i]:.2f} |")
    idle = sum(b for i in range(n) if inflight[i] < 0.05)
    by_file: dict[str, list] = defaultdict(list)
    for lo, hi, path, _ in waits:
        by_file[path].append((lo, hi))
    print(f"\nspan {end:.2f} s; {sum(s[2] for s in spans) / 1e6:.0f} MB fetched in {len(spans)} flights "
          f"({sum(1 for s in spans if s[3] == 'peek')} peeks); idle buckets {idle:.2f} s; "
          f"readers waited {sum(h - lo for lo, h, _, _ in waits):.2f} s in {len(waits)} reads")
    for path, ws in by_file.items():
        print(f"  {path}: {len(ws)} waits, {sum(h - lo for lo, h in ws):.2f} s, "
              f"first at {ws[0][0]:.2f} s, last ends {ws[-1][1]:.2f} s")


if __name__ == "__main__":
    main()

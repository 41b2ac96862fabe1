"""The benchmark suite's --quick mode runs in CI so it cannot rot. Timings are not asserted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.fuse  # each benchmark starts its own server and mounts


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the page cache and mounts FUSE: needs root")
def test_suite_quick_mode_produces_every_result(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    med = res["medians"]
    peers = [t for t in ("rclone (cache off)", "rclone (cache full)", "s3fs", "s3fs (use_cache)")
             if shutil.which(t.split()[0])]
    assert peers, "no other mount installed: scripts/setup.sh installs rclone and s3fs"
    for target in ["modelfs", "local disk", *peers]:
        for metric in ("seq_cold_MBps", "seq_warm_MBps", "seq_hot_MBps", "first_4KiB_cold_ms",
                       "pread_4KiB_cold_p99_ms", "pread_1MiB_warm_p99_ms", "safetensors_load_cold_s",
                       "small_files_cold_s"):
            assert med[target][metric] > 0, (target, metric)
    assert med["modelfs"]["peak_rss_MiB"] > 0 and med["modelfs"]["publish_MBps"] > 0
    assert 0 < med["modelfs"]["republish_1pct_uploaded_MiB"] < 0.5 * res["bytes"] / 2**20
    assert med["s5cmd cp"]["download_then_load_s"] > 0 and med["modelfs pull"]["download_MBps"] > 0
    assert len(res["ratios"]) == 5
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ratio" in (tmp_path / "results.md").read_text()
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the page cache and mounts FUSE: needs root")
def test_encryption_benchmark_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "encryption.py"), "--size-mib", "16",
                        "--runs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "encryption.json").read_text())
    assert res["publish_ratio"] > 0 and res["cold_read_ratio"] > 0 and res["encrypt_cache_warm_ratio"] > 0
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the page cache and mounts FUSE: needs root")
def test_random_reads_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_reads.py"), "--size-mib", "16",
                        "--preads", "10", "--runs", "1"], capture_output=True, text=True, timeout=600, cwd="/tmp")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")}
    assert {"modelfs", "4 KiB ranged GET (no FUSE)"} <= rows, r.stdout
    assert "slowest reads" in r.stdout

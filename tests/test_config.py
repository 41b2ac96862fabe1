"""The TOML config file: keys, defaults, precedence and errors (no server needed)."""

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from modelfs.config import MOUNT_KEYS, StoreConfig, load_file, resolve
from modelfs.errors import UsageError
from modelfs.mount.settings import lanes_of
from modelfs.mount.fstab import HelperError, mount_args

ROOT = Path(__file__).resolve().parent.parent
BASE = {"source": "s3://b/reg", "mountpoint": "/models"}


def write(tmp_path, text):
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_precedence_defaults_then_file_then_flags(tmp_path):
    f = write(tmp_path, 'source = "s3://b/reg"\nmountpoint = "/models"\ncache_size = "1G"\n'
                        'allow_other = true\nconcurrency = 4\n')
    s = resolve(f, {})
    assert (s["cache_size"], s["allow_other"], s["concurrency"]) == (1 << 30, True, 4)
    assert s["memory_cache"] == 256 << 20 and s["log_level"] == "warning"  # defaults fill in
    s = resolve(f, {"cache_size": "2G", "allow_other": False, "source": "s3://other/x@prod"})
    assert (s["cache_size"], s["allow_other"], s["source"]) == (2 << 30, False, "s3://other/x@prod")
    assert s["concurrency"] == 4


@pytest.mark.parametrize("text, message", [
    ('cache_sise = "1G"', "unknown key 'cache_sise' (did you mean 'cache_size'?)"),
    ('aws_secret_access_key = "x"', "looks like a credential"),
    ('cache_size = "lots"', "cache_size = 'lots' (from config file"),
    ('cache_size = -5', "must be positive"),
    ("concurrency = 0", "expected a whole number from 1 to 256"),
    ('allow_other = "yes"', "expected true or false"),
    ('log_level = "loud"', "expected one of debug, info, warning, error"),
    ('endpoint_url = "127.0.0.1:9000"', "expected an http:// or https:// URL"),
    ("fetch_timeout = 0", "expected seconds"),
    ("[cache_size]\nx = 1", "'cache_size' must be a value, not a table"),
    ("cache_size = ", "is not valid TOML"),
])
def test_bad_files_are_one_clear_error(tmp_path, text, message):
    f = write(tmp_path, 'source = "s3://b/reg"\nmountpoint = "/m"\n' + text + "\n")
    with pytest.raises(UsageError) as e:
        resolve(f, {})
    assert message in str(e.value) and str(f) in str(e.value)


def test_missing_pieces(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_file(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="no mountpoint"):
        resolve(write(tmp_path, 'source = "s3://b/reg"\n'), {})
    with pytest.raises(UsageError, match=r"cache_size = 'big' \(from the command line\)"):
        resolve(None, {**BASE, "cache_size": "big"})


def test_a_mount_fetches_four_requests_per_core_by_default_and_a_given_count_wins(tmp_path):
    cores = os.cpu_count() or 2
    assert lanes_of(resolve(None, BASE)).concurrency == max(8, min(16, 4 * cores))
    assert lanes_of(resolve(write(tmp_path, "concurrency = 5\n"), BASE)).concurrency == 5
    assert lanes_of(resolve(None, {**BASE, "concurrency": 16})).concurrency == 16  # `modelfs -j 16 mount`
    assert StoreConfig().concurrency == 16  # pull, publish, prefetch and adopt: the cores are theirs


def test_example_file_and_docs_cover_every_key():
    example = (ROOT / "systemd" / "modelfs.example.toml").read_text()
    parsed = tomllib.loads(example)
    assert resolve(ROOT / "systemd" / "modelfs.example.toml", {})["source"] == parsed["source"]
    uncommented = tomllib.loads("\n".join(line.removeprefix("# ") for line in example.splitlines()
                                          if "(unset)" not in line and re.match(r"#? ?\w+ = ", line)))
    docs = (ROOT / "docs" / "operations.md").read_text()
    for key in MOUNT_KEYS:
        assert f"`{key.name}`" in docs, f"docs/operations.md lacks {key.name}"
        if key.name == "concurrency":  # the one default that depends on the machine: both say how
            assert "four per core, from 8 to 16" in example and "four per core, from `8` to `16`" in docs
            continue
        if key.default is not None:
            assert uncommented[key.name] == key.default, key.name  # the example shows the real default
            assert f"`{json.dumps(key.default) if isinstance(key.default, (bool, str)) else key.default}`" \
                in docs, f"docs/operations.md lacks the default of {key.name}"


def test_mount_helper_translates_fstab_options():
    args = mount_args(["s3://b/reg", "/models", "-o", "ro,allow_other,_netdev,nofail,x-systemd.automount,"
                       "cache_size=20G,config=/etc/modelfs/m.toml,endpoint_url=http://127.0.0.1:9", "-n"])
    assert args == ["--endpoint-url", "http://127.0.0.1:9", "mount", "s3://b/reg", "/models", "--allow-other",
                    "--cache-size", "20G", "--config", "/etc/modelfs/m.toml"]
    with pytest.raises(HelperError, match="read-only"):
        mount_args(["s3://b/reg", "/models", "-o", "rw"])
    with pytest.raises(HelperError, match="unknown mount option 'cache_sise=1G'"):
        mount_args(["s3://b/reg", "/models", "-o", "cache_sise=1G"])
    with pytest.raises(HelperError, match="usage"):
        mount_args(["/models"])

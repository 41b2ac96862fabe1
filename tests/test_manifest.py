import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.errors import IntegrityError, ManifestError
from modelfs.format.manifest import DirEntry, FileEntry, Manifest, all_directories, loads

H = "ab" * 32


def make(files=None, dirs=()):
    files = files if files is not None else [
        FileEntry("model.safetensors", 10, 0o644, "cd" * 32, ((H, 6), ("ef" * 32, 4)), {"format": "safetensors"}),
        FileEntry("sub/dir/tok.json", 3, 0o600, "00" * 32, ((H, 3),), {}, 1_763_857_316_123_456_789),
        FileEntry("empty", 0, 0o755, "11" * 32, (), {"format": "empty"}),
    ]
    return Manifest(name="m", created="2026-11-22T00:00:00Z", files=tuple(files),
                    directories=tuple(dirs), chunking={"algorithm": "fastcdc"})


def doc():
    return json.loads(make(dirs=[DirEntry("empty_dir", 0o755)]).to_bytes())


def test_round_trip_is_canonical_and_deterministic():
    m = make(dirs=[DirEntry("empty_dir", 0o700)])
    data = m.to_bytes()
    back = loads(data)
    assert back == m and back.to_bytes() == data
    assert back.version_id == m.version_id and len(m.version_id) == 20
    # each chunk on one line: a diff of two versions is readable
    assert f'["{H}", 6]' in data.decode()
    assert back.file("model.safetensors").chunk_index(7) == 1
    assert back.totals()["unique_chunks"] == 2
    assert set(all_directories(back)) == {"empty_dir", "sub", "sub/dir"}
    # mtimes are optional: exact nanoseconds where recorded, absent (older manifests) elsewhere
    assert back.file("sub/dir/tok.json").mtime_ns == 1_763_857_316_123_456_789
    assert back.file("empty").mtime_ns is None and '"mtime_ns"' in data.decode()
    assert data.decode().count('"mtime_ns"') == 1


def test_version_id_guards_the_bytes():
    data = make().to_bytes()
    with pytest.raises(IntegrityError):
        loads(data.replace(b'"m"', b'"n"'), expected_version=make().version_id)


def _mutate(fn):
    d = doc()
    fn(d)
    return json.dumps(d).encode()


def _setf(key, value, i=0):
    return lambda d: d["files"][i].__setitem__(key, value)


HOSTILE = {
    "absolute path": _setf("path", "/etc/passwd"),
    "dotdot": _setf("path", "a/../../etc/passwd"),
    "dot": _setf("path", "./a"),
    "empty component": _setf("path", "a//b"),
    "trailing slash": _setf("path", "a/"),
    "NUL": _setf("path", "a\x00b"),
    "empty path": _setf("path", ""),
    "path not string": _setf("path", 7),
    "duplicate path": lambda d: d["files"].append(copy.deepcopy(d["files"][0])),
    "file is a directory": lambda d: d["files"].append(dict(copy.deepcopy(d["files"][2]), path="empty/x")),
    "file and listed dir": lambda d: d["directories"].append({"path": "empty", "mode": "0755"}),
    "sizes do not add up": _setf("size", 11),
    "negative size": _setf("size", -1),
    "absurd size": _setf("size", 1 << 60),
    "size is float": _setf("size", 10.0),
    "size is bool": _setf("size", True),
    "zero chunk": _setf("chunks", [[H, 0], [H, 10]]),
    "chunk not pair": _setf("chunks", [[H]]),
    "bad chunk hash": _setf("chunks", [["zz" * 32, 10]]),
    "more chunks than bytes": lambda d: d["files"][1].update(chunks=[[H, 1]] * 4),
    "bad mode": _setf("mode", "rwx"),
    "setuid mode": _setf("mode", "4755"),
    "bad sha": _setf("sha256", "abc"),
    "unknown version": lambda d: d.update(format_version=2),
    "not a manifest": lambda d: d.update(format="something"),
    "files not list": lambda d: d.update(files={}),
    "bad hash algo": lambda d: d.update(hashes={"chunk": "md5", "file": "sha256"}),
    "name with slash": lambda d: d.update(name="a/b"),
    "description not object": _setf("description", []),
    "mtime is float": _setf("mtime_ns", 1.5),
    "mtime is string": _setf("mtime_ns", "2026-11-23"),
    "mtime beyond 64 bits": _setf("mtime_ns", 1 << 70),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifests_are_rejected(case):
    with pytest.raises(ManifestError) as e:
        loads(_mutate(HOSTILE[case]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b"null", b'{"format": "modelfs-manifest"', b"\xff\xfe",
    b"[" * 100_000 + b"]" * 100_000, b'{"a": 1, "a": 2}',
])
def test_garbage_is_rejected(data):
    with pytest.raises(ManifestError):
        loads(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["path", "size", "mode", "sha256", "chunks", "description"]),
       value=json_values, i=st.integers(0, 2))
def test_fuzzed_fields_never_crash_the_loader(key, value, i):
    """Any value in any file field either loads into a consistent manifest or is a ManifestError."""
    data = _mutate(_setf(key, value, i))
    try:
        m = loads(data)
    except ManifestError:
        return
    for f in m.files:
        assert sum(n for _, n in f.chunks) == f.size
        assert not f.path.startswith("/") and ".." not in f.path.split("/")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_loader(data):
    with pytest.raises(ManifestError):
        loads(data)

import io
import json
import pickle
import struct
import sys
import time
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.describe.headers import describe
from modelfs.dev.sample import write_safetensors


def test_safetensors_description(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": ("BF16", [4, 8]), "b": ("F32", [3]), "c": ("BF16", [2, 2])},
                      metadata={"format": "pt", "note": "x" * 500})
    d = describe(str(p), p.stat().st_size)
    assert d["format"] == "safetensors" and d["tensors"] == 3
    assert d["dtypes"] == {"BF16": 2, "F32": 1} and d["parameters"] == 32 + 3 + 4
    assert d["metadata"]["format"] == "pt" and len(d["metadata"]["note"]) < 300


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def test_gguf_description_skips_big_arrays(tmp_path):
    kv = [
        _s("general.architecture") + struct.pack("<I", 8) + _s("llama"),
        _s("llama.context_length") + struct.pack("<II", 4, 4096),
        _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + _s("a") + _s("bb") + _s("ccc"),
        _s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3),
    ]
    tensors = [_s("tok_embd.weight") + struct.pack("<IQQIQ", 2, 32, 10, 12, 0),
               _s("output.weight") + struct.pack("<IQIQ", 1, 32, 30, 640)]
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv)
                  + b"".join(tensors) + b"\0" * 1024)
    d = describe(str(p), p.stat().st_size)
    assert d["format"] == "gguf" and d["architecture"] == "llama" and d["tensors"] == 2
    assert d["parameters"] == 320 + 32 and d["tensor_types"] == {"BF16": 1, "Q4_K": 1}
    assert d["metadata"]["llama.context_length"] == 4096
    assert d["metadata"]["tokenizer.ggml.tokens"] == "[3 × string]"


def test_other_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "blob").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "broken.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    assert describe(str(tmp_path / "config.json"), 50) == {"format": "json", "architectures": ["X"], "model_type": "llama"}
    assert describe(str(tmp_path / "e"), 0)["format"] == "empty"
    assert describe(str(tmp_path / "blob"), 300)["format"] == "binary"
    assert describe(str(tmp_path / "broken.safetensors"), 18)["format"] == "unknown"


# -- the other formats models ship in (issue 12): read, never loaded ---------------------------


def _fake_module(name: str, **attrs) -> types.ModuleType:
    """A module importable by pickle while writing test files (what the real library would
    provide); the describer never imports anything."""
    parts = name.split(".")
    for i in range(1, len(parts)):  # parents first: pickle imports the dotted name
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    m = types.ModuleType(name)
    for k, v in attrs.items():
        if isinstance(v, type) or callable(v):
            v.__module__, v.__qualname__ = name, k
        setattr(m, k, v)
    sys.modules[name] = m
    return m


class _Storage:
    def __init__(self, cls, numel):
        self.cls, self.numel = cls, numel


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: the describer does not unpickle")


class _Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return (_rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict()))


def torch_zip(path):
    """A PyTorch ``torch.save`` zip as torch writes it: archive/data.pkl with persistent
    storage ids, one file per storage."""
    torch = _fake_module("torch", BFloat16Storage=type("BFloat16Storage", (), {}),
                         FloatStorage=type("FloatStorage", (), {}))
    _fake_module("torch._utils", _rebuild_tensor_v2=_rebuild_tensor_v2)
    sd = OrderedDict()
    storages = []
    for i, (cls, shape) in enumerate([(torch.BFloat16Storage, (4, 8)), (torch.BFloat16Storage, (8,)),
                                      (torch.FloatStorage, (3, 3))]):
        s = _Storage(cls, int(np.prod(shape)))
        storages.append(s)
        sd[f"layer{i}.weight"] = _Tensor(s, shape)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", obj.cls, str(storages.index(obj)), "cpu", obj.numel)
            return None
    buf = io.BytesIO()
    P(buf, protocol=2).dump(sd)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for i, s in enumerate(storages):
            z.writestr(f"archive/data/{i}", b"\0" * s.numel * 2)


def sklearn_pickle(path, protocol=5):
    forest = _fake_module("sklearn.ensemble._forest",
                          RandomForestClassifier=type("RandomForestClassifier", (), {}))
    tree = _fake_module("sklearn.tree._classes", DecisionTreeClassifier=type("DecisionTreeClassifier", (), {}))
    m = forest.RandomForestClassifier()
    m.__dict__.update(n_estimators=100, max_depth=None, criterion="gini", class_weight=[1.0, 2.0],
                      estimators_=[tree.DecisionTreeClassifier() for _ in range(3)],
                      classes_=np.arange(3), _private="x")
    path.write_bytes(pickle.dumps(m, protocol=protocol))


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(num: int, value) -> bytes:
    if isinstance(value, int):
        return _pb_varint(num << 3) + _pb_varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _pb_varint(num << 3 | 2) + _pb_varint(len(value)) + value


def onnx_bytes() -> bytes:
    w = _pb(1, 4) + _pb(1, 8) + _pb(2, 1) + _pb(8, "w") + _pb(9, b"\0" * 128)  # dims 4, 8; FLOAT
    b = _pb(1, _pb_varint(8)) + _pb(2, 10) + _pb(8, "b") + _pb(9, b"\0" * 16)  # packed dims [8]; FLOAT16
    graph = (_pb(1, _pb(4, "MatMul")) * 3 + _pb(2, "g") + _pb(5, w) + _pb(5, b)
             + _pb(11, _pb(1, "x")) + _pb(12, _pb(1, "y")))
    return _pb(1, 8) + _pb(2, "pytorch") + _pb(8, _pb(1, "") + _pb(2, 17)) + _pb(7, graph)


@pytest.fixture
def formats_dir(tmp_path):
    d = tmp_path / "formats"
    d.mkdir()
    np.save(d / "a.npy", np.zeros((3, 5), dtype=np.float16))
    np.savez(d / "arrays.npz", x=np.zeros(4, dtype=np.int64), y=np.ones((2, 2), dtype=np.float32))
    np.savez_compressed(d / "packed.npz", z=np.zeros(7, dtype=np.uint8))
    torch_zip(d / "pytorch_model.bin")
    sklearn_pickle(d / "forest.pkl")
    sklearn_pickle(d / "forest.joblib", protocol=4)
    (d / "model.onnx").write_bytes(onnx_bytes())
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                                            "merges": ["a b"]}, "added_tokens": [{"id": 3}]}))
    (d / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return d


def _d(p):
    return describe(str(p), p.stat().st_size)


def test_numpy_pytorch_pickle_onnx_tokenizer_descriptions(formats_dir):
    d = formats_dir
    assert _d(d / "a.npy") == {"format": "npy", "dtype": "<f2", "shape": [3, 5], "fortran_order": False,
                               "elements": 15}
    npz = _d(d / "arrays.npz")
    assert npz["format"] == "npz" and npz["arrays"] == 2
    assert npz["entries"]["y"] == {"dtype": "<f4", "shape": [2, 2], "fortran_order": False}
    assert _d(d / "packed.npz")["entries"]["z"]["shape"] == [7]
    pt = _d(d / "pytorch_model.bin")
    assert pt["format"] == "pytorch" and pt["tensors"] == 3 and pt["parameters"] == 32 + 8 + 9
    assert pt["dtypes"] == {"bfloat16": 2, "float32": 1} and pt["keys"][0] == "layer0.weight"
    for name, fmt in (("forest.pkl", "pickle"), ("forest.joblib", "joblib")):
        sk = _d(d / name)
        assert sk["format"] == fmt and sk["framework"] == "scikit-learn"
        assert sk["class"] == "sklearn.ensemble._forest.RandomForestClassifier"
        assert sk["params"] == {"class_weight": [1.0, 2.0], "criterion": "gini", "max_depth": None,
                                "n_estimators": 100}
    ox = _d(d / "model.onnx")
    assert ox["format"] == "onnx" and ox["ir_version"] == 8 and ox["producer"] == "pytorch"
    assert ox["opsets"] == {"ai.onnx": 17} and ox["nodes"] == 3 and ox["parameters"] == 32 + 8
    assert ox["initializer_types"] == {"FLOAT": 1, "FLOAT16": 1} and ox["inputs"] == ["x"] and ox["outputs"] == ["y"]
    assert _d(d / "tokenizer.json") == {"format": "tokenizer", "model": "BPE", "vocab_size": 3, "merges": 1,
                                        "added_tokens": 1}
    assert _d(d / "weights.h5")["format"] == "hdf5"


def test_a_pickle_is_never_run(tmp_path):
    """A pickle that would run a command when loaded is described, not executed."""
    marker = tmp_path / "pwned"
    evil = (b"\x80\x04\x95" + b"\0" * 8 + b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
            + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x94\x85\x94R\x94.")
    p = tmp_path / "evil.pkl"
    p.write_bytes(evil)
    d = _d(p)
    assert d["format"] == "pickle" and d["class"] == "os.system" and not marker.exists()


HOSTILE = {
    "pickle recursion bomb": b"\x80\x04" + b"]" * 200_000 + b"." ,
    "pickle nested marks": b"\x80\x02" + b"(" * 500_000 + b"t.",
    "pickle huge length": b"\x80\x04\x8d" + (1 << 60).to_bytes(8, "little") + b"abc",
    "pickle memo loop": b"\x80\x02]q\x00h\x00a" * 50_000 + b".",
    "npy huge header": b"\x93NUMPY\x02\x00" + (1 << 31).to_bytes(4, "little") + b"{",
    "npy not a dict": b"\x93NUMPY\x01\x00" + (10).to_bytes(2, "little") + b"[1, 2, 3] ",
    "zip truncated": b"PK\x03\x04" + b"\0" * 40,
    "onnx huge field": _pb_varint(7 << 3 | 2) + _pb_varint(1 << 40) + b"\0" * 10,
    "onnx deep varint": b"\x08" + b"\xff" * 100,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_unknown_or_partial_quickly(tmp_path, case):
    ext = {"pickle": ".pkl", "npy": ".npy", "zip": ".bin", "onnx": ".onnx"}[case.split()[0]]
    p = tmp_path / f"x{ext}"
    p.write_bytes(HOSTILE[case])
    t0 = time.monotonic()
    d = _d(p)
    assert time.monotonic() - t0 < 10 and isinstance(d.get("format"), str)
    assert d["format"] == "unknown" or "note" in d or d["format"] in ("pickle", "onnx")
    json.dumps(d)  # a description is always JSON-able


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_fuzzed_model_files_never_crash_the_describer(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fz")
    src = tmp_path_factory.mktemp("src")
    np.save(src / "a.npy", np.zeros(3))
    torch_zip(src / "m.bin")
    sklearn_pickle(src / "f.pkl")
    (src / "m.onnx").write_bytes(onnx_bytes())
    name = data.draw(st.sampled_from(["a.npy", "m.bin", "f.pkl", "m.onnx"]))
    raw = bytearray((src / name).read_bytes())
    cut = data.draw(st.integers(1, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    (d / name).write_bytes(bytes(raw))
    out = _d(d / name)
    assert isinstance(out.get("format"), str)
    json.dumps(out)

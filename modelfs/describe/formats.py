"""Descriptions of the other formats models ship in, read from headers, never by loading.

NumPy ``.npy``/``.npz``, PyTorch checkpoints (a zip holding ``data.pkl``), plain
and joblib pickles of scikit-learn / XGBoost / LightGBM models (walked by
:mod:`modelfs.describe.pickles`, never unpickled), ONNX (its protobuf walked field by
field, tensor payloads skipped, not read), HDF5 and Keras files, tokenizers.
Each function takes the open file and returns a description; a malformed file
raises one of :data:`ERRORS`, which ``describe`` turns into ``unknown`` with a note.
"""

from __future__ import annotations

import ast
import io
import json
import math
import struct
import zipfile
import zlib
from collections import Counter
from typing import Any, BinaryIO

from .pickles import Global, Obj, Pid, plain, walk

ERRORS = (ValueError, struct.error, UnicodeDecodeError, OverflowError, zipfile.BadZipFile,
          zlib.error, EOFError, KeyError, IndexError, TypeError, NotImplementedError,
          RecursionError, SyntaxError, MemoryError)
MAX_LISTED = 32  # entries, inputs, outputs named in a description
MAX_ZIP_DIRECTORY = 64 << 20  # a zip's central directory larger than this is not read
MAX_ZIP_ENTRIES = 100_000
MAX_NPY_HEADER = 1 << 20
MAX_TOKENIZER_JSON = 32 << 20
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-zip torch.save file
NPY_MAGIC = b"\x93NUMPY"

FRAMEWORKS = {"sklearn": "scikit-learn", "xgboost": "xgboost", "lightgbm": "lightgbm",
              "catboost": "catboost", "torch": "pytorch", "numpy": "numpy", "pandas": "pandas",
              "keras": "keras", "tensorflow": "tensorflow"}
# storage classes of PyTorch pickles → dtype
TORCH_STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
                  "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8",
                  "QUInt8Storage": "quint8", "Float8_e4m3fnStorage": "float8_e4m3fn",
                  "Float8_e5m2Storage": "float8_e5m2"}


# -- NumPy --------------------------------------------------------------------------------

def npy_header(f: BinaryIO) -> dict:
    """dtype, shape and order of an ``.npy`` stream, from its header (a Python literal,
    read with ``ast.literal_eval``: values only, nothing evaluated)."""
    if f.read(6) != NPY_MAGIC:
        raise ValueError("not an .npy file")
    major = f.read(2)[:1]
    n = struct.unpack("<H", f.read(2))[0] if major == b"\x01" else struct.unpack("<I", f.read(4))[0]
    if n > MAX_NPY_HEADER:
        raise ValueError("absurd .npy header length")
    d = ast.literal_eval(f.read(n).decode("latin1"))
    if not isinstance(d, dict) or not isinstance(d.get("shape"), tuple):
        raise ValueError("malformed .npy header")
    shape = [int(x) for x in d["shape"]]
    return {"dtype": str(d.get("descr")), "shape": shape, "fortran_order": bool(d.get("fortran_order"))}


def npy(f: BinaryIO) -> dict:
    h = npy_header(f)
    return {"format": "npy", **h, "elements": math.prod(h["shape"])}


# -- zips: PyTorch, npz, Keras ---------------------------------------------------------------

def _open_zip(f: BinaryIO, size: int) -> zipfile.ZipFile:
    """The zip, after checking from its end record that its directory is of a sane size
    (ZipFile reads the whole central directory into memory)."""
    tail = min(size, (1 << 16) + 22)
    f.seek(size - tail)
    end = f.read(tail)
    at = end.rfind(b"PK\x05\x06")
    if at >= 0 and len(end) >= at + 22:
        entries, cd_size = struct.unpack_from("<HI", end, at + 10)
        if cd_size > MAX_ZIP_DIRECTORY:
            raise ValueError(f"zip directory of {cd_size} bytes")
    f.seek(0)
    z = zipfile.ZipFile(f)
    if len(z.infolist()) > MAX_ZIP_ENTRIES:
        raise ValueError("too many zip entries")
    return z


def zip_archive(f: BinaryIO, size: int, ext: str) -> dict:
    z = _open_zip(f, size)
    names = z.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if pkl:
        return _torch_zip(z, pkl[0], len(names))
    if ext == ".keras" or "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return _keras_zip(z)
    arrays = [n for n in names if n.endswith(".npy")]
    if arrays and (ext == ".npz" or len(arrays) == len(names)):
        listed = {}
        for n in arrays[:MAX_LISTED]:
            with z.open(n) as member:
                listed[n[:-4]] = npy_header(io.BufferedReader(member, 4096))
        return {"format": "npz", "arrays": len(arrays), "entries": listed}
    return {"format": "zip", "entries": len(names), "names": names[:MAX_LISTED]}


def _torch_zip(z: zipfile.ZipFile, pkl: str, entries: int) -> dict:
    with z.open(pkl) as member:
        w = walk(member)
    dtypes: Counter[str] = Counter()
    params = tensors = 0
    for call in w.calls:
        if isinstance(call.cls, Global) and call.cls.module == "torch._utils" \
                and call.cls.name.startswith("_rebuild_tensor") and isinstance(call.args, tuple) and call.args:
            storage, size = call.args[0], call.args[2] if len(call.args) > 2 else ()
            tensors += 1
            dtypes[_torch_dtype(storage)] += 1
            if isinstance(size, tuple) and all(isinstance(x, int) for x in size):
                params += math.prod(size)
    out: dict[str, Any] = {"format": "pytorch", "tensors": tensors, "dtypes": dict(sorted(dtypes.items())),
                           "parameters": params, "entries": entries}
    top = w.top
    if isinstance(top, Obj) and isinstance(top.cls, Global):
        out["class"] = str(top.cls)
    elif isinstance(top, dict):
        out["keys"] = [str(k) for k in list(top)[:MAX_LISTED]]
    if w.note:
        out["note"] = w.note
    return out


def _torch_dtype(storage: Any) -> str:
    # ('storage', <Global torch.BFloat16Storage>, key, location, numel)
    if isinstance(storage, Pid) and isinstance(storage.value, tuple) and len(storage.value) > 1:
        kind = storage.value[1]
        if isinstance(kind, Global):
            return TORCH_STORAGES.get(kind.name, kind.name)
    return "unknown"


def _keras_zip(z: zipfile.ZipFile) -> dict:
    out: dict[str, Any] = {"format": "keras"}
    if "config.json" in z.namelist():
        info = z.getinfo("config.json")
        if info.file_size <= MAX_TOKENIZER_JSON:
            with z.open(info) as member:
                doc = json.loads(member.read(MAX_TOKENIZER_JSON))
            if isinstance(doc, dict):
                out["class"] = plain(doc.get("class_name"))
                cfg = doc.get("config")
                if isinstance(cfg, dict):
                    out["name"] = plain(cfg.get("name"))
                    layers = cfg.get("layers")
                    if isinstance(layers, list):
                        out["layers"] = len(layers)
    return out


# -- pickles ---------------------------------------------------------------------------------

def pickle_file(f: BinaryIO, fmt: str = "pickle") -> dict:
    """A pickled model: its class and framework, and the estimator's parameters where they
    are plain values (scikit-learn's ``__dict__`` without the fitted ``*_`` attributes)."""
    w = walk(f)
    out: dict[str, Any] = {"format": fmt}
    if w.top == TORCH_LEGACY_MAGIC:
        return {"format": "pytorch-legacy", "note": "torch.save's pre-1.6 format: tensors not listed"}
    top = w.top if w.complete else next((c for c in w.calls if isinstance(c.cls, Global)), None)
    if isinstance(top, Obj) and isinstance(top.cls, Global) and top.cls.name == "_reconstruct" \
            and top.cls.module.startswith("numpy"):
        out["class"] = "numpy.ndarray"
    elif isinstance(top, Obj) and isinstance(top.cls, Global):
        out["class"] = str(top.cls)
        if isinstance(top.state, dict):
            params = {}
            for k, v in top.state.items():
                if isinstance(k, str) and not k.endswith("_") and not k.startswith("_") \
                        and ((p := plain(v)) is not None or v is None):
                    params[k] = p
            if params:
                out["params"] = dict(sorted(params.items())[:64])
    elif isinstance(top, dict):
        out["class"] = "dict"
        out["keys"] = [str(k) for k in list(top)[:MAX_LISTED]]
    modules = Counter(c.cls.module.split(".")[0] for c in w.calls if isinstance(c.cls, Global))
    if isinstance(top, Obj) and isinstance(top.cls, Global):
        modules[top.cls.module.split(".")[0]] += 1
    framework = next((FRAMEWORKS[m] for m, _ in modules.most_common() if m in FRAMEWORKS), None)
    if framework:
        out["framework"] = framework
    if w.note:
        out["note"] = w.note
    return out


# -- ONNX ------------------------------------------------------------------------------------

class _Proto:
    """A protobuf message in a file, walked field by field; payloads not asked for are
    skipped with a seek, so a multi-GB model's weights are never read."""

    def __init__(self, f: BinaryIO, end: int):
        self.f, self.end = f, end

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.f.read(1)
            if not b:
                raise EOFError("truncated protobuf")
            result |= (b[0] & 0x7F) << shift
            if b[0] < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self):
        """(field number, wire type, value or (start, length) of a length-delimited field)."""
        while self.f.tell() < self.end:
            key = self.varint()
            num, wt = key >> 3, key & 7
            if wt == 0:
                yield num, wt, self.varint()
            elif wt == 2:
                n = self.varint()
                start = self.f.tell()
                if start + n > self.end:
                    raise ValueError("protobuf field runs past its message")
                yield num, wt, (start, n)
                self.f.seek(start + n)
            elif wt == 1:
                self.f.seek(8, 1)
            elif wt == 5:
                self.f.seek(4, 1)
            else:
                raise ValueError(f"protobuf wire type {wt}")

    def read(self, span: tuple[int, int], limit: int = 4096) -> bytes:
        start, n = span
        here = self.f.tell()
        self.f.seek(start)
        data = self.f.read(min(n, limit))
        self.f.seek(here)
        return data

    def sub(self, span: tuple[int, int]) -> _Proto:
        return _Proto(self.f, span[0] + span[1])


ONNX_TYPES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
              8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64",
              16: "BFLOAT16", 17: "FLOAT8E4M3FN", 19: "FLOAT8E5M2"}


def onnx(f: BinaryIO, size: int) -> dict:
    m = _Proto(f, size)
    out: dict[str, Any] = {"format": "onnx"}
    opsets, graph = {}, None
    for num, wt, v in m.fields():
        if num == 1 and wt == 0:
            out["ir_version"] = v
        elif num == 2 and wt == 2:
            out["producer"] = m.read(v, 200).decode("utf-8", "replace")
        elif num == 8 and wt == 2:
            domain, version = "ai.onnx", None
            op = m.sub(v)
            f.seek(v[0])
            for n2, w2, v2 in op.fields():
                if n2 == 1 and w2 == 2:
                    domain = op.read(v2, 200).decode("utf-8", "replace") or "ai.onnx"
                elif n2 == 2 and w2 == 0:
                    version = v2
            f.seek(v[0] + v[1])
            opsets[domain] = version
        elif num == 7 and wt == 2:
            graph = v
    if "ir_version" not in out and graph is None:
        raise ValueError("no ONNX model fields")
    out["opsets"] = opsets
    if graph is not None:
        out.update(_onnx_graph(f, graph))
    return out


def _onnx_graph(f: BinaryIO, span: tuple[int, int]) -> dict:
    g = _Proto(f, span[0] + span[1])
    f.seek(span[0])
    nodes = params = initializers = 0
    types: Counter[str] = Counter()
    inputs, outputs = [], []
    for num, wt, v in g.fields():
        if wt != 2:
            continue
        if num == 1:
            nodes += 1
        elif num == 5:
            initializers += 1
            dims, dtype = _onnx_tensor(g, v)
            params += math.prod(dims)
            types[ONNX_TYPES.get(dtype, str(dtype))] += 1
            f.seek(v[0] + v[1])
        elif num in (11, 12):
            name = _onnx_name(g, v)
            f.seek(v[0] + v[1])
            (inputs if num == 11 else outputs).append(name)
    return {"nodes": nodes, "initializers": initializers, "parameters": params,
            "initializer_types": dict(sorted(types.items())),
            "inputs": inputs[:MAX_LISTED], "outputs": outputs[:MAX_LISTED]}


def _onnx_tensor(g: _Proto, span: tuple[int, int]) -> tuple[list[int], int]:
    t = g.sub(span)
    g.f.seek(span[0])
    dims: list[int] = []
    dtype = 0
    for num, wt, v in t.fields():
        if num == 1 and wt == 0:
            dims.append(v)
        elif num == 1 and wt == 2:  # packed
            p = t.sub(v)
            t.f.seek(v[0])
            while t.f.tell() < p.end:
                dims.append(p.varint())
        elif num == 2 and wt == 0:
            dtype = v
        if len(dims) > 64:
            raise ValueError("absurd tensor rank")
    return dims, dtype


def _onnx_name(g: _Proto, span: tuple[int, int]) -> str:
    v = g.sub(span)
    g.f.seek(span[0])
    for num, wt, val in v.fields():
        if num == 1 and wt == 2:
            return v.read(val, 200).decode("utf-8", "replace")
    return ""


# -- tokenizers --------------------------------------------------------------------------------

def tokenizer_json(f: BinaryIO, size: int) -> dict:
    if size > MAX_TOKENIZER_JSON:
        return {"format": "tokenizer", "note": f"larger than {MAX_TOKENIZER_JSON} bytes: not read"}
    doc = json.loads(f.read(MAX_TOKENIZER_JSON))
    out: dict[str, Any] = {"format": "tokenizer"}
    if isinstance(doc, dict):
        model = doc.get("model")
        if isinstance(model, dict):
            out["model"] = plain(model.get("type"))
            vocab = model.get("vocab")
            if isinstance(vocab, (dict, list)):
                out["vocab_size"] = len(vocab)
            merges = model.get("merges")
            if isinstance(merges, list):
                out["merges"] = len(merges)
        added = doc.get("added_tokens")
        if isinstance(added, list):
            out["added_tokens"] = len(added)
    return out

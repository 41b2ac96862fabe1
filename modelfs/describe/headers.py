"""What a file is, read cheaply from its header: the ``description`` in a manifest.

Only headers are read (a safetensors JSON header, GGUF key/values and tensor
infos — large GGUF arrays such as tokenizer vocabularies are skipped, not
loaded), so describing a 20 GB shard costs milliseconds. The other formats
(NumPy, PyTorch, pickles, ONNX, HDF5/Keras, tokenizers) are in :mod:`formats`. A file that claims a
format but has a broken header is described as such instead of failing the
publish.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from collections import Counter
from typing import BinaryIO

from . import formats

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_JSON_DESCRIBE = 4 * 1024 * 1024
MAX_STRING = 200  # longer metadata strings are cut in descriptions

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
              15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
              20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
              26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32",
                    7: "bool", 8: "string", 9: "array", 10: "u64", 11: "i64", 12: "f64"}
_EXT_TYPES = {".txt": "text", ".md": "text", ".py": "text", ".model": "sentencepiece",
              ".onnx": "onnx", ".pt": "pytorch", ".pth": "pytorch", ".bin": "binary",
              ".ckpt": "checkpoint", ".h5": "hdf5", ".msgpack": "msgpack", ".npy": "numpy",
              ".npz": "numpy", ".tflite": "tflite", ".jinja": "text", ".yaml": "yaml",
              ".yml": "yaml", ".toml": "toml", ".csv": "text"}


def _short(v):
    if isinstance(v, str) and len(v) > MAX_STRING:
        return v[:MAX_STRING] + "…"
    return v


def describe(path: str, size: int) -> dict:
    """A small JSON-able dict saying what the file at ``path`` is."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0)
        try:
            if head[:4] == b"GGUF":
                return _gguf(f, size)
            if path.endswith(".safetensors") or _looks_safetensors(head, size):
                return _safetensors(f, size)
            return _other(f, path, size, head)
        except formats.ERRORS as e:
            return {"format": "unknown", "note": f"unreadable header: {type(e).__name__}: {e}"[:MAX_STRING]}


def _looks_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head)
    return 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER)


def safetensors_tensors(f: BinaryIO, size: int) -> tuple[dict[str, tuple[str, list[int], int, int]], dict | None, int]:
    """``{name: (dtype, shape, start, end)}`` with absolute file offsets, the
    ``__metadata__`` and the header's length, from a safetensors file's header."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(f"safetensors header length {n} out of range")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    meta = header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        out[name] = (str(t["dtype"]), [int(d) for d in t["shape"]], 8 + n + int(lo), 8 + n + int(hi))
    return out, meta if isinstance(meta, dict) else None, n + 8


def _tally(tensors: dict[str, tuple[str, list[int], int, int]]) -> tuple[Counter[str], int]:
    """Tensors per dtype, and the parameter count."""
    types: Counter[str] = Counter()
    params = 0
    for dtype, shape, _, _ in tensors.values():
        types[dtype] += 1
        params += math.prod(shape)
    return types, params


def _safetensors(f: BinaryIO, size: int) -> dict:
    tensors, meta, header_bytes = safetensors_tensors(f, size)
    dtypes, params = _tally(tensors)
    out = {"format": "safetensors", "tensors": len(tensors), "dtypes": dict(sorted(dtypes.items())),
           "parameters": params, "header_bytes": header_bytes}
    if meta is not None:
        out["metadata"] = {str(k): _short(str(v)) for k, v in sorted(meta.items())}
    return out


class _Reader:
    def __init__(self, f: BinaryIO):
        self.f = f

    def take(self, fmt: str):
        s = struct.Struct(fmt)
        data = self.f.read(s.size)
        if len(data) != s.size:
            raise ValueError("truncated GGUF header")
        return s.unpack(data)[0]

    def string(self, keep: bool = True) -> str | None:
        n = self.take("<Q")
        if n > 1 << 30:
            raise ValueError("absurd GGUF string length")
        if not keep:
            self.f.seek(n, 1)
            return None
        return self.f.read(n).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[vtype])
        if vtype == 8:
            return _short(self.string())
        if vtype == 9:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _GGUF_SCALARS:
                self.f.seek(struct.calcsize(_GGUF_SCALARS[itype]) * count, 1)
            elif itype == 8:
                for _ in range(count):
                    self.string(keep=False)
            else:
                raise ValueError(f"GGUF nested array of type {itype}")
            return f"[{count} × {_GGUF_TYPE_NAMES.get(itype, itype)}]"
        raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_tensors(f: BinaryIO, size: int) -> tuple[dict[str, tuple[str, list[int], int, int]], dict, int]:
    """``{name: (type, dims, start, end)}`` with absolute file offsets (a tensor ends where
    the next begins), the key/values (large arrays summarized, not read) and the version."""
    r = _Reader(f)
    f.read(4)
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 20:
        raise ValueError("absurd GGUF counts")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, GGML_TYPES.get(r.take("<I"), "unknown"), dims, r.take("<Q")))
    align = meta.get("general.alignment", 32)
    align = align if isinstance(align, int) and 0 < align <= 1 << 20 else 32
    base = -(-f.tell() // align) * align
    starts = sorted({base + off for *_, off in infos} | {max(size, base)})
    out = {}
    for name, ggml_type, dims, off in infos:
        start = base + off
        end = starts[bisect.bisect_right(starts, start)] if start < starts[-1] else start
        out[name] = (ggml_type, dims, start, end)
    return out, meta, version


def _gguf(f: BinaryIO, size: int) -> dict:
    tensors, meta, version = gguf_tensors(f, size)
    types, params = _tally(tensors)
    return {"format": "gguf", "gguf_version": version,
            "architecture": meta.get("general.architecture"), "tensors": len(tensors),
            "tensor_types": dict(sorted(types.items())), "parameters": params,
            "metadata": dict(sorted(meta.items()))}


def _other(f: BinaryIO, path: str, size: int, head: bytes) -> dict:
    name = path.rsplit("/", 1)[-1]
    ext = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""
    if size == 0:
        return {"format": "empty"}
    if head[:6] == formats.NPY_MAGIC:
        return formats.npy(f)
    if head[:4] == b"PK\x03\x04":
        return formats.zip_archive(f, size, ext)
    if head[:8] == formats.HDF5_MAGIC:
        return {"format": "hdf5", **({"note": "Keras (HDF5)"} if ext in (".h5", ".keras", ".hdf5") else {})}
    if ext == ".joblib" and head[:1] != b"\x80":
        return {"format": "joblib", "note": "compressed: not described"}
    if head[:1] == b"\x80" or ext in (".pkl", ".pickle", ".joblib"):
        return formats.pickle_file(f, "joblib" if ext == ".joblib" else "pickle")
    if ext == ".onnx":
        return formats.onnx(f, size)
    if name == "tokenizer.json":
        return formats.tokenizer_json(f, size)
    if ext == ".json" and size <= MAX_JSON_DESCRIBE:
        try:
            doc = json.loads(f.read())
        except (ValueError, UnicodeDecodeError):
            return {"format": "text", "note": "invalid JSON"}
        out = {"format": "json"}
        if isinstance(doc, dict):
            for key in ("architectures", "model_type", "torch_dtype", "tokenizer_class"):
                if key in doc and isinstance(doc[key], (str, list)):
                    out[key] = doc[key] if isinstance(doc[key], str) else [_short(str(x)) for x in doc[key][:8]]
        return out
    if ext in _EXT_TYPES:
        return {"format": _EXT_TYPES[ext]}
    return {"format": "text" if _is_text(f.read(4096)) else "binary"}


def _is_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start > len(sample) - 4  # a multi-byte character cut at the end

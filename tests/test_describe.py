import json
import struct

from modelfs.describe import describe
from modelfs.sample import write_safetensors


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

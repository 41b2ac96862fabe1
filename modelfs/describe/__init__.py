"""What a model file is, from its header alone, and what changed between two versions.

Owns: format detection and descriptions for manifests (safetensors, GGUF, NumPy,
PyTorch/pickles read without executing them, ONNX, tokenizers …), the one safetensors
header parser (the mount's readahead uses it too), and ``diff``. Reads bytes through a
file object or a callable it is given; no network or cache of its own.
May import: ``format``, ``errors``.
"""
